"""TRL's DPO loss, evaluated on given sequence log-probs, as a cross-check of `rto_jax.objectives.dpo_loss`.

TRL (1.16) computes its DPO losses inside `DPOTrainer.compute_loss(model, inputs)`, after running the
policy. `trl_dpo_loss` calls that method on a `DPOTrainer` made without `__init__` (no model, dataset or
tokenizer): the attributes the method reads are set from a real `DPOConfig`, exactly as
`DPOTrainer.__init__` sets them, the reference log-probs are passed as precomputed inputs, and the policy
is a stub module that returns the requested per-token log-probs. Everything from the log-probs to the
loss and the logged reward metrics is TRL's own code.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import defaultdict
from types import SimpleNamespace

import numpy as np

__all__ = ["trl_dpo_loss"]


class _Accelerator:
    """The bits of `accelerate.Accelerator` that the loss reads on one CPU process."""

    device = "cpu"

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _policy(per_token_logps):
    """A stand-in for TRL's patched causal LM: returns the given per-token log-probs ``[2B, T-1]``."""
    import torch

    class Policy(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
            zeros = torch.zeros_like(per_token_logps)
            return SimpleNamespace(
                log_probs=per_token_logps,
                entropy=zeros,
                mean_logits=zeros,
                is_top1=torch.zeros_like(per_token_logps, dtype=torch.bool),
            )

    return Policy().train()


def trl_dpo_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    loss_type="sigmoid",
    label_smoothing=0.0,
    chosen_lengths=None,
    rejected_lengths=None,
    loss_weights=None,
):
    """TRL's DPO loss and reward metrics for one batch of preference pairs, in float64.

    Args:
      chosen_logps, rejected_logps: ``[B]`` policy log-probs of y_w / y_l, summed over response tokens.
      ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the reference policy.
      beta, label_smoothing: `DPOConfig.beta`, `DPOConfig.label_smoothing`.
      loss_type: one TRL loss name (`sigmoid`, `hinge`, `ipo`, `robust`, ...) or a list of them, combined
        with `loss_weights` as `DPOConfig` does.
      chosen_lengths, rejected_lengths: ``[B]`` response token counts (>= 1; used by `ipo`), default 1.
    Returns:
      ``(loss, metrics)``: the loss as a float and TRL's logged ``rewards/chosen``, ``rewards/rejected``,
      ``rewards/margins``, ``rewards/accuracies`` (batch means, floats).

    Raises ModuleNotFoundError when `trl` is not installed.
    """
    import torch
    from trl import DPOConfig, DPOTrainer

    as64 = lambda a: np.asarray(a, np.float64).reshape(-1)
    chosen, rejected = as64(chosen_logps), as64(rejected_logps)
    batch = chosen.shape[0]
    lengths = [
        np.ones(batch, np.int64) if n is None else np.asarray(n, np.int64).reshape(-1)
        for n in (chosen_lengths, rejected_lengths)
    ]
    lengths = np.concatenate(lengths)
    if (lengths < 1).any():
        raise ValueError("response lengths must be >= 1")

    # Token layout of TRL's batch: [chosen rows; rejected rows], one prompt token then the completion.
    # Each row's sequence log-prob sits on its first completion token; the others carry 0, so TRL's
    # sum over tokens gives back the sequence log-prob exactly.
    width = int(lengths.max()) + 1
    completion_mask = (np.arange(width)[None, :] >= 1) & (np.arange(width)[None, :] <= lengths[:, None])
    per_token = np.zeros((2 * batch, width - 1))
    per_token[:, 0] = np.concatenate([chosen, rejected])
    inputs = {
        "input_ids": torch.zeros((2 * batch, width), dtype=torch.long),
        "attention_mask": torch.ones((2 * batch, width), dtype=torch.long),
        "completion_mask": torch.from_numpy(completion_mask.astype(np.int64)),
        "ref_chosen_logps": torch.from_numpy(as64(ref_chosen_logps)),
        "ref_rejected_logps": torch.from_numpy(as64(ref_rejected_logps)),
    }

    with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' TrainingArguments deprecations
        args = DPOConfig(
            output_dir=os.path.join(out_dir, "unused"),
            beta=beta,
            loss_type=loss_type,
            loss_weights=loss_weights,
            label_smoothing=label_smoothing,
            precompute_ref_log_probs=True,
            report_to="none",
            use_cpu=True,
        )
    trainer = DPOTrainer.__new__(DPOTrainer)  # no __init__: no model, data or tokenizer to set up
    # The attributes `DPOTrainer.__init__` derives from `args` and that the loss reads.
    trainer.args = args
    trainer.beta = args.beta
    trainer.precompute_ref_logps = args.precompute_ref_log_probs
    trainer.loss_types = args.loss_type
    trainer.loss_weights = args.loss_weights or [1.0] * len(trainer.loss_types)
    trainer.ld_alpha = args.ld_alpha
    trainer.f_divergence_type = args.f_divergence_type
    trainer.f_alpha_divergence_coef = args.f_alpha_divergence_coef
    trainer.label_smoothing = args.label_smoothing
    trainer.use_weighting = args.use_weighting
    trainer.aux_loss_enabled = False
    trainer.ref_model = None
    trainer.accelerator = _Accelerator()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    trainer.model = _policy(torch.from_numpy(per_token))

    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    logged = trainer._metrics["train"]
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    return float(loss), {name: float(logged[name][-1]) for name in names}
