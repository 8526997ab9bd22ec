"""Pure math of rlhfkit: log-probs, masked statistics, KL, advantages, losses, sample selection.

No models, no configs, no I/O. Shapes: B batch rows, T (response) tokens, V vocabulary.
"""

from rlhfkit.algos.advantages import (
    RunningMeanBaseline,
    batch_mean_advantages,
    expand_to_tokens,
    gae_advantages,
    group_advantages,
    kl_penalized_rewards,
    kl_penalized_scores,
    reinforce_baseline_advantages,
    rloo_advantages,
)
from rlhfkit.algos.kl import (
    AdaptiveKLController,
    FixedKLController,
    bias_corrected_kl,
    kl_estimate,
)
from rlhfkit.algos.logprobs import (
    entropy_from_logits,
    sequence_logps,
    shift_for_causal,
    token_logprobs,
)
from rlhfkit.algos.losses import (
    nll_loss,
    ppo_policy_loss,
    sequence_policy_loss,
    sft_loss,
    value_loss,
)
from rlhfkit.algos.preference import bradley_terry_loss, dpo_loss, pairwise_accuracy
from rlhfkit.algos.probe import fit_bt_probe, fit_linear_bt
from rlhfkit.algos.token_head import fit_token_head_bt, token_head_scores
from rlhfkit.algos.selection import best_of_n, build_pairs, length_penalised, rsft_dropped
from rlhfkit.algos.stats import (
    agg_loss,
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMeanBaseline",
    "agg_loss",
    "batch_mean_advantages",
    "best_of_n",
    "bias_corrected_kl",
    "bradley_terry_loss",
    "build_pairs",
    "dpo_loss",
    "entropy_from_logits",
    "expand_to_tokens",
    "explained_variance",
    "fit_bt_probe",
    "fit_linear_bt",
    "fit_token_head_bt",
    "gae_advantages",
    "group_advantages",
    "kl_estimate",
    "kl_penalized_rewards",
    "kl_penalized_scores",
    "length_penalised",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "nll_loss",
    "pairwise_accuracy",
    "ppo_policy_loss",
    "reinforce_baseline_advantages",
    "rloo_advantages",
    "rsft_dropped",
    "sequence_logps",
    "sequence_policy_loss",
    "sft_loss",
    "shift_for_causal",
    "token_head_scores",
    "token_logprobs",
    "value_loss",
]
