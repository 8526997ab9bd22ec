"""KL estimators between the policy and the reference, and KL-coefficient controllers.

Notation: pi = pi_theta (the policy being trained), ref = pi_ref (frozen), tokens a sampled from
the rollout policy pi_old (= pi on-policy), x = log pi(a) - log ref(a) per sampled token.
Schulman, "Approximating KL Divergence" (2020) gives the estimators; what each one's *value* and
*gradient* (samples held fixed, as in a loss) estimate on-policy (pi_old = pi):

  kind   per token                value: E_pi[.] =         gradient: E_pi[grad .] =
  k1     x                        KL(pi||ref), unbiased,   0 (grad log pi has mean 0): as a
                                  can be < 0 per token     loss term it does nothing on average
  k2     x^2 / 2                  ~KL(pi||ref), biased     grad KL(pi||ref)
                                  (small near pi = ref)
  k3     exp(-x) - 1 + x          KL(pi||ref), unbiased,   grad KL(ref||pi): the *forward* KL
         (= ref/pi - 1 - log(ref/pi))  always >= 0
  abs    |x|                      not a KL estimate        E[sign(x) grad log pi]
  `bias_corrected_kl`: k3 * pi/pi_old with pi_old detached
                                  KL(pi||ref), unbiased    grad KL(pi||ref), also off-policy
                                  also off-policy

The k3 gradient claim: grad k3 = (1 - ref/pi) grad log pi, and
E_pi[(1 - ref/pi) grad log pi] = sum_a (pi - ref) grad log pi = -sum_a ref grad log pi
= grad KL(ref||pi). So GRPO's usual "k3 in the loss" (Shao et al. 2024) pulls towards the reference
along the forward KL although its logged value is the reverse KL. Multiplying by the ratio
pi/pi_old (value 1 on-policy, but differentiable) makes E_pi_old[ratio * k3] = E_pi[k3] =
KL(pi||ref) an identity in theta, so its gradient is the reverse-KL gradient (DeepSeek-V3.2 report,
2025; TRL's GRPO `use_bias_correction_kl`). tests/test_algos_kl.py checks every claim in this table
by exact enumeration over a small categorical distribution.

In a *reward* (PPO, RLOO, GRPO with kl_in_reward) only the value matters, under no_grad.
"""

from __future__ import annotations

import torch

KL_KINDS = ("k1", "k2", "k3", "abs")

# exp(20) ~ 5e8: beyond this the k3 estimate is dominated by a single token anyway, and an
# unclamped exp(-log_ratio) overflows float32 (~exp(88)) to inf, which then turns into nan
# through the optimiser. The clamp only changes tokens where p/q is outside [e^-20, e^20], and
# there it changes the gradient too: such a token's KL value is capped and its gradient is 0
# (its penalty in the reward and its pull in GRPO's KL loss stop growing).
LOG_RATIO_CLAMP = 20.0


def kl_estimate(logp: torch.Tensor, logp_ref: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref); see the module docstring for what the value
    and the gradient of each kind estimate.

    logp, logp_ref: (B, T) log-probs of the sampled tokens under policy and reference.
    kind: "k1" | "k2" | "k3" | "abs". Returns (B, T); masking is the caller's job (see
    `advantages.kl_penalized_rewards`).
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


def bias_corrected_kl(logp: torch.Tensor, logp_ref: torch.Tensor, logp_old: torch.Tensor) -> torch.Tensor:
    """Importance-weighted k3: exp(logp - logp_old) * k3(logp, logp_ref), per token (B, T).

    logp: (B, T) current policy log-probs (with grad); logp_ref: reference; logp_old: the rollout
    policy's, always treated as a constant (detached here). On-policy the value equals k3 (the
    ratio is 1) but the gradient is that of KL(pi||ref), where plain k3's is that of KL(ref||pi);
    off-policy the value stays an unbiased estimate of KL(pi||ref). This is TRL's GRPO
    `use_bias_correction_kl=True` at importance_sampling_level="token" (the default in TRL 1.16).
    The log-ratio is clamped like `kl_estimate`'s, so a stale token cannot overflow.
    """
    log_w = (logp - logp_old.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_w) * kl_estimate(logp, logp_ref, "k3")


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
