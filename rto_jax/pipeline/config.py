"""The experiment config (an `ml_collections.ConfigDict`) and its validation.

`base_config()` holds every field with its default and a one-line comment; the files in `configs/`
start from it and set a preset. `config.recipe` names the experiment file that composes the stages
(rto_jax/pipeline/recipes.py); `config.ppo.reward_args` are its token reward's coefficients. `validate(config, workdir)` runs before any work and raises
`ConfigError` naming the offending key (`config.ppo.lr: ...`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ml_collections import config_dict

from rto_jax.data.synthetic import SyntheticTaskConfig
from rto_jax.errors import ConfigError
from rto_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from rto_jax.models.lora import PROJECTIONS, LoraConfig, parse_targets
from rto_jax.objectives.advantages import ESTIMATORS, GROUP_ESTIMATORS
from rto_jax.objectives.masked import LOSS_AVERAGES
from rto_jax.objectives.token_rewards import bind, frozen_models, needs_reward_model, reward_args, rto
from rto_jax.train.ppo import PRM_UPDATES, PPOConfig
from rto_jax.train.state import OptimizerConfig
from rto_jax.train.steps import DPOLoss

STAGES = ("sft", "preferences", "reward_model", "dpo", "ppo", "evaluate")
TRAINED_STAGES = ("sft", "reward_model", "dpo", "ppo")


def _source(path: str = "", format: str = "tldr_sft") -> config_dict.ConfigDict:  # pylint: disable=redefined-builtin
    """One data source (rto_jax.data loader fields); P, R and the special ids are shared in `config.data`."""
    s = config_dict.ConfigDict()
    s.path = path  # hub dataset id or local .jsonl/.json/.parquet/.csv(.gz) file or folder; '' = unused
    s.format = format  # row format (rto_jax.data.FORMATS), e.g. tldr_sft, tldr_preference, hh_rlhf, ultrafeedback
    s.split = "train"  # hub split of the training rows (ignored for local files)
    s.name = config_dict.placeholder(str)  # hub dataset config name
    s.revision = config_dict.placeholder(str)  # hub revision
    s.data_dir = config_dict.placeholder(str)  # hub data_dir (e.g. 'harmless-base' for Anthropic/hh-rlhf)
    s.max_rows = config_dict.placeholder(int)  # keep only the first max_rows rows (None: all)
    s.column_map = ""  # 'field=column,...' column overrides, e.g. 'response=postprocessed_response'
    s.eval_path = ""  # held-out rows from this source (same format); '' = split off config.data.eval_size rows
    s.eval_split = "validation"  # hub split of eval_path
    return s


def _optimizer(stage: config_dict.ConfigDict, lr: float) -> None:
    """Optimizer fields shared by the trained stages (rto_jax.train.OptimizerConfig)."""
    opt = _defaults(OptimizerConfig)
    stage.lr = lr  # peak learning rate
    stage.schedule = opt["schedule"]  # 'cosine', 'linear' (decay to 0) or 'constant', after the warmup
    stage.warmup_steps = opt["warmup_steps"]  # linear warmup steps
    stage.weight_decay = opt["weight_decay"]  # AdamW decoupled weight decay
    stage.b1 = opt["b1"]  # Adam beta1
    stage.b2 = opt["b2"]  # Adam beta2
    stage.adam_eps = opt["eps"]  # Adam epsilon
    stage.max_grad_norm = opt["max_grad_norm"]  # global gradient-norm clip; <= 0 disables


def _lora(stage: config_dict.ConfigDict) -> None:
    """Low-rank adapter fields of a trained stage (rto_jax.models.LoraConfig; `common.lora_config` reads them)."""
    lora = _defaults(LoraConfig)
    stage.lora = config_dict.ConfigDict()
    # > 0: train adapters of this rank (and a scalar head) over the frozen model instead of every weight;
    # 0: full fine-tuning. (LoraConfig's own default rank, when adapters are asked for in code, is 8.)
    stage.lora.rank = 0
    stage.lora.alpha = lora["alpha"]  # the adapter's update is scaled by alpha / rank
    stage.lora.dropout = lora["dropout"]  # dropout on the adapters' input while training
    stage.lora.targets = ",".join(lora["targets"])  # comma-separated projections to adapt; '' = all of them


def _defaults(cls) -> dict:
    """A dataclass's field defaults: configs derive theirs from the dataclasses, the only place they are set."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _from_dataclass(cls) -> config_dict.ConfigDict:
    """A ConfigDict of a dataclass's fields and defaults (the dataclass stays the only place they are set)."""
    out = config_dict.ConfigDict()
    for field in dataclasses.fields(cls):
        value = field.default
        out[field.name] = config_dict.placeholder(float) if value is None else value
    return out


def base_config() -> config_dict.ConfigDict:
    """Every field of an experiment, with defaults close to the RTO paper / N+ TL;DR recipe."""
    c = config_dict.ConfigDict()
    c.name = "rto"  # experiment name (printed and stored in results.json)
    c.seeds = "0"  # comma-separated seeds ('3,4,5': one run each in workdir/seed_N); model init, data, sampling
    c.recipe = "experiments/rto.py"  # the recipe file that composes the stages (path, or relative to the repo root)
    c.stages = "sft,reward_model,dpo,ppo,evaluate"  # stages to run, in the order of STAGES (+ preferences: synthetic)
    # Its SFT, reward model and DPO models and tokenizer are taken as they are (a stage's own init_from
    # still wins), so only PPO and the evaluation run.
    c.reuse_models_from = ""  # a finished run's workdir to take the models from; '' = none

    c.model = config_dict.ConfigDict()
    c.model.init_from = ""  # SFT's base model: HF folder, .gguf or hub id 'owner/name[@revision]'; '' = random init
    c.model.arch = "llama"  # random init only: 'llama' or 'gpt_neox'
    c.model.hidden_size = 64  # random init only: d
    c.model.intermediate_size = 256  # random init only: MLP width
    c.model.num_layers = 2  # random init only: blocks
    c.model.num_heads = 4  # random init only: attention heads
    c.model.num_kv_heads = 4  # random init only: key/value heads (GQA when < num_heads)
    c.model.head_dim = 16  # random init only: per-head width
    c.model.max_position_embeddings = 1024  # random init only: longest sequence (must be >= P + R)
    c.model.tie_word_embeddings = False  # random init only: LM head shares the embedding
    c.model.dtype = "float32"  # compute dtype 'float32' or 'bfloat16' (params stay float32)
    c.model.scan_layers = False  # lax.scan over stacked layers (flat compile time in depth)
    c.model.remat = "none"  # rematerialization per block: 'none', 'full' or 'dots'
    c.model.attention = "auto"  # 'auto' (per backend, length), 'xla', 'blockwise', 'cudnn', 'splash' (docs/performance.md)

    c.tokenizer = config_dict.ConfigDict()
    c.tokenizer.path = ""  # HF folder/hub id/.gguf; '' = the first given of model.init_from, sft/rm/dpo/ppo.init_from
    c.tokenizer.bpe_vocab_size = 0  # > 0: train a byte-level BPE of this size on the data (saved in workdir/tokenizer)
    c.tokenizer.bpe_max_texts = 20000  # at most this many data strings train the BPE

    c.data = config_dict.ConfigDict()
    c.data.source = "text"  # 'text' (the datasets below + a tokenizer) or 'synthetic' (config.synthetic)
    c.data.max_prompt_len = 512  # P: prompts are left-padded / truncated (keeping their end) to P tokens
    c.data.max_response_len = 53  # R: responses (+EOS) are right-padded / truncated to R tokens, also rollout length
    c.data.pad_id = config_dict.placeholder(int)  # pad token id (must differ from EOS); None = the tokenizer's
    c.data.eos_id = config_dict.placeholder(int)  # EOS token id; None = the tokenizer's
    c.data.prompt_truncation = "auto"  # 'auto', 'left' (keep the last P tokens) or 'tldr_post' (shorten the POST)
    c.data.skip_long_prompts = False  # skip prompts longer than P instead of truncating them
    c.data.drop_truncated_responses = False  # skip rows whose response+EOS exceeds R (else truncated, without EOS)
    c.data.add_bos = config_dict.placeholder(bool)  # None: follow the tokenizer; True/False: force/never a BOS
    c.data.cache_dir = config_dict.placeholder(str)  # datasets cache folder (None: the default)
    c.data.eval_size = 0.05  # held-out share (< 1) or count of each source without eval_path (grouped by prompt)
    c.data.sft = _source("", "tldr_sft")  # SFT pairs; '' path = the chosen responses of the preference data
    c.data.preference = _source("", "tldr_preference")  # preference pairs for the reward model and DPO

    c.sft = config_dict.ConfigDict()
    c.sft.init_from = ""  # take this SFT model (HF folder, .gguf, hub id) instead of training one
    c.sft.batch_size = 128  # sequences per optimizer step (N+: 128)
    c.sft.num_epochs = 1  # passes over the SFT data
    c.sft.max_steps = 0  # > 0: stop after this many steps (caps num_epochs)
    c.sft.grad_accum_steps = 1  # micro-batches per step (batch_size must be divisible)
    c.sft.eval_every = 0  # > 0: held-out loss every this many steps (and always at the end)
    c.sft.eval_batch_size = 32  # sequences per evaluation forward pass
    _optimizer(c.sft, 3e-6)
    _lora(c.sft)

    c.reward_model = config_dict.ConfigDict()
    c.reward_model.init_from = ""  # take this reward model (ScalarHead HF folder or hub id) instead of training one
    c.reward_model.batch_size = 64  # preference pairs per optimizer step (N+: 64)
    c.reward_model.num_epochs = 1  # passes over the preference data
    c.reward_model.max_steps = 0  # > 0: stop after this many steps
    c.reward_model.grad_accum_steps = 1  # micro-batches per step
    c.reward_model.margin = False  # use the data's `margin` column in the Bradley-Terry loss
    c.reward_model.eval_every = 0  # > 0: held-out accuracy every this many steps (and always at the end)
    c.reward_model.eval_batch_size = 32  # pairs per evaluation forward pass
    c.reward_model.normalize_on = "reference"  # score stats for PPO from 'reference' responses or 'sft_samples'
    c.reward_model.normalize_rows = 1024  # prompts used for the score mean/std
    _optimizer(c.reward_model, 3e-6)
    _lora(c.reward_model)

    c.dpo = config_dict.ConfigDict()
    c.dpo.init_from = ""  # take this DPO policy instead of training one
    dpo = _defaults(DPOLoss)
    c.dpo.beta = dpo["beta"]  # DPO beta
    c.dpo.loss_type = dpo["loss_type"]  # 'sigmoid', 'ipo', 'hinge' or 'robust'
    c.dpo.label_smoothing = dpo["label_smoothing"]  # eps of conservative / robust DPO
    c.dpo.batch_size = 64  # preference pairs per optimizer step
    c.dpo.num_epochs = 1  # passes over the preference data
    c.dpo.max_steps = 0  # > 0: stop after this many steps
    c.dpo.grad_accum_steps = 1  # micro-batches per step
    c.dpo.eval_every = 0  # > 0: held-out DPO metrics every this many steps (and always at the end)
    c.dpo.eval_batch_size = 32  # pairs per evaluation forward pass
    _optimizer(c.dpo, 3e-6)
    _lora(c.dpo)

    c.ppo = config_dict.ConfigDict()
    ppo = _defaults(PPOConfig)  # PPO's switches: defaults in rto_jax.train.PPOConfig
    c.ppo.init_from = ""  # take this trained policy (to evaluate) instead of running PPO
    # Coefficients of the recipe's token reward (keyword arguments; defaults from its signature).
    c.ppo.reward_args = config_dict.ConfigDict(reward_args(rto))  # recipes.set_recipe() resets them
    c.ppo.rollout_batch_size = 512  # responses per PPO iteration: prompts x samples_per_prompt (N+: 512)
    c.ppo.total_episodes = 1_000_000  # rollouts in all; iterations = total_episodes // rollout_batch_size
    c.ppo.max_steps = 0  # > 0: stop after this many iterations
    c.ppo.ppo_epochs = ppo["ppo_epochs"]  # passes over each rollout batch
    c.ppo.num_minibatches = ppo["num_minibatches"]  # minibatches per pass
    c.ppo.temperature = 0.7  # rollout temperature, also applied to every log-prob (N+: 0.7)
    c.ppo.top_k = 0  # rollout top-k filter; 0 = off
    c.ppo.top_p = 1.0  # rollout nucleus filter; 1 = off
    c.ppo.estimator = ppo["estimator"]  # advantages: "gae" (critic) or critic-free grpo/dr_grpo/rloo/reinforce_pp(_baseline)
    c.ppo.samples_per_prompt = ppo["samples_per_prompt"]  # responses per prompt in a rollout (a group)
    c.ppo.gamma = ppo["gamma"]  # discount of the returns (every estimator)
    c.ppo.lam = ppo["lam"]  # GAE lambda
    c.ppo.clip_eps = ppo["clip_eps"]  # policy ratio clip
    c.ppo.value_clip_eps = ppo["value_clip_eps"]  # value clip
    c.ppo.vf_coef = ppo["vf_coef"]  # value-loss weight
    c.ppo.entropy_coef = ppo["entropy_coef"]  # entropy bonus
    c.ppo.score_clip = ppo["score_clip"]  # the normalized reward-model score is clipped to [-score_clip, score_clip]
    c.ppo.missing_eos_penalty = ppo["missing_eos_penalty"]  # subtracted from the score of responses without EOS
    c.ppo.whiten_advantages = ppo["whiten_advantages"]  # whiten GAE's advantages over the rollout batch
    c.ppo.loss_average = ppo["loss_average"]  # "token" (all valid tokens) or "sequence" (per response, then batch)
    c.ppo.vocab_chunk = ppo["vocab_chunk"]  # LM head over vocab slices of this size (no [B, R, V] logits); 0 = whole
    c.ppo.stack_frozen = ppo["stack_frozen"]  # score the frozen LMs in one pass vmapped over stacked parameters
    c.ppo.recompute_policy_logprobs = ppo["recompute_policy_logprobs"]  # False: the sampler's log-probs are pi_old's
    # Online implicit PRM (PRIME; rto_jax/objectives/implicit_prm.py): the model of this name the token
    # reward reads (e.g. "dpo") keeps training during PPO on each rollout, by the cross-entropy of its
    # implicit reward against outcome labels from the reward model's score.
    c.ppo.online_prm = ppo["online_prm"]  # the reward's model trained online as the PRM, e.g. "dpo"; '' = all frozen
    c.ppo.prm_beta = ppo["prm_beta"]  # the implicit reward's scale in the PRM's loss
    c.ppo.prm_labels = ppo["prm_labels"]  # labels from the normalized score s: "soft" sigmoid(s), "binary" [s > 0], "group" vs the prompt's mean
    c.ppo.prm_update = ppo["prm_update"]  # "before": train the PRM, then score the rollout with it; "after": the reverse
    c.ppo.prm_lr = config_dict.placeholder(float)  # the online PRM's learning rate; None = ppo.lr
    c.ppo.eval_every = 0  # > 0: gold reward on the held-out prompts every this many iterations (gold tasks)
    c.ppo.critic_lr = config_dict.placeholder(float)  # critic learning rate; None = ppo.lr
    # Recipes that train several token rewards (experiments/synthetic_compare.py): each method's own
    # deviations from the values above, 'method:key=value,...;method:...' (key: lr, critic_lr or a
    # coefficient of the method's reward), e.g. 'ppo:lr=1e-4,beta_kl=0.05;rto:beta_dpo=0.1'.
    c.ppo.per_method = ""  # '' = every method takes the shared values
    _optimizer(c.ppo, 3e-6)
    # lora.rank > 0: PPO on one frozen base, the SFT model held once: the policy trains adapters on it,
    # pi_ref is the base itself, and the critic, reward model and DPO policy are their adapters on it
    # (so reward_model.lora.rank and dpo.lora.rank must be > 0 too).
    _lora(c.ppo)

    c.evaluate = config_dict.ConfigDict()
    c.evaluate.num_prompts = 256  # held-out prompts per policy (0 = all)
    c.evaluate.batch_size = 32  # prompts per sampling call
    c.evaluate.temperature = 0.7  # sampling temperature (also of the log-probs behind KL)
    c.evaluate.greedy = False  # argmax decoding instead of sampling
    c.evaluate.judge = ""  # win-rate judge: reward-model folder/hub id; '' = this run's reward model
    c.evaluate.policies = ""  # extra policies 'name=path,...' to evaluate next to this run's
    c.evaluate.num_samples_logged = 8  # samples per policy in evaluate/samples_<policy>.jsonl and tokens_<policy>.html

    # The synthetic task (data.source = 'synthetic'; rto_jax/data/synthetic.py), drawn from the seed.
    c.synthetic = config_dict.ConfigDict()
    c.synthetic.task = _from_dataclass(SyntheticTaskConfig)  # the task's definition (SyntheticTaskConfig fields)
    c.synthetic.sft_examples = 20_000  # (prompt, reference response) pairs from the reference source
    c.synthetic.sft_eval_examples = 512  # held-out pairs (SFT loss)
    c.synthetic.preference_pairs = 4096  # prompts with two pi_sft samples each, labelled by the gold reward
    c.synthetic.best_of_n = 64  # largest n of the best-of-n frontier (gold reward vs KL, from pi_sft)
    c.synthetic.best_of_n_prompts = 128  # held-out prompts of the frontier (n samples each)

    c.collapse_steps = 5  # warn when gradients are exactly 0 or the loss is flat this many steps; 0 = off
    c.resume_with_changes = False  # resume a workdir although the config changed (else refused; docs/runs.md#resuming-and-what-interrupts-a-run)

    c.checkpoint = config_dict.ConfigDict()
    c.checkpoint.every_steps = 100  # orbax checkpoint every this many steps (and at the end of a stage)
    c.checkpoint.keep = 1  # keep the last k checkpoints per stage (saves are atomic: one is enough to resume)
    c.checkpoint.keep_after_stage = False  # keep a finished stage's checkpoints (its exported model remains)

    c.mesh = config_dict.ConfigDict()
    c.mesh.data = -1  # data-parallel mesh axis size; -1 = the devices left after fsdp x tensor
    c.mesh.fsdp = 1  # fully-sharded (ZeRO-3) mesh axis size: parameters and optimizer states split over it
    c.mesh.tensor = 1  # tensor-parallel mesh axis size (heads, MLP width); data x fsdp x tensor = device count

    c.distributed = config_dict.ConfigDict()
    c.distributed.coordinator_address = ""  # 'host:port' of process 0 for multi-process runs; '' = env/auto/single
    c.distributed.num_processes = 0  # processes of a multi-process run (with coordinator_address); 0 = from env
    c.distributed.process_id = -1  # this process's index (with coordinator_address); -1 = from env
    c.distributed.local_device_ids = ""  # comma-separated local devices of this process (e.g. '0'); '' = all
    c.distributed.auto = False  # jax.distributed.initialize() with JAX's cluster detection (SLURM, TPU VMs)

    return c


# ----------------------------------------------------------------------------------------------
# Derived values.


def stage_list(config) -> list[str]:
    return [s.strip() for s in str(config.stages).split(",") if s.strip()]


def recipe_token_reward(config):
    """The token reward of the config's recipe, bound to `config.ppo.reward_args`."""
    from rto_jax.pipeline.recipes import load_recipe

    return bind(load_recipe(config.recipe).TOKEN_REWARD, **config.ppo.reward_args.to_dict())


def parse_seeds(value) -> list[int]:
    """`config.seeds` ('3,4,5' or one int) -> [3, 4, 5]."""
    try:
        seeds = [int(s) for s in str(value).split(",") if s.strip()]
    except ValueError:
        raise ConfigError("seeds", f"expected comma-separated integers like '3,4,5', got {value!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", f"expected distinct integers like '3,4,5', got {value!r}")
    return seeds


def parse_policies(value: str) -> dict[str, str]:
    """'name=path,...' -> {name: path}."""
    out = {}
    for item in filter(None, (s.strip() for s in value.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"expected 'name=path', got {item!r}")
        out[name.strip()] = path.strip()
    return out


PER_METHOD_PPO_KEYS = ("lr", "critic_lr", "prm_lr")  # config.ppo keys a method may set for itself


def parse_method_values(value: str, *, several: bool = False) -> dict[str, dict]:
    """'ppo:lr=1e-4,beta_kl=0.05;rto:beta_dpo=0.1' -> {'ppo': {'lr': 1e-4, 'beta_kl': 0.05}, 'rto': {...}};
    with several=True each value is 'a|b|...' -> [a, b, ...] (the axes of a grid)."""
    block_form = "method: key=v1|v2, ..." if several else "method:key=value,..."
    item_form = "key=number|number..." if several else "key=number"
    out: dict[str, dict] = {}
    for block in filter(None, (b.strip() for b in value.split(";"))):
        method, sep, items = block.partition(":")
        method = method.strip()
        if not sep or not method:
            raise ValueError(f"expected '{block_form}', got {block!r}")
        values = out.setdefault(method, {})
        for item in filter(None, (i.strip() for i in items.split(","))):
            key, sep, numbers = item.partition("=")
            try:
                if not sep or not key.strip():
                    raise ValueError
                values[key.strip()] = [float(n) for n in numbers.split("|")] if several else float(numbers)
            except ValueError:
                raise ValueError(f"{method}: expected '{item_form}', got {item!r}") from None
    return out


def parse_per_method(value: str) -> dict[str, dict[str, float]]:
    """config.ppo.per_method -> {method: {key: value}} (`parse_method_values`)."""
    return parse_method_values(value)


def check_method_args(key: str, methods: dict, values: dict[str, dict[str, float]]) -> None:
    """ConfigError naming `key` unless every method of `values` is in `methods` {name: token reward}
    and each of its keys is a per-method PPO key or a coefficient of its reward, with a value >= 0."""
    for method, args in values.items():
        if method not in methods:
            raise ConfigError(key, f"no method {method!r}; methods: {', '.join(methods)}")
        allowed = (*PER_METHOD_PPO_KEYS, *reward_args(methods[method]))
        for name, value in args.items():
            if name not in allowed:
                raise ConfigError(key, f"{method}: {name!r} is not one of {', '.join(allowed)}")
            if value < 0 or (name in PER_METHOD_PPO_KEYS and value == 0):
                raise ConfigError(
                    key, f"{method}: {name}={value:g} must be {'> 0' if name in PER_METHOD_PPO_KEYS else '>= 0'}"
                )


def check_estimator(estimator, samples_per_prompt, rollout_batch_size: int, where: str = "") -> None:
    """ConfigError naming `ppo.estimator` / `ppo.samples_per_prompt` (`where`: whose values, e.g. a
    recipe's method) unless the estimator exists and its groups fit the rollout batch."""
    if estimator not in ESTIMATORS:
        raise ConfigError("ppo.estimator", f"{where}must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if isinstance(samples_per_prompt, bool) or not isinstance(samples_per_prompt, int) or samples_per_prompt < 1:
        raise ConfigError("ppo.samples_per_prompt", f"{where}must be an integer >= 1, got {samples_per_prompt!r}")
    if rollout_batch_size % samples_per_prompt:
        raise ConfigError(
            "ppo.samples_per_prompt",
            f"{where}{samples_per_prompt} does not divide rollout_batch_size {rollout_batch_size} "
            "(the rollout holds rollout_batch_size / samples_per_prompt prompts)",
        )
    if estimator in GROUP_ESTIMATORS and samples_per_prompt < 2:
        raise ConfigError(
            "ppo.samples_per_prompt",
            f"{where}estimator {estimator!r} compares the responses to one prompt: set samples_per_prompt >= 2",
        )


ONLINE_PRM_KNOBS = ("prm_beta", "prm_labels", "prm_update", "prm_lr")  # what an online PRM trains with
ONLINE_PRM_KEYS = ("online_prm", *ONLINE_PRM_KNOBS)


def check_online_prm(fn, values: dict, lora_rank: int, where: str = "") -> None:
    """ConfigError naming the `ppo.*` key unless `values` (ONLINE_PRM_KEYS) make an online implicit PRM of
    token reward `fn` possible: a language model it reads other than pi_ref, which it reads too, labels
    from the reward model's score it reads, and full models (not adapters on a shared base)."""
    from rto_jax.objectives.implicit_prm import LABELS

    name = values["online_prm"]
    if not name:
        return
    models = frozen_models(fn)
    if name == "ref" or name not in models:
        readable = [m for m in models if m != "ref"]
        raise ConfigError(
            "ppo.online_prm",
            f"{where}token reward {fn.__name__!r} reads {readable or 'no model but pi_ref'}: the online PRM must be "
            f"one of them, got {name!r}",
        )
    if "ref" not in models or not needs_reward_model(fn):
        raise ConfigError(
            "ppo.online_prm",
            f"{where}token reward {fn.__name__!r} must read pi_ref ('ref', the implicit reward's reference) and the "
            "reward model (the outcome labels)",
        )
    if lora_rank > 0:
        raise ConfigError("ppo.online_prm", f"{where}needs full models: set ppo.lora.rank=0 (adapters on a shared base are not supported)")
    if values["prm_labels"] not in LABELS:
        raise ConfigError("ppo.prm_labels", f"{where}must be one of {', '.join(LABELS)}, got {values['prm_labels']!r}")
    if values["prm_update"] not in PRM_UPDATES:
        raise ConfigError("ppo.prm_update", f"{where}must be {' or '.join(map(repr, PRM_UPDATES))}, got {values['prm_update']!r}")
    for key in ("prm_beta", "prm_lr"):
        value = values[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"ppo.{key}", f"{where}must be > 0, got {value!r}")


def method_ppo_settings(config, fn) -> dict:
    """The config.ppo values a recipe's method trains with (`recipes.method`), checked: {} for a plain token reward."""
    settings = dict(getattr(fn, "ppo_settings", {}))
    unknown = sorted(set(settings) - set(config.ppo))
    if unknown:
        raise ConfigError("recipe", f"{config.recipe}: method {fn.__name__!r} sets {unknown}, which config.ppo has not")
    merged = {k: settings.get(k, config.ppo[k]) for k in ("estimator", "samples_per_prompt", "rollout_batch_size")}
    where = f"method {fn.__name__!r} of {config.recipe}: " if settings else ""
    check_estimator(*merged.values(), where=where)
    online = {k: settings.get(k, config.ppo[k]) for k in ONLINE_PRM_KEYS}
    check_online_prm(fn, online, config.ppo.lora.rank, where=f"{config.recipe}: ")
    return settings


def method_settings(config, fn, args: dict[str, float]) -> tuple[dict, dict]:
    """(config.ppo overrides, reward coefficients) of token reward `fn` in a run of several methods:
    the method's own PPO settings (`recipes.method`: e.g. a critic-free estimator), the shared
    `ppo.reward_args` it takes, then its own `args` (from `parse_per_method`)."""
    coefficients = {k: v for k, v in config.ppo.reward_args.to_dict().items() if k in reward_args(fn)}
    coefficients.update({k: v for k, v in args.items() if k not in PER_METHOD_PPO_KEYS})
    overrides = {**method_ppo_settings(config, fn), **{k: v for k, v in args.items() if k in PER_METHOD_PPO_KEYS}}
    return overrides, coefficients


def looks_local(path: str) -> bool:
    """A model path that must exist on disk (never sent to the hub)."""
    return path.startswith(("/", ".", "~")) or path.endswith(".gguf") or path.count("/") != 1 or os.path.exists(path)


def stage_done_file(workdir, stage: str) -> Path:
    return Path(workdir) / stage / "done.json"


def stage_available(config, workdir, stage: str) -> bool:
    """Whether a model of `stage` exists or will: run now, given by init_from, finished earlier in workdir,
    or taken from the run `reuse_models_from`."""
    return (
        stage in stage_list(config)
        or bool(config[stage].get("init_from"))
        or (workdir is not None and stage_done_file(workdir, stage).exists())
        or stage in reused_models(config)
    )


REUSABLE_STAGES = ("sft", "reward_model", "dpo")  # the stages `reuse_models_from` takes from a finished run


def reused_models(config) -> dict[str, dict]:
    """{stage: its done.json summary, paths resolved in that run's folder} for each stage of
    REUSABLE_STAGES finished in the run `config.reuse_models_from` and not given by its own init_from."""
    from rto_jax.pipeline.workdir import resolve_in

    run_dir = config.get("reuse_models_from", "")  # configs saved before the key existed lack it
    if not run_dir:
        return {}
    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError("reuse_models_from", f"{run_dir!r} is not a folder (the --workdir of a finished run)")
    out = {}
    for stage in REUSABLE_STAGES:
        done = stage_done_file(folder, stage)
        if config[stage].init_from or not done.is_file():
            continue
        try:
            out[stage] = resolve_in(json.loads(done.read_text()), folder)
        except ValueError as e:
            raise ConfigError("reuse_models_from", f"{done}: not a stage summary ({e})") from None
    return out


def with_reused_models(config):
    """`config` with the tokenizer of the run it reuses models from (its SFT model's, which holds the
    tokenizer it was trained with: a BPE trained there must not be trained anew); `config` itself when
    it reuses nothing."""
    reused = reused_models(config)
    if config.data.source == "synthetic" or "sft" not in reused:
        return config  # validate names what is missing
    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.tokenizer.path = reused["sft"]["model_path"]
        out.tokenizer.bpe_vocab_size = 0
    return out


def _check_reuse(config, token_reward) -> None:
    """The run `reuse_models_from` finished every model the recipe's reward needs, and they are there."""
    run_dir = config.get("reuse_models_from", "")
    if not run_dir:
        return
    reused = reused_models(config)
    needed = ["sft", "reward_model"] + (["dpo"] if "dpo" in frozen_models(token_reward) else [])
    for stage in needed:
        if stage not in reused and not config[stage].init_from:
            raise ConfigError(
                "reuse_models_from",
                f"{run_dir} has no finished {stage} stage ({stage}/done.json), and the token reward "
                f"{token_reward.__name__!r} needs it: reuse a run that finished it, or set {stage}.init_from",
            )
    for stage, summary in reused.items():
        path = summary.get("model_path", "")
        if not path or (looks_local(path) and not os.path.exists(os.path.expanduser(path.split("@")[0]))):
            raise ConfigError(
                "reuse_models_from",
                f"{stage_done_file(run_dir, stage)} names the model {path!r}, which does not exist (moved or removed?)",
            )


# ----------------------------------------------------------------------------------------------
# Validation.


def _get(config, key: str):
    section, _, name = key.rpartition(".")
    return config[section][name] if section else config[name]


def _positive(config, *keys):
    for key in keys:
        section, _, name = key.rpartition(".")
        value = config[section][name] if section else config[name]
        if not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(key, f"must be > 0, got {value!r}")


def _non_negative(config, *keys):
    for key in keys:
        section, _, name = key.rpartition(".")
        value = config[section][name]
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value!r}")


def _check_model_path(key: str, path: str):
    if path and looks_local(path) and not os.path.exists(os.path.expanduser(path.split("@")[0])):
        from rto_jax.models.smollm2 import GGUF_NAME

        if path.endswith(GGUF_NAME):
            raise ConfigError(key, f"{path!r} does not exist: run `make smollm2` first (it caches SmolLM2 there)")
        raise ConfigError(
            key, f"{path!r} does not exist (a local model folder or .gguf file; hub ids are 'owner/name')"
        )


def _check_data_path(key: str, path: str):
    from rto_jax.data.loader import _looks_local  # the loader's own rule for "this is a local file"

    if path and _looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(key, f"data file {path!r} does not exist")


def _check_recipe(config):
    """The recipe loads and `ppo.reward_args` are coefficients of its token reward; returns the reward."""
    from rto_jax.pipeline.recipes import RecipeError, load_recipe

    try:
        recipe = load_recipe(config.recipe)
    except RecipeError as e:
        raise ConfigError("recipe", str(e)) from None
    fn = recipe.TOKEN_REWARD
    known = reward_args(fn)
    for key, value in config.ppo.reward_args.items():
        if key not in known:
            raise ConfigError(
                f"ppo.reward_args.{key}",
                f"the token reward {fn.__name__!r} of {config.recipe} takes no {key!r}; its coefficients: "
                f"{', '.join(known) or 'none'}",
            )
        if key.startswith("beta") and value < 0:
            raise ConfigError(f"ppo.reward_args.{key}", f"must be >= 0, got {value}")
    try:
        per_method = parse_per_method(config.ppo.per_method)
    except ValueError as e:
        raise ConfigError("ppo.per_method", str(e)) from None
    if per_method and not hasattr(recipe, "METHODS"):
        raise ConfigError("ppo.per_method", f"{config.recipe} trains one token reward: set its values in ppo.*")
    check_method_args("ppo.per_method", {m.__name__: m for m in getattr(recipe, "METHODS", ())}, per_method)
    for method in getattr(recipe, "METHODS", ()) or (fn,):
        method_ppo_settings(config, method)
    if hasattr(recipe, "validate"):  # the recipe's own keys
        recipe.validate(config)
    return fn


def _check_text_data(config, stages, base) -> None:
    """Tokenizer and data sources of a text task."""
    from rto_jax.data.formats import FORMATS

    # Tokenizer: a random-init model needs one from somewhere.
    tokenizer_sources = [config.tokenizer.path, base] + [config[s].init_from for s in TRAINED_STAGES]
    if config.tokenizer.bpe_vocab_size <= 0 and not any(tokenizer_sources):
        raise ConfigError(
            "tokenizer.path", "no tokenizer: set tokenizer.path, tokenizer.bpe_vocab_size > 0, or a model init_from"
        )
    if 0 < config.tokenizer.bpe_vocab_size < 300:
        raise ConfigError(
            "tokenizer.bpe_vocab_size", f"{config.tokenizer.bpe_vocab_size} < 300 (256 bytes + specials + merges)"
        )
    _check_model_path("tokenizer.path", config.tokenizer.path)
    if config.tokenizer.bpe_vocab_size > 0:
        # A BPE trained on the data numbers its tokens its own way: fed to a pretrained model, its ids
        # select unrelated embeddings (no error anywhere, just a model that learns nothing).
        pretrained = [k for k in ["model.init_from"] + [f"{s}.init_from" for s in TRAINED_STAGES] if _get(config, k)]
        if config.evaluate.judge:
            pretrained.append("evaluate.judge")
        if pretrained:
            raise ConfigError(
                "tokenizer.bpe_vocab_size",
                f"{config.tokenizer.bpe_vocab_size} trains a new BPE, but config.{pretrained[0]} is a pretrained "
                "model with its own vocabulary: set tokenizer.bpe_vocab_size=0 to use the model's tokenizer",
            )
        if config.tokenizer.path:
            raise ConfigError(
                "tokenizer.bpe_vocab_size", "set either tokenizer.path (a given tokenizer) or bpe_vocab_size > 0"
            )

    # Data.
    for name in ("sft", "preference"):
        src = config.data[name]
        if src.path and src.format not in FORMATS:
            raise ConfigError(f"data.{name}.format", f"unknown format {src.format!r}; known: {sorted(FORMATS)}")
        kind = FORMATS[src.format].kind if src.format in FORMATS else None
        want = "sft" if name == "sft" else "preference"
        if src.path and kind != want:
            raise ConfigError(
                f"data.{name}.format", f"{src.format!r} is a {kind} format; data.{name} needs a {want} format"
            )
        _check_data_path(f"data.{name}.path", src.path)
        _check_data_path(f"data.{name}.eval_path", src.eval_path)
        if src.format in FORMATS:
            _check_column_map(f"data.{name}.column_map", src.column_map, FORMATS[src.format])
    trains = {s for s in stages if s in TRAINED_STAGES and not config[s].init_from}
    needs_pref = trains & {"reward_model", "dpo"}
    if needs_pref and not config.data.preference.path:
        raise ConfigError("data.preference.path", f"stage(s) {sorted(needs_pref)} need preference data")
    if ({"sft", "ppo", "evaluate"} & set(stages)) and not (config.data.sft.path or config.data.preference.path):
        raise ConfigError(
            "data.sft.path", "SFT / PPO / evaluation need prompts: set data.sft.path or data.preference.path"
        )


def _check_column_map(key: str, value: str, fmt) -> None:
    """'field=column,...' with fields of the source's format (rto_jax.data.formats.resolve_columns)."""
    fields = sorted({*fmt.columns, *(fmt.alt_columns or {})})
    for item in filter(None, (i.strip() for i in str(value).split(","))):
        field, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not field or not column:
            raise ConfigError(key, f"expected 'field=column,...' (e.g. 'response=summary'), got {item!r}")
        if field not in fields:
            raise ConfigError(key, f"{field!r} is not a field of format {fmt.name!r}; its fields: {', '.join(fields)}")


def _check_synthetic(config) -> None:
    """The synthetic task's definition and the lengths it fixes."""
    try:
        task = SyntheticTaskConfig(**config.synthetic.task.to_dict())
    except (TypeError, ValueError) as e:
        raise ConfigError("synthetic.task", str(e)) from None
    for key, value in (
        ("data.max_prompt_len", task.prompt_length),
        ("data.max_response_len", task.max_response_length),
    ):
        section, name = key.split(".")
        if config[section][name] != value:
            raise ConfigError(key, f"{config[section][name]} != the synthetic task's {value} (set by synthetic.task)")
    _positive(config, "synthetic.sft_examples", "synthetic.sft_eval_examples", "synthetic.preference_pairs")
    _positive(config, "synthetic.best_of_n", "synthetic.best_of_n_prompts")


def _check_lora(config, stage: str) -> None:
    lora = config[stage].lora
    if lora.rank < 0:
        raise ConfigError(f"{stage}.lora.rank", f"must be >= 0 (0: no adapters), got {lora.rank}")
    targets = parse_targets(lora.targets)
    # The architecture is known here only for a random-init model; a loaded one is checked by its own.
    random_init = not config.model.init_from and not config.sft.init_from
    valid = PROJECTIONS[config.model.arch] if random_init else sorted({p for ps in PROJECTIONS.values() for p in ps})
    unknown = [t for t in targets if t not in valid]
    if unknown:  # checked whatever the rank: a typo should not wait for the day adapters are switched on
        raise ConfigError(f"{stage}.lora.targets", f"{unknown} are not projections to adapt; valid: {', '.join(valid)}")
    if lora.rank == 0:
        return
    if lora.alpha <= 0:
        raise ConfigError(f"{stage}.lora.alpha", f"must be > 0, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"{stage}.lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    if stage == "ppo" and lora.dropout:
        raise ConfigError(
            "ppo.lora.dropout",
            f"must be 0, got {lora.dropout}: PPO's importance ratio compares the update's log-probs with the "
            "rollout's, which never drop units",
        )


def validate(config, workdir=None, num_devices: int | None = None) -> None:
    """Raises ConfigError (naming the key) for any value that would fail later; does no work.

    num_devices: the devices the mesh spans (default: all devices of all processes).
    """
    parse_seeds(config.seeds)
    stages = stage_list(config)
    if not stages:
        raise ConfigError("stages", "no stage to run")
    for s in stages:
        if s not in STAGES:
            raise ConfigError("stages", f"unknown stage {s!r}; known: {', '.join(STAGES)}")
    if len(set(stages)) != len(stages) or stages != sorted(stages, key=STAGES.index):
        raise ConfigError("stages", f"stages must be distinct and in the order {', '.join(STAGES)}; got {stages}")

    # Lengths.
    p, r = config.data.max_prompt_len, config.data.max_response_len
    if p < 1:
        raise ConfigError("data.max_prompt_len", f"must be >= 1, got {p}")
    if r < 2:
        raise ConfigError("data.max_response_len", f"must be >= 2 (one token and EOS), got {r}")
    random_init = not config.model.init_from and not config.sft.init_from  # SFT starts from a random model
    if random_init and p + r > config.model.max_position_embeddings:
        raise ConfigError(
            "model.max_position_embeddings",
            f"{config.model.max_position_embeddings} < max_prompt_len + max_response_len = {p + r}",
        )
    base = config.model.init_from
    if base and looks_local(base) and os.path.isdir(base) and os.path.exists(os.path.join(base, "config.json")):
        limit = json.loads(Path(base, "config.json").read_text()).get("max_position_embeddings")
        if limit is not None and p + r > limit:
            raise ConfigError("data.max_prompt_len", f"P + R = {p + r} > the model's max_position_embeddings {limit}")
    if config.data.pad_id is not None and config.data.pad_id == config.data.eos_id:
        raise ConfigError(
            "data.pad_id", f"pad_id must differ from eos_id (both {config.data.pad_id}): EOS would be masked"
        )
    if config.data.prompt_truncation not in ("auto", "left", "tldr_post"):
        raise ConfigError(
            "data.prompt_truncation", f"expected 'auto', 'left' or 'tldr_post', got {config.data.prompt_truncation!r}"
        )
    if not 0 < config.data.eval_size:
        raise ConfigError("data.eval_size", f"must be > 0 (a share < 1 or a count), got {config.data.eval_size}")

    # Model.
    if config.model.arch not in ("llama", "gpt_neox"):
        raise ConfigError("model.arch", f"expected 'llama' or 'gpt_neox', got {config.model.arch!r}")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError("model.dtype", f"expected 'float32' or 'bfloat16', got {config.model.dtype!r}")
    if config.model.remat not in ("none", "full", "dots"):
        raise ConfigError("model.remat", f"expected 'none', 'full' or 'dots', got {config.model.remat!r}")
    if config.model.attention not in ATTENTION_IMPLEMENTATIONS:
        got = config.model.attention
        raise ConfigError("model.attention", f"expected one of {ATTENTION_IMPLEMENTATIONS}, got {got!r}")
    if random_init:
        _positive(config, "model.hidden_size", "model.intermediate_size", "model.num_layers", "model.num_heads")
        if config.model.num_heads % config.model.num_kv_heads:
            raise ConfigError("model.num_kv_heads", f"{config.model.num_kv_heads} does not divide num_heads")
    _check_model_path("model.init_from", base)
    for stage in TRAINED_STAGES:
        _check_model_path(f"{stage}.init_from", config[stage].init_from)
    _check_model_path("evaluate.judge", config.evaluate.judge)

    reused = reused_models(config)  # stages taken from the run reuse_models_from: not trained here
    synthetic = config.data.source == "synthetic"
    if config.data.source not in ("text", "synthetic"):
        raise ConfigError("data.source", f"expected 'text' or 'synthetic', got {config.data.source!r}")
    if synthetic:
        _check_synthetic(config)
    else:
        _check_text_data(config, [s for s in stages if s not in reused], base)
    trains = {s for s in stages if s in TRAINED_STAGES and not config[s].init_from and s not in reused}
    if "preferences" in stages and not synthetic:
        raise ConfigError("stages", "the 'preferences' stage labels sampled pairs: it needs data.source='synthetic'")
    preferences_done = workdir is not None and stage_done_file(workdir, "preferences").exists()
    if synthetic and trains & {"reward_model", "dpo"} and "preferences" not in stages and not preferences_done:
        raise ConfigError("stages", "the reward model and DPO of a synthetic task need the 'preferences' stage")
    if config.ppo.eval_every and not synthetic:
        raise ConfigError("ppo.eval_every", "the gold-reward curve needs a task with a gold reward (data.source)")
    _non_negative(config, "ppo.eval_every")

    # Stages that need a model no one makes.
    def need(stage, what, why):
        if not stage_available(config, workdir, what):
            raise ConfigError(
                f"{what}.init_from",
                f"stage {stage!r} needs the {what} model ({why}): add {what!r} to config.stages or set {what}.init_from",
            )

    token_reward = _check_recipe(config)
    from rto_jax.pipeline.reward_check import check_recipe_rewards  # called on fake inputs, before any work
    check_recipe_rewards(config)
    _check_reuse(config, token_reward)
    for stage in ("reward_model", "dpo"):
        if stage in trains:
            need(stage, "sft", "its initialization and reference")
    if "ppo" in trains:
        need("ppo", "sft", "the initial policy and the reference")
        # The critic starts from the reward model whatever the token reward (rto_no_rm included).
        need("ppo", "reward_model", "the reward and the critic's initialization")
        if "dpo" in frozen_models(token_reward):
            need("ppo", "dpo", f"the DPO log-probs of the token reward {token_reward.__name__!r}")
    if "evaluate" in stages:
        if not config.evaluate.judge and not stage_available(config, workdir, "reward_model"):
            raise ConfigError(
                "evaluate.judge", "evaluation needs a judge: set evaluate.judge or provide a reward_model"
            )
        try:
            parse_policies(config.evaluate.policies)
        except ValueError as e:
            raise ConfigError("evaluate.policies", str(e)) from None
        _positive(config, "evaluate.batch_size")
        _non_negative(config, "evaluate.num_prompts")
        if not config.evaluate.greedy and config.evaluate.temperature <= 0:
            raise ConfigError(
                "evaluate.temperature", f"must be > 0 (or set evaluate.greedy), got {config.evaluate.temperature}"
            )

    # Batch sizes and optimizers.
    for stage in ("sft", "reward_model", "dpo"):
        _positive(config, f"{stage}.batch_size", f"{stage}.eval_batch_size", f"{stage}.grad_accum_steps", f"{stage}.lr")
        _non_negative(
            config, f"{stage}.max_steps", f"{stage}.num_epochs", f"{stage}.eval_every", f"{stage}.warmup_steps"
        )
        if config[stage].batch_size % config[stage].grad_accum_steps:
            raise ConfigError(
                f"{stage}.grad_accum_steps",
                f"{config[stage].grad_accum_steps} does not divide batch_size {config[stage].batch_size}",
            )
        if config[stage].num_epochs == 0 and config[stage].max_steps == 0:
            raise ConfigError(f"{stage}.num_epochs", "num_epochs and max_steps are both 0: nothing to train")
    for stage in TRAINED_STAGES:  # each has `lora.*` fields
        _check_lora(config, stage)
    if "ppo" in trains and config.ppo.lora.rank > 0:
        # One shared base: the models PPO reads must be adapters on the SFT model (init_from ones are
        # checked when PPO loads them).
        for stage in ("reward_model", *(["dpo"] if "dpo" in frozen_models(token_reward) else [])):
            if stage in trains and config[stage].lora.rank == 0:
                raise ConfigError(
                    f"{stage}.lora.rank",
                    f"ppo.lora.rank={config.ppo.lora.rank} runs PPO on one shared base, which needs the {stage} "
                    f"trained as adapters on the SFT model: set {stage}.lora.rank > 0 (or ppo.lora.rank=0)",
                )
    for stage in TRAINED_STAGES:
        if config[stage].schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(
                f"{stage}.schedule", f"expected 'cosine', 'linear' or 'constant', got {config[stage].schedule!r}"
            )
    if config.dpo.loss_type not in ("sigmoid", "ipo", "hinge", "robust"):
        raise ConfigError(
            "dpo.loss_type", f"expected 'sigmoid', 'ipo', 'hinge' or 'robust', got {config.dpo.loss_type!r}"
        )
    if not 0 <= config.dpo.label_smoothing < 0.5:
        raise ConfigError("dpo.label_smoothing", f"must be in [0, 0.5), got {config.dpo.label_smoothing}")
    _positive(config, "dpo.beta")
    if config.reward_model.normalize_on not in ("reference", "sft_samples"):
        raise ConfigError(
            "reward_model.normalize_on",
            f"expected 'reference' or 'sft_samples', got {config.reward_model.normalize_on!r}",
        )
    _positive(config, "reward_model.normalize_rows")
    _positive(config, "ppo.rollout_batch_size", "ppo.ppo_epochs", "ppo.num_minibatches", "ppo.total_episodes", "ppo.lr")
    if config.ppo.rollout_batch_size % config.ppo.num_minibatches:
        raise ConfigError(
            "ppo.num_minibatches",
            f"{config.ppo.num_minibatches} does not divide rollout_batch_size {config.ppo.rollout_batch_size}",
        )
    check_estimator(config.ppo.estimator, config.ppo.samples_per_prompt, config.ppo.rollout_batch_size)
    if config.ppo.total_episodes < config.ppo.rollout_batch_size:
        raise ConfigError(
            "ppo.total_episodes", f"{config.ppo.total_episodes} < one rollout batch ({config.ppo.rollout_batch_size})"
        )
    if config.ppo.temperature <= 0:
        raise ConfigError("ppo.temperature", f"must be > 0, got {config.ppo.temperature}")
    if not 0 < config.ppo.top_p <= 1:
        raise ConfigError("ppo.top_p", f"must be in (0, 1], got {config.ppo.top_p}")
    if config.ppo.loss_average not in LOSS_AVERAGES:
        raise ConfigError(
            "ppo.loss_average", f"must be one of {', '.join(LOSS_AVERAGES)}, got {config.ppo.loss_average!r}"
        )
    _non_negative(
        config,
        "ppo.max_steps",
        "ppo.top_k",
        "ppo.entropy_coef",
        "ppo.missing_eos_penalty",
        "ppo.warmup_steps",
        "ppo.vocab_chunk",
    )
    _positive(config, "checkpoint.every_steps", "checkpoint.keep")
    if "mesh" in config:
        from rto_jax.train.sharding import mesh_shape

        try:
            data, fsdp, _ = mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices)
        except ValueError as e:
            raise ConfigError("mesh", str(e)) from None
        # Batch rows are split over data x fsdp (and each process loads its own share of them).
        rows_split = data * fsdp
        for key in ("sft.batch_size", "reward_model.batch_size", "dpo.batch_size", "ppo.rollout_batch_size"):
            stage, field = key.split(".")
            if stage in trains and config[stage][field] % rows_split:
                raise ConfigError(
                    key,
                    f"{config[stage][field]} rows do not split over the mesh's data x fsdp = {data} x {fsdp} "
                    f"devices (config.mesh); use a multiple of {rows_split}",
                )


# ----------------------------------------------------------------------------------------------
# Preset helpers shared by the files in configs/.


def config_from_file(path: str | os.PathLike, preset: str | None = None):
    """`get_config(preset)` (or the file's default preset) of a config file. A file of configs/ loads as
    its module (`configs.rto_tldr`); any other runs afresh under a name registered in sys.modules
    (rto_jax.pipeline.recipes.import_file). The repository root goes on sys.path either way, so a
    config file may build on another with `from configs import rto_tldr`."""
    from rto_jax.pipeline.recipes import import_file

    module = import_file(path, "rto_jax_config_", fresh=True)
    return module.get_config() if preset is None else module.get_config(preset)


def shared_data_dir() -> Path:
    """The offline sample data: $RTO_JAX_SHARED_DATA, else ../shared/data next to the repository."""
    env = os.environ.get("RTO_JAX_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def apply_tiny(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """The `tiny` preset: random-init 2-layer model, a 2k byte-level BPE trained on the data, short
    lengths and a few steps per stage, so every stage runs on a laptop CPU in a few minutes."""
    c.model.init_from = ""
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 64, 256, 2
    c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 4, 16
    c.model.max_position_embeddings = 256
    c.tokenizer.path = ""
    c.tokenizer.bpe_vocab_size = 2048
    c.tokenizer.bpe_max_texts = 4000
    c.data.pad_id, c.data.eos_id = None, None  # the BPE's own: pad 0, EOS 1
    c.data.max_prompt_len, c.data.max_response_len = 128, 48
    c.data.eval_size = 64
    for stage, steps in (("sft", 40), ("reward_model", 30), ("dpo", 20)):
        c[stage].init_from = ""
        c[stage].batch_size, c[stage].max_steps, c[stage].lr = 16, steps, 1e-3
        c[stage].eval_every, c[stage].eval_batch_size = 20, 32
    c.reward_model.normalize_rows = 128
    c.ppo.init_from = ""
    c.ppo.rollout_batch_size, c.ppo.total_episodes, c.ppo.max_steps = 16, 16 * 6, 0
    c.ppo.num_minibatches, c.ppo.ppo_epochs, c.ppo.lr = 2, 2, 3e-4
    c.evaluate.num_prompts, c.evaluate.batch_size = 32, 32
    c.checkpoint.every_steps = 2
    return c
