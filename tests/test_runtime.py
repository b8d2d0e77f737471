"""rto_jax.runtime: the heap freed by a long XLA compilation goes back to the system."""

import jax
import jax.numpy as jnp
import pytest

from rto_jax import runtime


def test_compiling_records_the_event_the_release_listens_for(monkeypatch):
    """A JAX that renamed its compile event would silently stop the release: its name is checked here."""
    from jax._src import monitoring

    seen = []
    monkeypatch.setattr(monitoring, "_event_duration_secs_listeners", [])  # this test's listener only, for now
    jax.monitoring.register_event_duration_secs_listener(lambda event, secs, **kw: seen.append(event))
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.25).lower(jnp.ones(7)).compile()
    assert runtime.COMPILE_EVENT in seen


@pytest.mark.skipif(runtime.malloc_trim() is None, reason="no malloc_trim in this C library")
def test_a_long_compile_releases_the_heap_and_a_short_one_does_not(monkeypatch):
    from jax._src import monitoring

    calls = []
    monkeypatch.setattr(runtime, "_installed", False)
    monkeypatch.setattr(runtime, "malloc_trim", lambda: calls.append)
    monkeypatch.setattr(monitoring, "_event_duration_secs_listeners", [])
    assert runtime.release_memory_after_compiles(min_seconds=1.0)
    assert runtime.release_memory_after_compiles(min_seconds=1.0)  # installed once, whatever the calls
    monitoring.record_event_duration_secs(runtime.COMPILE_EVENT, 0.2)
    monitoring.record_event_duration_secs("/jax/some/other/event", 5.0)
    assert calls == []
    monitoring.record_event_duration_secs(runtime.COMPILE_EVENT, 1.5)
    assert calls == [0]
    assert len(monitoring._event_duration_secs_listeners) == 1


def test_importing_rto_jax_installs_the_release():
    import rto_jax  # noqa: F401

    assert runtime._installed == (runtime.malloc_trim() is not None)
