"""Pairwise preference losses: the Bradley-Terry reward-model loss, DPO and its relatives, and
the one pairwise accuracy used in training and evaluation.

Every loss returns (loss, metrics) like `losses`; metrics are detached 0-dim tensors. Inputs are
(B,) per pair: scalar rewards (reward model) or sequence log-probs (DPO, `sequence_logps`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "cdpo", "robust", "ipo", "hinge")


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":  # the trainer divides by the global number of pairs
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean', 'sum' or 'none'")


def _check_flip_rate(e: float) -> None:
    if not 0.0 <= e < 0.5:
        raise ValueError(f"label_smoothing (flip probability) must be in [0, 0.5), got {e}")


@torch.no_grad()
def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Share of pairs ranked right: 1 if chosen > rejected, 1/2 if tied, 0 otherwise.

    Counting ties as 1/2 makes a model that cannot tell the two apart (e.g. a constant reward)
    score exactly 0.5, chance level, instead of 0. chosen, rejected: (B,) scores of each pair.
    reduction "mean" -> 0-dim tensor; "none" -> (B,) per-pair credits (1, 0.5 or 0), to be gathered
    over ranks or grouped by category before averaging; "sum" -> their sum.
    """
    credit = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return _reduce(credit, reduction)


def _smoothed_logistic_loss(logits: torch.Tensor, flipped_logits: torch.Tensor, e: float) -> torch.Tensor:
    """-(1 - e) log s(logits) - e log s(flipped_logits): cross-entropy against a label that is
    right with probability 1 - e. logsigmoid is stable for large |logits|."""
    losses = -F.logsigmoid(logits)
    if e:
        losses = (1 - e) * losses - e * F.logsigmoid(flipped_logits)
    return losses


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: float | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict]:
    """Reward-model loss under the Bradley-Terry model (Ouyang et al. 2022), d = r_chosen - r_rejected:
        L = -log sigmoid(d - margin)
    With label_smoothing = e > 0 (labels assumed flipped with probability e, for noisy preferences):
        L = -(1 - e) log sigmoid(d - margin) - e log sigmoid(-d - margin)
    (a flipped label asks for the same margin the other way round; without a margin this is
    -(1 - e) log s(d) - e log s(-d), whose minimum is at d = log((1 - e) / e) instead of +inf, so
    the rewards stay bounded on pairs the model already ranks right).

    chosen_rewards, rejected_rewards: (B,). margin: optional scalar or (B,) required gap (Llama 2
    uses one from the annotators' preference strength). reduction: "mean" | "sum" | "none" ("sum"
    then divide by the global number of pairs for exact gradient accumulation; "none" returns the
    (B,) per-pair losses).
    Metrics: accuracy (`pairwise_accuracy`: ties count 1/2), margin (mean d), chosen_mean,
    rejected_mean.
    """
    _check_flip_rate(label_smoothing)
    diff = chosen_rewards - rejected_rewards
    m = 0.0 if margin is None else margin
    losses = _smoothed_logistic_loss(diff - m, -diff - m, label_smoothing)
    with torch.no_grad():
        metrics = {
            "accuracy": pairwise_accuracy(chosen_rewards, rejected_rewards),
            "margin": diff.mean(),
            "chosen_mean": chosen_rewards.mean(),
            "rejected_mean": rejected_rewards.mean(),
        }
    return _reduce(losses, reduction), metrics


def _dpo_losses(h: torch.Tensor, beta: float, loss_type: str, e: float) -> torch.Tensor:
    """Per-pair losses (B,) from the log-ratio difference h (B,)."""
    if loss_type in ("sigmoid", "cdpo"):
        return _smoothed_logistic_loss(beta * h, -beta * h, e)
    if loss_type == "robust":
        # Unbiased under label flips with probability e: E_flip[loss] = the clean -log s(beta h).
        return (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)).square()
    return torch.relu(1 - beta * h)  # hinge


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict]:
    """Direct Preference Optimisation (Rafailov et al. 2023) and relatives.

    Inputs: (B,) sequence log-probs (`sequence_logps`) of chosen / rejected responses under the
    policy and the frozen reference. With the log-ratio difference
        h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]
    and e = label_smoothing, the assumed probability that a preference label is flipped:
      "sigmoid" DPO: -log s(beta h). With e > 0 this is conservative DPO (below).
      "cdpo"    conservative DPO (cDPO, Mitchell 2023): the cross-entropy against a soft label,
                -(1 - e) log s(beta h) - e log s(-beta h). Biased under flips, but bounded: its
                minimum is at beta h = log((1 - e) / e), so h cannot be driven to infinity.
                (TRL 1.16 ignores label_smoothing for "sigmoid"; it has no cDPO.)
      "robust"  robust DPO (rDPO, Chowdhury et al. 2024; TRL loss_type="robust"):
                [-(1 - e) log s(beta h) + e log s(-beta h)] / (1 - 2e), the loss whose expectation
                over the label noise equals the clean DPO loss (an unbiased estimate). Unlike
                cDPO it is unbounded below: its slope in beta*h is DPO's minus e / (1 - 2e)
                everywhere, so it keeps pushing h up even on pairs ranked right by a wide
                margin. Needs e in [0, 0.5); e = 0 is plain DPO.
      "ipo"     IPO (Azar et al. 2023): (h - 1/(2 beta))^2, which stops pushing once h reaches
                1/(2 beta). TRL divides each response's log-ratio by its number of tokens
                first (IPO's results used that form); to get TRL's value pass per-token
                *averaged* log-probs for all four inputs: `sequence_logps(..., average=True)`,
                with the same response masks for policy and reference.
      "hinge"   SLiC-style hinge (Zhao et al. 2023): relu(1 - beta h).
    reduction: "mean" | "sum" | "none" as in `bradley_terry_loss`.
    Metrics (implicit rewards beta * log(pi/ref); Z(x) cancels): rewards/chosen, rewards/rejected,
    rewards/accuracy (share with chosen > rejected strictly, ties count 0 as in TRL's
    rewards/accuracies), rewards/margin, logps/chosen, logps/rejected (policy sequence log-probs).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if label_smoothing and loss_type not in ("sigmoid", "cdpo", "robust"):
        raise ValueError("label_smoothing is only defined for the sigmoid/cdpo and robust losses")
    _check_flip_rate(label_smoothing)
    chosen_logratio = policy_chosen_logp - ref_chosen_logp
    rejected_logratio = policy_rejected_logp - ref_rejected_logp
    h = chosen_logratio - rejected_logratio  # (B,)
    losses = _dpo_losses(h, beta, loss_type, label_smoothing)

    with torch.no_grad():
        chosen_rewards = beta * chosen_logratio
        rejected_rewards = beta * rejected_logratio
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen_logp.mean(),
            "logps/rejected": policy_rejected_logp.mean(),
        }
    return _reduce(losses, reduction), metrics
