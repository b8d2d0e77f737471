"""Runs the sharding cases on 8 simulated CPU devices and prints one JSON summary line.

    python tests/sharding_worker.py [--cases sft,dpo] [--meshes 8,1,1:2,4,1]

(the variant cases, sharding_cases.VARIANTS, run on those of the meshes in VARIANT_MESHES)

Run in its own process by tests/test_sharding.py: XLA_FLAGS must give 8 host devices before JAX
starts, which must not leak into other tests. For every case: the one-device reference (the plain,
unsharded step), then the same step on each mesh; the summary holds the largest differences, the
shard shapes of a few parameters, and the result of saving on one mesh and restoring on another.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np
import orbax.checkpoint as ocp
import sharding_cases as cases
from flax import nnx

from rto_jax.models import CausalLM, LoraConfig, load_pretrained, lora, save_pretrained, with_adapters
from rto_jax.tools import plan
from rto_jax.train import OptimizerConfig, TrainState, make_optimizer, sharding


def shard_shapes(state) -> dict:
    """Per-device shard shapes of a few parameters and their Adam moments."""
    params = state.params["decoder"]["layers"]
    mu = state.opt_state[1][0].mu["decoder"]["layers"]
    shape = lambda v: list(v[...].addressable_shards[0].data.shape)
    return {
        "gate_proj": shape(params["gate_proj"]["kernel"]),
        "gate_proj_mu": shape(mu["gate_proj"]["kernel"]),
        "o_proj": shape(params["o_proj"]["kernel"]),
        "embedding": shape(state.params["decoder"]["embed"]["embedding"]),
        "step": shape(state.step) if hasattr(state.step, "addressable_shards") else [],
    }


def checkpoint_round_trip(save_mesh, restore_mesh) -> dict:
    """Saves a sharded TrainState with orbax on one mesh, restores it onto another mesh's shardings."""
    model_fn = lambda: CausalLM(cases.model_config(True), nnx.Rngs(0))
    state = sharding.create_sharded_train_state(model_fn, cases.optimizer(), save_mesh)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state"
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path, nnx.to_pure_dict(nnx.State({"params": state.params, "opt": state.opt_state})))
        checkpointer.wait_until_finished()
        # The restore target: the state's abstract tree with the *other* mesh's shardings.
        abstract_state = jax.eval_shape(lambda: state)
        target = sharding.abstract_tree(abstract_state, sharding.tree_shardings(abstract_state, restore_mesh))
        target_tree = nnx.to_pure_dict(nnx.State({"params": target.params, "opt": target.opt_state}))
        restored = checkpointer.restore(path, target_tree)
    leaves_saved = jax.tree.leaves(nnx.to_pure_dict(nnx.State({"params": state.params, "opt": state.opt_state})))
    leaves_restored = jax.tree.leaves(restored)
    kernel = restored["params"]["decoder"]["layers"]["gate_proj"]["kernel"]
    return {
        "equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves_saved, leaves_restored)),
        "restored_mesh": list(kernel.sharding.mesh.devices.shape),
        "restored_shard": list(kernel.addressable_shards[0].data.shape),
    }


def sharded_load(shape) -> dict:
    """save_pretrained, then load_pretrained straight onto `shape`'s mesh: same values, split shards,
    and no device holding more than its share."""
    model = CausalLM(cases.model_config(False), nnx.Rngs(0))
    mesh = sharding.make_mesh(*shape)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, Path(tmp) / "model")
        loaded = load_pretrained(Path(tmp) / "model", shardings=functools.partial(sharding.tree_shardings, mesh=mesh))
    params = nnx.state(loaded, nnx.Param)
    expected = sharding.tree_shardings(params, mesh)
    same_sharding = all(
        a[...].sharding == b.get_value()
        for a, b in zip(jax.tree.leaves(params, is_leaf=_is_var), jax.tree.leaves(expected, is_leaf=_is_var))
    )
    original = jax.tree.leaves(nnx.state(model, nnx.Param))
    return {
        "equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(original, jax.tree.leaves(params))),
        "shardings": same_sharding,
        "up_proj_shard": list(loaded.decoder.layers[0].up_proj.kernel[...].addressable_shards[0].data.shape),
        "max_device_bytes": _device_bytes(params),
        "total_bytes": sum(x.nbytes for x in original),
    }


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _device_bytes(tree) -> int:
    """The most bytes any one device holds of `tree`'s arrays (measured from their shards)."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


def planner_check(shape) -> dict:
    """The planner's per-device bytes next to the measured ones for the tiny presets on `shape`."""
    mesh = sharding.make_mesh(*shape)
    out = {}
    tx = make_optimizer(OptimizerConfig())
    for name, config in (("tiny", plan.PRESETS["tiny"]), ("test_scan", cases.model_config(True))):
        state = sharding.create_sharded_train_state(lambda c=config: CausalLM(c, nnx.Rngs(0)), tx, mesh)
        planned = plan.plan_memory(config, shape, plan.Workload(rollout_batch=16, prompt_len=8, response_len=8))
        model = CausalLM(config, nnx.Rngs(0))
        init_cache = functools.partial(model.init_cache, 16, 16)  # 16 rows, 16 slots
        cache = jax.jit(init_cache, out_shardings=sharding.kv_cache_shardings(jax.eval_shape(init_cache), mesh))()
        # An adapter run (rank 4 on every projection) trains and holds Adam moments for the adapters only.
        adapters = LoraConfig(4, 8.0)
        adapter_model = lambda c=config: with_adapters(CausalLM(c, nnx.Rngs(0)), adapters, nnx.Rngs(1))
        adapter_state = sharding.shard_tree(TrainState.create(adapter_model(), tx, trainable=lora.TRAINABLE), mesh)
        planned_lora = plan.plan_memory(
            config, shape, plan.Workload(rollout_batch=16, prompt_len=8, response_len=8), adapters
        )
        out[name] = {
            "params": [planned["sft"]["params"], _device_bytes(state.params)],
            "optimizer": [planned["sft"]["optimizer"], _device_bytes(state.opt_state)],
            "kv_cache": [planned["ppo"]["kv_cache"], _device_bytes(cache)],
            "adapter_params": [planned_lora["sft"]["params"], _device_bytes(adapter_state.params)],
            "adapter_optimizer": [planned_lora["sft"]["optimizer"], _device_bytes(adapter_state.opt_state)],
            "adapter_base": [planned_lora["sft"]["frozen"], _device_bytes(adapter_state.base)],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(cases.CASES))
    parser.add_argument("--meshes", default=":".join(",".join(map(str, m)) for m in cases.MESHES))
    parser.add_argument("--checkpoint", default="2,4,1:2,2,2")
    args = parser.parse_args()
    meshes = [tuple(int(x) for x in m.split(",")) for m in args.meshes.split(":") if m]
    assert jax.device_count() == 8, jax.devices()
    summary: dict = {"cases": {}, "shards": {}, "seconds": {}}
    for name in filter(None, args.cases.split(",")):
        start = time.time()
        reference = cases.CASES[name]()
        summary["cases"][name] = {"reference": {k: v for k, v in reference.items() if isinstance(v, float)}}
        for shape in [m for m in meshes if name not in cases.VARIANTS or m in cases.VARIANT_MESHES]:
            result = cases.CASES[name](sharding.make_mesh(*shape))
            summary["cases"][name][str(shape)] = cases.max_differences(reference, result)
        summary["seconds"][name] = round(time.time() - start, 1)
    for shape in meshes:
        mesh = sharding.make_mesh(*shape)
        state = sharding.create_sharded_train_state(
            lambda: CausalLM(cases.model_config(True), nnx.Rngs(0)), cases.optimizer(), mesh
        )
        summary["shards"][str(shape)] = shard_shapes(state)
        summary.setdefault("planner", {})[str(shape)] = planner_check(shape)
    summary["sharded_load"] = sharded_load((2, 4, 1))
    if args.checkpoint:
        save, restore = (tuple(int(x) for x in m.split(",")) for m in args.checkpoint.split(":"))
        summary["checkpoint"] = checkpoint_round_trip(sharding.make_mesh(*save), sharding.make_mesh(*restore))
    print("SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
