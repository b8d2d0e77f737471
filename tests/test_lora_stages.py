"""Adapter training in the steps and the stages (`config.<stage>.lora.*`): only adapters and heads are
trained and hold optimizer state, DPO's reference is the base with the adapters off, adapter dropout
follows the step's key, and the SFT / reward-model / DPO stages export merged weights plus a PEFT
adapter, resume bit-identically, and take a PEFT adapter folder wherever a model path goes."""

import collections
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rto_jax.errors import ConfigError, ModelError
from rto_jax.models import CausalLM, LoraConfig, ScalarHeadModel, load_pretrained, lora, merge_adapters, with_adapters
from rto_jax.models.peft_io import load_peft_adapter
from rto_jax.pipeline import common, run
from rto_jax.pipeline.config import validate
from rto_jax.pipeline.logging import read_metrics
from rto_jax.pipeline.runner import with_seed
from rto_jax.pipeline.tasks import build_task
from rto_jax.train import (
    DPOLoss,
    RewardModelLoss,
    SFTLoss,
    TrainState,
    create_ppo_state,
    loss_metrics,
    make_ppo_fns,
    make_train_step,
    precompute_reference_logps,
)
from tests import sharding_cases as cases
from tests.faults import SimulatedFailure, count_steps, kill_after_checkpoint
from tests.test_pipeline import fixture_data, same_numbers, small_config, strip_time  # noqa: F401 (a fixture)
from tests.test_stage_wiring import assert_dpo_done_equals_numpy


def _adapter_lm(rank=4, dropout=0.0, nonzero_b=True):
    model = with_adapters(CausalLM(cases.model_config(True), nnx.Rngs(0)), LoraConfig(rank, 8.0, dropout), nnx.Rngs(1))
    if nonzero_b:  # a trained adapter: the policy differs from its base
        for i, (key, var) in enumerate(nnx.to_flat_state(lora.adapter_state(model))):
            if key[-1] == "lora_b":
                var[...] = 0.1 * jax.random.normal(jax.random.key(i), var.shape)
    return model


def _float_size(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))


def test_an_adapter_state_trains_only_the_adapters_and_the_head():
    """Reward model with adapters: after a step the base is bit-identical, every adapter B and the head
    moved, and AdamW holds two moments for exactly the trained arrays (not for the base)."""
    model = with_adapters(ScalarHeadModel(cases.model_config(False), nnx.Rngs(0)), LoraConfig(4, 8.0), nnx.Rngs(1))
    state = TrainState.create(model, cases.optimizer(), trainable=lora.TRAINABLE)
    trained = dict(nnx.to_flat_state(state.params))
    assert trained and all(k[-1] in ("lora_a", "lora_b") or k[0] == "head" for k in trained)
    assert _float_size(state.opt_state) == 2 * _float_size(state.params)
    assert _float_size(state.base) > 4 * _float_size(state.params)  # the frozen base is the bulk
    base_before = [np.asarray(x) for x in jax.tree.leaves(state.base)]
    before = {k: np.asarray(v[...]) for k, v in trained.items()}
    new, metrics = make_train_step(RewardModelLoss())(state, jax.tree.map(jnp.asarray, cases.preference_batch()), None)
    for x, y in zip(base_before, jax.tree.leaves(new.base)):
        np.testing.assert_array_equal(x, np.asarray(y))
    after = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(new.params)}
    moved = [k for k in before if k[-1] == "lora_b" or k[0] == "head"]
    assert moved and all(np.max(np.abs(after[k] - before[k])) > 0 for k in moved), "an adapter or the head is frozen"
    assert np.isfinite(float(metrics["loss"]))


def test_dpo_reference_of_an_adapter_policy_is_its_base_with_adapters_off():
    """The DPO loss of an adapter state without `frozen` (reference computed in the step) equals the loss
    with reference log-probs from a separate copy of the base model."""
    model = _adapter_lm()
    base_graphdef, base_params = nnx.split(CausalLM(cases.model_config(True), nnx.Rngs(0)))
    state = TrainState.create(model, cases.optimizer(), trainable=lora.TRAINABLE)
    batch = jax.tree.map(jnp.asarray, cases.preference_batch())
    reference = precompute_reference_logps(base_graphdef, base_params, batch)
    inside = loss_metrics(DPOLoss(beta=0.1), state, batch)
    given = loss_metrics(DPOLoss(beta=0.1), state, {**batch, **reference})
    assert abs(float(given["rewards/margin"])) > 1e-3  # the adapter moved the policy off its reference
    for key in ("loss", "rewards/margin", "rewards/chosen"):
        np.testing.assert_allclose(float(inside[key]), float(given[key]), rtol=1e-5, atol=1e-6)


def test_adapter_dropout_draws_from_the_step_key_and_only_while_training():
    model = _adapter_lm(dropout=0.5)
    state = TrainState.create(model, cases.optimizer(), trainable=lora.TRAINABLE)
    batch = jax.tree.map(jnp.asarray, cases.sft_batch())
    step = make_train_step(SFTLoss())
    copy = lambda: jax.tree.map(jnp.copy, state)  # the step donates its state
    loss = lambda key: float(step(copy(), batch, key)[1]["loss"])
    assert loss(jax.random.key(0)) == loss(jax.random.key(0))
    assert loss(jax.random.key(0)) != loss(jax.random.key(1))
    # Evaluation never drops: the held-out loss is the adapter model's plain forward.
    plain = float(loss_metrics(SFTLoss(), state, batch)["loss"])
    no_dropout = TrainState.create(_adapter_lm(dropout=0.0), cases.optimizer(), trainable=lora.TRAINABLE)
    assert plain == float(loss_metrics(SFTLoss(), no_dropout, batch)["loss"])
    assert loss(jax.random.key(0)) != plain


# ----------------------------------------------------------------------------------------------
# Stages.


def _adapter_config(data, tokenizer_dir, stages="sft,reward_model,dpo", rank=4):
    config = small_config(data, tokenizer_dir, stages)
    for stage in ("sft", "reward_model", "dpo"):
        config[stage].lora.rank, config[stage].lora.alpha = rank, 8.0
        config[stage].lr = 3e-3  # adapters take larger steps than full fine-tuning
    return config


@pytest.fixture(scope="module")
def adapter_run(fixture_data, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("adapters")
    with count_steps() as steps:
        run(_adapter_config(*fixture_data), workdir)
    assert steps == {"sft": 5, "reward_model": 4, "dpo": 3}
    return workdir


def _logits(model, ids):
    return np.asarray(model(ids), np.float32)


def test_adapter_stages_export_merged_weights_and_a_peft_adapter_of_their_base(adapter_run):
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 300, (2, 12)), jnp.int32)
    sft = load_pretrained(adapter_run / "sft" / "model")
    for stage, kind, base_folder in (("reward_model", "scalar", "sft"), ("dpo", "lm", "sft")):
        config = json.loads((adapter_run / stage / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == 4 and config["lora_alpha"] == 8.0
        assert config["base_model_name_or_path"] == str(adapter_run / base_folder / "model")
        base = load_pretrained(adapter_run / base_folder / "model", kind=kind)
        adapted = load_peft_adapter(base, adapter_run / stage / "adapter")
        merged = load_pretrained(adapter_run / stage / "model", kind=kind)
        np.testing.assert_allclose(_logits(merged, ids), _logits(adapted, ids), rtol=1e-4, atol=1e-4)
        if stage == "dpo":  # trained: the DPO policy is not its SFT base
            assert np.max(np.abs(_logits(merged, ids) - _logits(sft, ids))) > 1e-3
    done = json.loads((adapter_run / "dpo" / "done.json").read_text())
    assert done["steps"] == 3 and np.isfinite(done["loss"])


def test_adapter_dpo_held_out_numbers_equal_a_numpy_rebuild_with_the_sft_model_as_reference(
    adapter_run, fixture_data  # noqa: F811
):
    """The adapter DPO stage computes its reference inside the step (its base with the adapters off):
    done.json's held-out loss and rewards equal numpy's DPO of the exported (merged) DPO policy against
    the exported SFT model. A reference that is the policy itself gives margin 0 and loss ln 2."""
    config = _adapter_config(*fixture_data)
    task = build_task(with_seed(config, 0), adapter_run)
    assert_dpo_done_equals_numpy(adapter_run, task, config.dpo.beta, rel=1e-3)


def test_a_peft_adapter_folder_serves_as_a_model_path(adapter_run, fixture_data, tmp_path):  # noqa: F811
    config = _adapter_config(*fixture_data)
    from_adapter = common.load_model(str(adapter_run / "dpo" / "adapter"), "lm", config)
    merged = load_pretrained(adapter_run / "dpo" / "model")
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 300, (2, 10)), jnp.int32)
    np.testing.assert_allclose(_logits(from_adapter, ids), _logits(merged, ids), rtol=1e-4, atol=1e-4)
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    adapter_config = json.loads((adapter_run / "dpo" / "adapter" / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": ""}))
    with pytest.raises(ModelError, match=r"orphan/adapter_config\.json: base_model_name_or_path is empty"):
        common.load_model(str(orphan), "lm", config)


def test_an_interrupted_adapter_run_resumes_bit_identically(adapter_run, fixture_data, tmp_path):  # noqa: F811
    """DPO with adapters killed after its checkpoint at step 2, then resumed: one step runs (no silent
    restart), and the adapter and metrics equal the uninterrupted run's (the base was put back)."""
    config = _adapter_config(*fixture_data, stages="dpo")
    config.sft.init_from = str(adapter_run / "sft" / "model")
    reference = tmp_path / "a"
    run(config, reference)
    _resume_matches(config, "dpo", 3, reference, tmp_path / "b", ("adapter",))


def _resume_matches(config, stage: str, steps: int, reference, interrupted, adapters) -> None:
    """`config` killed after `stage`'s checkpoint at step 2, then run again: it resumes at 2 (runs only the
    steps after it) and ends with the metrics and the `adapters` folders of the uninterrupted `reference`."""
    from safetensors.numpy import load_file

    with kill_after_checkpoint(stage, 2), pytest.raises(SimulatedFailure):
        run(config, interrupted)
    with count_steps() as resumed:
        run(config, interrupted)
    assert resumed == {stage: steps - 2}
    assert json.loads((interrupted / stage / "done.json").read_text())["resumed_from"] == 2
    same_numbers(
        strip_time(read_metrics(reference / "metrics.jsonl")), strip_time(read_metrics(interrupted / "metrics.jsonl"))
    )
    for folder in adapters:
        a = load_file(str(reference / stage / folder / "adapter_model.safetensors"))
        b = load_file(str(interrupted / stage / folder / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("targets", "q_proj,query", r"config\.dpo\.lora\.targets: \['query'\] are not projections"),
        ("rank", -1, r"config\.dpo\.lora\.rank: must be >= 0"),
        ("dropout", 1.0, r"config\.dpo\.lora\.dropout: must be in \[0, 1\)"),
    ],
)
def test_bad_adapter_settings_name_the_key(fixture_data, key, value, message):  # noqa: F811
    config = _adapter_config(*fixture_data)
    config.dpo.lora[key] = value
    with pytest.raises(ConfigError, match=message):
        validate(config)


# ----------------------------------------------------------------------------------------------
# PPO on one shared base.


def test_shared_base_ppo_equals_ppo_on_the_same_models_held_separately():
    """Rollout, token rewards, GAE and the first update of RTO on one base (adapters for policy, critic,
    reward model, DPO policy; pi_ref = the base) equal those of the same models merged and held apart."""
    shared = cases.shared_base_ppo_state()
    base, reward_model, dpo, critic = cases.shared_base_models()
    graphdef, params = nnx.split(merge_adapters(shared.policy_model(shared.policy.params)))
    policy = nnx.merge(graphdef, jax.tree.map(jnp.copy, params))  # not the shared state's (donated) arrays
    separate = create_ppo_state(
        policy,
        merge_adapters(critic),
        cases.optimizer(),
        cases.optimizer(),
        frozen={"ref": nnx.split(base)[1], "dpo": nnx.split(merge_adapters(dpo))[1]},
        reward_model=merge_adapters(reward_model),
        reward_std=0.5,
    )
    results = []
    for state in (shared, separate):
        # One minibatch: the update's losses are those of the state given (before it moves).
        experience_fn, update_fn, _ = make_ppo_fns(dataclasses.replace(cases.ppo_config(), num_minibatches=1))
        prompts = jax.tree.map(jnp.asarray, cases.prompt_batch())
        experience, rollout = experience_fn(state, prompts, jax.random.key(0))
        _, update = update_fn(state, experience, jax.random.key(1))
        results.append((jax.tree.map(np.asarray, experience), rollout, update))
    (exp_a, roll_a, upd_a), (exp_b, roll_b, upd_b) = results
    np.testing.assert_array_equal(exp_a.input_ids, exp_b.input_ids)  # the same greedy rollout
    for field in ("logp_old", "values", "advantages", "returns"):
        np.testing.assert_allclose(getattr(exp_a, field), getattr(exp_b, field), rtol=1e-4, atol=1e-4)
    assert abs(float(roll_a["kl_to_ref"])) > 1e-3  # the policy's adapters make it differ from pi_ref
    for key in ("score", "kl_to_ref", "reward/total", "reward/dpo"):
        np.testing.assert_allclose(float(roll_a[key]), float(roll_b[key]), rtol=1e-4, atol=1e-4)
    for key in ("loss", "policy_loss", "value_loss", "first/ratio_mean"):
        np.testing.assert_allclose(float(upd_a[key]), float(upd_b[key]), rtol=1e-4, atol=1e-5)
    assert abs(float(upd_a["first/ratio_mean"]) - 1.0) < 1e-5


def test_the_shared_base_state_holds_each_base_array_once():
    """Count the arrays: every base-shaped array of the PPO state is the base's own (no model keeps a copy
    of the backbone), and the rest (adapters, heads, their Adam moments) is a fraction of it."""
    state = cases.shared_base_ppo_state()
    shape_counts = lambda tree: collections.Counter(tuple(x.shape) for x in jax.tree.leaves(tree))
    base_shapes = shape_counts(state.base)
    in_state = shape_counts(state)
    assert {s: in_state[s] for s in base_shapes} == dict(base_shapes)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    trained = nbytes(state.policy.params) + nbytes(state.critic.params)
    assert nbytes(state) - nbytes(state.base) < 3 * trained + nbytes(state.frozen) + 64  # params, 2 moments
    assert "ref" not in state.frozen["models"] and set(state.frozen["models"]) == {"dpo"}


@pytest.fixture(scope="module")
def ppo_adapter_config(adapter_run, fixture_data):  # noqa: F811
    config = _adapter_config(*fixture_data, stages="ppo")
    for stage in ("sft", "reward_model", "dpo"):
        config[stage].init_from = str(adapter_run / stage / "model")  # the adapters beside them are found
    config.ppo.lora.rank, config.ppo.lora.alpha, config.ppo.lr = 4, 8.0, 1e-3
    return config


def test_ppo_on_a_shared_base_trains_exports_and_resumes_bit_identically(adapter_run, ppo_adapter_config, tmp_path):
    config = ppo_adapter_config
    reference = tmp_path / "a"
    with count_steps() as steps:
        run(config, reference)
    assert steps == {"ppo": 4}
    policy_adapter = json.loads((reference / "ppo" / "adapter" / "adapter_config.json").read_text())
    assert policy_adapter["base_model_name_or_path"] == str(adapter_run / "sft" / "model")
    assert (reference / "ppo" / "critic_adapter" / "adapter_model.safetensors").is_file()
    ids = jnp.asarray(np.random.default_rng(2).integers(3, 300, (2, 12)), jnp.int32)
    sft = load_pretrained(adapter_run / "sft" / "model")
    merged = load_pretrained(reference / "ppo" / "model")
    adapted = load_peft_adapter(load_pretrained(adapter_run / "sft" / "model"), reference / "ppo" / "adapter")
    np.testing.assert_allclose(_logits(merged, ids), _logits(adapted, ids), rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(_logits(merged, ids) - _logits(sft, ids))) > 1e-4  # the policy's adapters trained
    _resume_matches(config, "ppo", 4, reference, tmp_path / "b", ("adapter", "critic_adapter"))


def test_shared_base_ppo_refuses_models_that_are_not_adapters_on_the_sft_model(
    adapter_run,
    ppo_adapter_config,
    fixture_data,  # noqa: F811
    tmp_path,
):
    config = ppo_adapter_config.copy_and_resolve_references()
    # The SFT model's own adapter sits beside it, trained on the random-init model, not on the SFT model.
    config.reward_model.init_from = str(adapter_run / "sft" / "model")
    with pytest.raises(ConfigError, match=r"config\.ppo\.lora\.rank: PPO on one shared base needs the reward model"):
        run(config, tmp_path / "a")
    # Trained here without adapters: refused before any work, naming the key to change.
    config = _adapter_config(*fixture_data, stages="sft,reward_model,dpo,ppo")
    config.ppo.lora.rank, config.reward_model.lora.rank = 4, 0
    with pytest.raises(ConfigError, match=r"config\.reward_model\.lora\.rank: ppo\.lora\.rank=4 runs PPO on one"):
        validate(config)


def test_adapter_targets_are_checked_even_off_and_against_the_loaded_architecture(
    adapter_run,
    fixture_data,  # noqa: F811
    tmp_path,
):
    config = small_config(*fixture_data, "sft,reward_model,dpo")
    config.dpo.lora.targets = "q_prj"  # a typo, with adapters off: refused now, not on the day they are on
    with pytest.raises(ConfigError, match=r"config\.dpo\.lora\.targets: \['q_prj'\]"):
        validate(config)
    # A GPT-NeoX projection on the loaded Llama SFT model: only the load knows the architecture.
    config = _adapter_config(*fixture_data, stages="dpo")
    config.sft.init_from = str(adapter_run / "sft" / "model")
    config.dpo.lora.targets = "query_key_value"
    validate(config)
    with pytest.raises(ConfigError, match=r"config\.dpo\.lora\.targets: .*'query_key_value'.* not projections of"):
        run(config, tmp_path / "a")
    assert not (tmp_path / "a" / "dpo" / "done.json").exists()
