"""Our DPO losses against TRL's (third_party/trl_losses): same log-probs in, same loss and rewards out."""

import numpy as np
import pytest

from rto_jax.objectives import dpo_loss

pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[test]' brings it)")

from third_party.trl_losses import trl_dpo_loss  # noqa: E402

LOGPS = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
LENGTHS = ("chosen_lengths", "rejected_lengths")
# Our metric name -> TRL's logged name.
METRICS = {
    "rewards/chosen": "rewards/chosen",
    "rewards/rejected": "rewards/rejected",
    "rewards/margin": "rewards/margins",
    "rewards/accuracy": "rewards/accuracies",
}


def _batch(seed, size=8):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, (2, size))
    # Sequence log-probs of a few nats per token; policy and reference close, as in training.
    logps = -lengths * rng.uniform(0.5, 3.0, (2, size))
    ref = logps + rng.normal(0.0, 2.0, (2, size))
    return {
        "chosen_logps": logps[0],
        "rejected_logps": logps[1],
        "ref_chosen_logps": ref[0],
        "ref_rejected_logps": ref[1],
        "chosen_lengths": lengths[0],
        "rejected_lengths": lengths[1],
    }


def _ours(batch, **kw):
    logps = [np.float32(batch[k]) for k in LOGPS]
    loss, metrics = dpo_loss(*logps, **kw, **{k: batch[k] for k in LENGTHS})
    return float(loss), {k: float(v) for k, v in metrics.items()}


def _theirs(batch, **kw):
    return trl_dpo_loss(*(batch[k] for k in LOGPS), **kw, **{k: batch[k] for k in LENGTHS})


def _check(ours, theirs):
    loss, metrics = ours
    trl_loss, trl_metrics = theirs
    np.testing.assert_allclose(loss, trl_loss, rtol=1e-5, atol=1e-5)
    for name, trl_name in METRICS.items():
        np.testing.assert_allclose(metrics[name], trl_metrics[trl_name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
@pytest.mark.parametrize("seed,beta,eps", [(0, 0.1, 0.0), (1, 0.5, 0.1), (2, 0.05, 0.3)])
def test_dpo_loss_matches_trl(loss_type, seed, beta, eps):
    if loss_type == "sigmoid":
        eps = 0.0  # TRL's sigmoid loss has no label smoothing: see the conservative-DPO test
    batch = _batch(seed)
    kw = {"beta": beta, "loss_type": loss_type, "label_smoothing": eps}
    _check(_ours(batch, **kw), _theirs(batch, **kw))


@pytest.mark.parametrize("seed,beta,eps", [(3, 0.1, 0.1), (4, 0.2, 0.25), (5, 0.05, 0.4)])
def test_conservative_dpo_matches_trl_combination(seed, beta, eps):
    """sigmoid with label smoothing eps (cDPO), A = -log s(u), B = -log s(-u): (1-eps) A + eps B.

    TRL's robust loss is ((1-eps) A - eps B) / (1-2eps), so cDPO = 2(1-eps) * TRL sigmoid
    - (1-2eps) * TRL robust, a weighted TRL loss list.
    """
    batch = _batch(seed)
    theirs = _theirs(
        batch,
        beta=beta,
        loss_type=["sigmoid", "robust"],
        loss_weights=[2 * (1 - eps), -(1 - 2 * eps)],
        label_smoothing=eps,
    )
    _check(_ours(batch, beta=beta, loss_type="sigmoid", label_smoothing=eps), theirs)
