"""verl's advantage estimators (verl.trainer.ppo.core_algos), called on numpy arrays, as a cross-check of
`rto_jax.objectives.advantages`.

Each adapter converts its numpy inputs to float64 torch tensors, calls verl's own function and returns
verl's outputs as numpy float64, unchanged: padded positions keep whatever verl puts there (its whitened
GAE advantages are not re-masked, its GAE returns hold the raw values), so compare on valid tokens.

verl is installed without its declared dependencies (they pin transformers < 5.11); its import chain
then needs only ray, tensordict, omegaconf and codetiming (README.md). Importing verl configures the
root logger and sets a few environment variables (RAY_*, tensordict's LIST_TO_STACK and
LAZY_LEGACY_OP); `_core_algos` puts both back after the first import so that other tests in the same
process are unaffected. None of them is read by the advantage functions.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np

__all__ = [
    "verl_gae",
    "verl_grpo",
    "verl_rloo",
    "verl_reinforce_pp",
    "verl_reinforce_pp_baseline",
    "VERL_FUNCTIONS",
]

# Our estimator name -> the verl function that implements it (Dr. GRPO is verl's GRPO with
# norm_adv_by_std_in_grpo=False).
VERL_FUNCTIONS = {
    "gae": "compute_gae_advantage_return",
    "grpo": "compute_grpo_outcome_advantage",
    "dr_grpo": "compute_grpo_outcome_advantage",
    "rloo": "compute_rloo_outcome_advantage",
    "reinforce_pp": "compute_reinforce_plus_plus_outcome_advantage",
    "reinforce_pp_baseline": "compute_reinforce_plus_plus_baseline_outcome_advantage",
}


@functools.cache
def _core_algos():
    """`verl.trainer.ppo.core_algos`, imported once; the root logger and os.environ as they were before.

    Raises ImportError (ModuleNotFoundError) when verl or a module its import chain needs is missing."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    environment = dict(os.environ)
    try:
        from verl.trainer.ppo import core_algos  # noqa: PLC0415  (heavy: ray, tensordict, omegaconf)
    finally:
        root.handlers[:], root.level = handlers, level
        for key in set(os.environ) - set(environment):
            del os.environ[key]
        os.environ.update(environment)
    return core_algos


def _tensors(*arrays):
    import torch  # noqa: PLC0415

    return [torch.from_numpy(np.array(a, np.float64)) for a in arrays]


def _numpy(*tensors):
    return tuple(t.detach().numpy().astype(np.float64) for t in tensors)


def verl_gae(rewards, values, mask, *, gamma, lam):
    """verl's `compute_gae_advantage_return`: ``(advantages [B, R], returns [B, R])``.

    rewards, values, mask: ``[B, R]`` (mask 1 on response tokens). verl always whitens the advantages
    over the valid tokens, with the sample variance (n - 1); returns = unwhitened advantages + values."""
    core_algos = _core_algos()
    rewards, values, mask = _tensors(rewards, values, mask)
    return _numpy(*core_algos.compute_gae_advantage_return(rewards, values, mask, gamma=gamma, lam=lam))


def verl_grpo(rewards, mask, group_ids, *, norm_by_std=True):
    """verl's `compute_grpo_outcome_advantage`: advantages ``[B, R]`` from each row's summed reward.

    group_ids: ``[B]`` verl's `index` (rows with one id answer one prompt). norm_by_std=False is Dr. GRPO
    (verl's `norm_adv_by_std_in_grpo`)."""
    core_algos = _core_algos()
    rewards, mask = _tensors(rewards, mask)
    advantages, _ = core_algos.compute_grpo_outcome_advantage(
        rewards, mask, np.asarray(group_ids), norm_adv_by_std_in_grpo=norm_by_std
    )
    return _numpy(advantages)[0]


def verl_rloo(rewards, mask, group_ids):
    """verl's `compute_rloo_outcome_advantage`: advantages ``[B, R]`` (leave-one-out group baseline)."""
    core_algos = _core_algos()
    rewards, mask = _tensors(rewards, mask)
    advantages, _ = core_algos.compute_rloo_outcome_advantage(rewards, mask, np.asarray(group_ids))
    return _numpy(advantages)[0]


def verl_reinforce_pp(rewards, mask, *, gamma):
    """verl's `compute_reinforce_plus_plus_outcome_advantage`: ``(advantages [B, R], returns [B, R])``.

    returns: the discounted returns-to-go; advantages: them whitened over the batch's valid tokens
    (sample variance, n - 1). verl reads gamma from an `AlgoConfig`, built here as its trainer does."""
    core_algos = _core_algos()
    from verl.trainer.config import AlgoConfig  # noqa: PLC0415  (imported with core_algos above)

    rewards, mask = _tensors(rewards, mask)
    config = AlgoConfig(gamma=gamma, adv_estimator="reinforce_plus_plus")
    return _numpy(*core_algos.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=config))


def verl_reinforce_pp_baseline(rewards, mask, group_ids):
    """verl's `compute_reinforce_plus_plus_baseline_outcome_advantage`: advantages ``[B, R]``.

    Each row's summed reward minus its group's mean, then whitened over the batch's valid tokens (n - 1)."""
    core_algos = _core_algos()
    rewards, mask = _tensors(rewards, mask)
    advantages, _ = core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(
        rewards, mask, np.asarray(group_ids)
    )
    return _numpy(advantages)[0]
