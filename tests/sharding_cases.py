"""The steps that the sharding tests run on one device, on meshes and on two processes.

Not a test module: `tests/sharding_worker.py` (8 simulated devices) and `tests/multiprocess_worker.py`
(jax.distributed) import it in their own processes, and the tests import it for the one-device
reference. Every case builds its tiny models from fixed seeds, runs one jitted step (with
`mesh=None`: the plain, unsharded step) and returns host numpy results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from rto_jax import distributed
from rto_jax.data import BatchIterator
from rto_jax.models import CausalLM, LoraConfig, ModelConfig, ScalarHeadModel, default_positions, lora, with_adapters
from rto_jax.objectives.token_rewards import bind, rto
from rto_jax.sampling import SamplingConfig
from rto_jax.train import (
    DPOLoss,
    OptimizerConfig,
    PPOConfig,
    TrainState,
    create_ppo_state,
    create_shared_base_ppo_state,
    make_optimizer,
    make_ppo_fns,
    RewardModelLoss,
    SFTLoss,
    make_train_step,
    sharding,
)

VOCAB, PAD, EOS = 16, 0, 1
P, R = 4, 6
BATCH = 16  # divisible by data x fsdp of every test mesh, and per PPO minibatch (2 of 8)


def model_config(scan: bool, remat: str = "none") -> ModelConfig:
    # d=32, 2 layers. DPO and PPO scan stacked layers (DPO with remat), SFT and the reward model unroll them.
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        scan_layers=scan,
        remat=remat,
    )


def optimizer():
    # Adam's eps 1e-5 (the pipeline's default): with 1e-8 an entry whose gradient is ~1e-8 turns float noise
    # from a different reduction order into a visible update difference (g / (|g| + eps) is steep there).
    return make_optimizer(OptimizerConfig(learning_rate=1e-3, schedule="constant", eps=1e-5))


# ----------------------------------------------------------------------------------------------
# Data: the same global batches on every process; `process_slice` takes one process's rows.


def _prompts(rng, batch):
    lengths = rng.integers(1, P + 1, batch)
    mask = (np.arange(P)[None] >= P - lengths[:, None]).astype(np.int32)
    return np.where(mask > 0, rng.integers(2, VOCAB, (batch, P)), PAD).astype(np.int32), mask


def _responses(rng, batch):
    lengths = rng.integers(2, R + 1, batch)
    mask = (np.arange(R)[None] < lengths[:, None]).astype(np.float32)
    ids = np.where(np.arange(R)[None] == lengths[:, None] - 1, EOS, rng.integers(2, VOCAB, (batch, R)))
    return np.where(mask > 0, ids, PAD).astype(np.int32), mask


def _sequence(prompts, prompt_mask, responses, response_mask) -> dict:
    attention_mask = np.concatenate([prompt_mask, response_mask], 1).astype(np.int32)
    return {
        "input_ids": np.concatenate([prompts, responses], 1).astype(np.int32),
        "attention_mask": attention_mask,
        "positions": np.asarray(default_positions(attention_mask)),
        "response_mask": response_mask.astype(np.float32),
    }


def sft_batch(seed=0) -> dict:
    rng = np.random.default_rng(seed)
    prompts, prompt_mask = _prompts(rng, BATCH)
    return _sequence(prompts, prompt_mask, *_responses(rng, BATCH))


def preference_batch(seed=1) -> dict:
    rng = np.random.default_rng(seed)
    prompts, prompt_mask = _prompts(rng, BATCH)
    out = {}
    for side in ("chosen", "rejected"):
        out.update({f"{side}_{k}": v for k, v in _sequence(prompts, prompt_mask, *_responses(rng, BATCH)).items()})
    return out


def prompt_batch(seed=2) -> dict:
    ids, mask = _prompts(np.random.default_rng(seed), BATCH)
    return {"prompt_ids": ids, "prompt_mask": mask}


# ----------------------------------------------------------------------------------------------
# Host copies of results (gathered across processes when needed).


def to_host(tree) -> list[np.ndarray]:
    leaves = jax.tree.leaves(tree)
    if all(x.is_fully_addressable for x in leaves):
        return [np.asarray(x) for x in leaves]
    return [np.asarray(x) for x in jax.tree.leaves(multihost_utils.process_allgather(leaves, tiled=True))]


def _place_batch(batch, shardings):
    if shardings is None:
        return jax.tree.map(jnp.asarray, batch)
    if jax.process_count() > 1:
        # Each process loads only its rows of the global batch, then the global array is assembled.
        rows = len(next(iter(batch.values())))
        local = next(BatchIterator(batch, rows, shuffle=False, **distributed.process_slice()))
        return distributed.host_local_batch_to_global(local, shardings.batch)
    return jax.device_put(batch, shardings.batch)


def _state(model_fn, mesh, frozen=None):
    if mesh is None:
        return TrainState.create(model_fn(), optimizer(), frozen=frozen)
    return sharding.create_sharded_train_state(model_fn, optimizer(), mesh, frozen=frozen)


def _result(metrics, state_params) -> dict:
    return {"loss": float(metrics["loss"]), "params": to_host(state_params)}


# ----------------------------------------------------------------------------------------------
# Cases.


def run_sft(mesh=None) -> dict:
    state = _state(lambda: CausalLM(model_config(False), nnx.Rngs(0)), mesh)
    shardings = None if mesh is None else sharding.step_shardings(state, mesh)
    state, metrics = make_train_step(SFTLoss(), shardings=shardings)(
        state, _place_batch(sft_batch(), shardings), jax.random.key(0)
    )
    return _result(metrics, state.params)


def run_reward_model(mesh=None) -> dict:
    state = _state(lambda: ScalarHeadModel(model_config(False), nnx.Rngs(1)), mesh)
    shardings = None if mesh is None else sharding.step_shardings(state, mesh)
    batch = _place_batch(preference_batch(), shardings)
    state, metrics = make_train_step(RewardModelLoss(), shardings=shardings)(state, batch, jax.random.key(0))
    return _result(metrics, state.params)


def run_dpo(mesh=None) -> dict:
    """DPO with the reference's parameters in `state.frozen` (so the frozen tree is sharded too)."""
    model_fn = lambda: CausalLM(model_config(True, "full"), nnx.Rngs(0))
    if mesh is None:
        ref = nnx.split(model_fn())[1]
    else:
        ref, _ = sharding.sharded_init(lambda: nnx.split(model_fn())[1], mesh)
    return _dpo_case(_state(model_fn, mesh, frozen={"ref": ref}), mesh)


def _dpo_case(state, mesh) -> dict:
    """One DPO step of `state` (placed on `mesh` already) on the preference batch."""
    shardings = None if mesh is None else sharding.step_shardings(state, mesh)
    batch = _place_batch(preference_batch(), shardings)
    state, metrics = make_train_step(DPOLoss(beta=0.1), shardings=shardings)(state, batch, jax.random.key(0))
    out = _result(metrics, state.params)
    out["margin"] = float(metrics["rewards/margin"])
    return out


def run_dpo_lora(mesh=None) -> dict:
    """DPO training adapters (dropout on) over a frozen base whose adapters-off pass is the reference.
    `lora_b` starts non-zero so the reference differs from the policy and `lora_a` gets gradients."""

    def adapter_state():
        model = with_adapters(CausalLM(model_config(True, "full"), nnx.Rngs(0)), LoraConfig(4, 8.0, 0.1), nnx.Rngs(6))
        return TrainState.create(_randomize_lora_b(model, 10, 0.05), optimizer(), trainable=lora.TRAINABLE)

    state = adapter_state()
    return _dpo_case(state if mesh is None else sharding.shard_tree(state, mesh), mesh)


def ppo_config(**fields) -> PPOConfig:
    sampling_config = SamplingConfig(max_new_tokens=R, eos_id=EOS, pad_id=PAD, greedy=True)
    # vocab_chunk 6 of 16: the sliced LM head (the last slice overlapping) on every mesh, vocab-split ones included.
    return PPOConfig(
        sampling=sampling_config, token_reward=bind(rto), ppo_epochs=1, num_minibatches=2, vocab_chunk=6, **fields
    )


# Critic-free, each prompt answered twice: one prefill per prompt, its KV cache repeated inside the step
# (REINFORCE++: batch-whitened returns, so greedy twin answers still get non-zero advantages).
GROUPS = {"estimator": "reinforce_pp", "samples_per_prompt": 2}


def ppo_state(mesh=None, with_critic=True):
    policy = CausalLM(model_config(True), nnx.Rngs(2))
    critic = ScalarHeadModel.from_causal_lm(policy, nnx.Rngs(3)) if with_critic else None
    reward_model = ScalarHeadModel(model_config(False), nnx.Rngs(5))
    dpo_params = nnx.split(CausalLM(model_config(True), nnx.Rngs(4)))[1]
    ref_params = nnx.split(policy)[1]
    state = create_ppo_state(
        policy,
        critic,
        optimizer(),
        optimizer(),
        frozen={"ref": ref_params, "dpo": dpo_params},
        reward_model=reward_model,
        reward_std=0.5,
    )
    return state if mesh is None else sharding.shard_tree(state, mesh)


def _randomize_lora_b(model, seed: int, scale: float = 0.1):
    """A trained-looking adapter: B non-zero, so the adapter model differs from its base."""
    for i, (key, var) in enumerate(nnx.to_flat_state(lora.adapter_state(model))):
        if key[-1] == "lora_b":
            var[...] = scale * jax.random.normal(jax.random.key(seed + i), var.shape)
    return model


def shared_base_models():
    """A base LM and adapter models on it: reward model (rank 4, every projection, its own head), DPO
    policy (rank 2 on q/v only: a graphdef of its own), and the critic (the reward model rescaled)."""
    base = CausalLM(model_config(True), nnx.Rngs(2))
    reward_model = ScalarHeadModel(model_config(True), nnx.Rngs(5), decoder=base.decoder)
    reward_model = _randomize_lora_b(with_adapters(reward_model, LoraConfig(4, 8.0), nnx.Rngs(7)), 100)
    dpo = _randomize_lora_b(with_adapters(base, LoraConfig(2, 4.0, targets=("q_proj", "v_proj")), nnx.Rngs(8)), 200)
    return base, reward_model, dpo, reward_model.with_affine_output(2.0, -0.5)


def shared_base_ppo_state(mesh=None):
    """RTO's PPO state on one base; the policy's adapters made non-zero so that pi_ref (the base) differs."""
    base, reward_model, dpo, critic = shared_base_models()
    state = create_shared_base_ppo_state(
        base, LoraConfig(4, 8.0), critic, optimizer(), optimizer(),
        frozen={"dpo": dpo}, reward_model=reward_model, reward_std=0.5, rngs=nnx.Rngs(9),
    )  # fmt: skip
    params = dict(nnx.to_flat_state(state.policy.params))
    for i, (key, var) in enumerate(params.items()):
        if key[-1] == "lora_b":
            params[key] = var.replace(0.1 * jax.random.normal(jax.random.key(300 + i), var.shape))
    state = state.replace(policy=state.policy.replace(params=nnx.from_flat_state(params)))
    return state if mesh is None else sharding.shard_tree(state, mesh)


def _ppo_case(state, mesh, config=None, prompts=None) -> dict:
    shardings = None if mesh is None else sharding.step_shardings(state, mesh)
    experience_fn, update_fn, _ = make_ppo_fns(config or ppo_config(), shardings=shardings)
    prompts = prompts or prompt_batch()
    experience, rollout_metrics = experience_fn(state, _place_batch(prompts, shardings), jax.random.key(0))
    experience_host = to_host(experience)
    state, metrics = update_fn(state, experience, jax.random.key(1))
    trained = state.policy.params if state.critic is None else (state.policy.params, state.critic.params)
    return {
        "tokens": experience_host[0],
        "advantages": experience_host[6],
        "score": float(rollout_metrics["score"]),
        "loss": float(metrics["loss"]),
        "params": to_host(trained),
    }


def run_ppo_groups(mesh=None) -> dict:
    """Critic-free PPO on BATCH / 2 prompts answered twice each (the sampler's shared prefill)."""
    half = {k: v[: BATCH // 2] for k, v in prompt_batch().items()}
    return _ppo_case(ppo_state(mesh, with_critic=False), mesh, ppo_config(**GROUPS), half)


def run_ppo_lora(mesh=None) -> dict:
    """A PPO/RTO iteration on one shared base (adapters for policy, critic, reward model and DPO policy)."""
    return _ppo_case(shared_base_ppo_state(mesh), mesh)


def run_ppo(mesh=None) -> dict:
    """A PPO/RTO iteration as its two jitted halves: the greedy rollout + scoring, then the update."""
    return _ppo_case(ppo_state(mesh), mesh)


# The meshes of tests/sharding_worker.py: the batch over data only, data x fsdp, and all three axes.
MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
# The variants of a step (adapters on a shared base, critic-free PPO on groups) change which parameters
# and rows it holds, not how an axis splits them: they run on the mesh that splits all three axes.
VARIANTS = ("dpo_lora", "ppo_lora", "ppo_groups")
VARIANT_MESHES = ((2, 2, 2),)

CASES = {
    "sft": run_sft,
    "reward_model": run_reward_model,
    "dpo": run_dpo,
    "dpo_lora": run_dpo_lora,
    "ppo": run_ppo,
    "ppo_lora": run_ppo_lora,
    "ppo_groups": run_ppo_groups,
}


def max_differences(a: dict, b: dict) -> dict:
    """Largest absolute difference of every float field, and whether token arrays agree exactly."""
    out = {}
    for key, value in a.items():
        if key == "tokens":
            out[key] = bool(np.array_equal(value, b[key]))
        elif key == "params":
            assert len(value) == len(b[key]), "different parameter trees"
            out[key] = max(float(np.max(np.abs(x - y))) for x, y in zip(value, b[key]))
        else:
            out[key] = float(np.max(np.abs(np.asarray(value) - np.asarray(b[key]))))
    return out
