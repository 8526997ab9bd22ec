"""KL estimators between the policy and the reference, and KL-coefficient controllers.

Samples come from the policy p = pi_theta (or the behaviour policy), q = pi_ref is the reference.
With log_ratio = log p(a) - log q(a) per sampled token, each estimator's expectation under p
relates to KL(p || q) (Schulman, "Approximating KL Divergence", 2020):
  k1 = log_ratio                      unbiased, high variance, can be negative per token
  k2 = 0.5 * log_ratio^2              biased (low bias near p = q), always >= 0
  k3 = q/p - 1 - log(q/p)             unbiased and always >= 0 ("low_var_kl" in verl, GRPO's KL)
  abs = |log_ratio|                   a non-negative heuristic, not an estimator of KL
"""

from __future__ import annotations

import torch

KL_KINDS = ("k1", "k2", "k3", "abs")

# exp(20) ~ 5e8: beyond this the k3 estimate is dominated by a single token anyway, and an
# unclamped exp(-log_ratio) overflows float32 (~exp(88)) to inf, which then turns into nan
# through the optimiser. The clamp only changes tokens where p/q is outside [e^-20, e^20].
LOG_RATIO_CLAMP = 20.0


def kl_estimate(logp: torch.Tensor, logp_ref: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref).

    logp, logp_ref: (B, T) log-probs of the sampled tokens under policy and reference.
    kind: "k1" | "k2" | "k3" | "abs" (see module docstring). Returns (B, T); masking is the
    caller's job (see `advantages.kl_penalized_rewards`).
    """
    log_ratio = logp - logp_ref  # log p/q
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        # q/p - 1 - log(q/p) with x = log p/q: exp(-x) - 1 + x. expm1 keeps precision near x = 0,
        # where exp(-x) - 1 would cancel to 0 in float32 and the result would lose all digits.
        x = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.expm1(-x) + x
    if kind == "abs":
        return log_ratio.abs()
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences").

    A proportional controller that moves beta so the measured KL tracks `target`:
        err  = clip(current_kl / target - 1, -0.2, 0.2)
        beta = beta * (1 + err * n_steps / horizon)
    The clip bounds the change per update; `horizon` (in samples) sets how fast beta adapts.
    n_steps is the number of samples (episodes) seen since the last update, e.g. the batch size.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be positive")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        # Only the coefficient is state; target and horizon come from the config on resume.
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """Constant KL coefficient with the same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
