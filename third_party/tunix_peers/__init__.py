"""The JAX peer of our benchmark: google-tunix (the JAX post-training library), built for a benchmark shape.

benchmarks/tunix_rows.py times these against our rows; this module only builds tunix's own objects
(its Llama 3 model, `DPOTrainer`, and the `RLCluster` + `PPOLearner` of its PPO) from the installed
`google-tunix` package. It runs in its own environment (`make tunix-env`: .venv-tunix), never in the
project's, and imports nothing from rto_jax. A `shape` is one entry of `benchmarks.workloads.SHAPES`.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx

__all__ = ["ScoreModel", "TokenTokenizer", "dpo_trainer", "llama", "llama_config", "ppo_learner"]


def llama_config(shape: dict):
    """tunix's Llama 3 `ModelConfig` of `shape` (GQA, explicit head_dim, tied embeddings, RoPE theta)."""
    from tunix.models.llama3 import model as llama_lib

    return llama_lib.ModelConfig(
        num_layers=shape["num_layers"],
        vocab_size=shape["vocab_size"],
        embed_dim=shape["hidden_size"],
        hidden_dim=shape["intermediate_size"],
        num_heads=shape["num_heads"],
        head_dim=shape["head_dim"],
        num_kv_heads=shape["num_kv_heads"],
        rope_theta=int(shape["rope_theta"]),
        norm_eps=shape["norm_eps"],
        weight_tying=shape["tie_word_embeddings"],
    )


def llama(shape: dict, seed: int = 0):
    """tunix's `Llama3` of `shape`, random init from its own initialisers (no download)."""
    from tunix.models.llama3 import model as llama_lib

    return llama_lib.Llama3(llama_config(shape), rngs=nnx.Rngs(params=seed))


class ScoreModel(nnx.Module):
    """tunix's Llama 3 trunk (embedder, layers, final norm) + a bias-free scalar head: `[B, T, 1]`.

    tunix 0.1.7 ships no score-head Llama, and its PPO critic and reward model must return `[B, T, 1]`;
    this is our ScalarHeadModel's architecture in tunix's modules.
    """

    def __init__(self, shape: dict, seed: int):
        from tunix.models.llama3 import model as llama_lib

        config = llama_config(shape)
        rngs = nnx.Rngs(params=seed)
        self.config = config
        self.backbone = llama_lib.Llama3(config, rngs=rngs)
        self.score = nnx.Linear(config.embed_dim, 1, use_bias=False, rngs=rngs)

    def __call__(self, input_tokens, positions, cache, attention_mask, **kwargs):
        del cache, kwargs
        x = self.backbone.embedder.encode(input_tokens)
        for layer in self.backbone.layers:
            _, x = layer(x, positions, None, attention_mask)
        return self.score(self.backbone.final_norm(x))


class TokenTokenizer:
    """A local tokenizer for tunix's PPO, which takes prompts as text: the words "t17 t5 ..." are token
    ids 17, 5, ... (one word, one id), so a prompt of P words is exactly P tokens and no hub is needed.
    Pad 0, BOS 1 is never added (`bos_id` None), EOS is `eos_id`."""

    def __init__(self, vocab_size: int, eos_id: int):
        self.vocab_size = vocab_size
        self._eos = eos_id

    def pad_id(self):
        return 0

    def bos_id(self):
        return None

    def eos_id(self):
        return self._eos

    def encode(self, text, **kwargs):
        if isinstance(text, np.ndarray):  # tunix's data pipeline hands each prompt over as a numpy str array
            text = str(text.reshape(-1)[0])
        return [int(word[1:]) for word in str(text).split()]

    def decode(self, ids, **kwargs):
        return " ".join(f"t{int(i)}" for i in ids)


def dpo_trainer(policy, reference, *, beta: float = 0.1, learning_rate: float = 1e-5, max_steps: int):
    """tunix's `DPOTrainer` (sigmoid loss, reference model in the step) with AdamW after clipping at 1.0."""
    from tunix.sft.dpo import dpo_trainer as dpo_lib

    config = dpo_lib.DPOTrainingConfig(eval_every_n_steps=10**9, max_steps=max_steps, beta=beta, pbar_description=None)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, b1=0.9, b2=0.95))
    return dpo_lib.DPOTrainer(model=policy, ref_model=reference, optimizer=optimizer, training_config=config)


def dpo_input(prompt_ids, chosen_ids, rejected_ids):
    """tunix's pre-tokenized DPO input (prompt left-padded, responses right-padded; here no padding)."""
    import jax.numpy as jnp
    from tunix.sft.dpo import dpo_trainer as dpo_lib

    ones = lambda x: jnp.ones(x.shape, jnp.int32)
    as_ids = lambda x: jnp.asarray(x, jnp.int32)
    return dpo_lib.TrainingInput(
        prompt_ids=as_ids(prompt_ids),
        prompt_mask=ones(prompt_ids),
        chosen_ids=as_ids(chosen_ids),
        chosen_mask=ones(chosen_ids),
        rejected_ids=as_ids(rejected_ids),
        rejected_mask=ones(rejected_ids),
    )


def ppo_learner(shape: dict, *, batch: int, prompt: int, new_tokens: int, iterations: int, eos_id: int):
    """tunix's PPO: an `RLCluster` (actor, reference, critic and reward model on one single-device mesh,
    its own "vanilla" JAX sampler with a KV cache) and a `PPOLearner` (one epoch, one minibatch, gamma 1,
    lambda 0.95, KL beta 0.04) for `iterations` iterations of `batch` prompts. Returns (learner, cluster)."""
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.ppo import ppo_learner as ppo_lib
    from tunix.rl.rollout import base_rollout

    # Auto axis types: with jax 0.10's default (Explicit) mesh, tunix's sampler fails in its embedding gather.
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    adamw = lambda lr: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, b1=0.9, b2=0.95))
    training = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=adamw(1e-5),
        critic_optimizer=adamw(1e-5),
        eval_every_n_steps=10**9,
        max_steps=iterations,
        mini_batch_size=batch,
    )
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=new_tokens,
        max_prompt_length=prompt,
        kv_cache_size=prompt + new_tokens + 8,
        temperature=1.0,
        top_p=1.0,
        top_k=None,
    )
    cluster = rl_cluster_lib.RLCluster(
        actor=llama(shape, 0),
        critic=ScoreModel(shape, 1),
        reference=llama(shape, 0),
        reward=ScoreModel(shape, 2),
        tokenizer=TokenTokenizer(shape["vocab_size"], eos_id),
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh=dict.fromkeys(rl_cluster_lib.Role, mesh),
            rollout_engine="vanilla",
            offload_to_cpu=False,
            training_config=training,
            rollout_config=rollout,
        ),
    )
    config = ppo_lib.PPOConfig(num_iterations=1, beta=0.04, gamma=1.0, gae_lambda=0.95)
    return ppo_lib.PPOLearner(rl_cluster=cluster, ppo_config=config, reward_fns=None), cluster
