"""A run's pooled numbers under the names each RL framework logs them (`--keys`, `KLMonitor(keys=...)`).

Each framework's dashboard reads its own keys; crossengine computes every one of these quantities the framework's way
already (compare/frameworks.py, docs/reference/metrics.md), so a key map is all it takes to drop a run into an existing
dashboard. Each entry: the framework's key -> the summary column that holds exactly its quantity. Where the keys and the
code that logs them were read (docs/reference/metrics.md says the same):

- verl: `verl/trainer/ppo/rollout_corr_helper.py` (`rollout_corr/...`) and `verl/utils/debug/metrics.py`
  `calculate_debug_metrics` (`training/rollout_probs_diff_*`, `training/rollout_actor_probs_pearson_corr`);
- NeMo-RL: its loss functions' metrics, logged with the `train/` prefix (`train/token_mult_prob_error`, ...);
- prime-rl: `src/prime_rl/trainer/rl/loss.py` (`mismatch_kl`), logged as `mismatch_kl/all/{mean,std,max}`;
- slime: `slime/backends/megatron_utils/loss.py` `policy_loss_function` (`train_rollout_logprob_abs_diff`), logged under `train/`;
- SkyRL: `skyrl/train/trainer.py` (`policy/rollout_train_logprobs_abs_diff_{mean,std,min,max}`);
- TRL: `trl/trainer/grpo_trainer.py` (`sampling/sampling_logp_difference/{mean,max}`: |t − g| over completion tokens;
  `sampling/importance_sampling_ratio/{min,mean,max}`: exp(t − g) before TRL's own cap or mask, which it applies when
  `vllm_importance_sampling_correction` is on: equal where no token reaches the cap).
"""

from __future__ import annotations

from typing import Any

import numpy as np

VERL_CORR = (
    "kl",
    "k3_kl",
    "chi2_token",
    "chi2_seq",
    "training_ppl",
    "training_log_ppl",
    "rollout_ppl",
    "rollout_log_ppl",
    "log_ppl_diff",
    "log_ppl_abs_diff",
    "log_ppl_diff_max",
    "log_ppl_diff_min",
    "ppl_ratio",
    "rollout_is_mean",
    "rollout_is_std",
    "rollout_is_min",
    "rollout_is_max",
    "rollout_is_eff_sample_size",
    "rollout_is_ratio_fraction_high",
    "rollout_is_ratio_fraction_low",
    "rollout_rs_ratio_fraction_high",
    "rollout_rs_ratio_fraction_low",
    "rollout_rs_masked_fraction",
)
KEYS: dict[str, dict[str, str]] = {
    "verl": {
        **{f"rollout_corr/{k}": f"rollout_corr/{k}" for k in VERL_CORR},
        **{f"training/rollout_probs_diff_{k}": f"rollout_probs_diff_{k}" for k in ("max", "mean", "std")},
        "training/rollout_actor_probs_pearson_corr": "rollout_actor_probs_pearson_corr",
    },
    "nemo-rl": {f"train/{k}": k for k in ("token_mult_prob_error", "gen_kl_error", "policy_kl_error", "js_divergence_error", "sampling_importance_ratio")},
    "prime-rl": {"mismatch_kl/all/mean": "mismatch_kl", "mismatch_kl/all/std": "mismatch_kl/std", "mismatch_kl/all/max": "mismatch_kl/max"},
    "slime": {"train/train_rollout_logprob_abs_diff": "train_rollout_logprob_abs_diff", "train/train_rollout_kl": "train_rollout_kl"},
    "skyrl": {f"policy/rollout_train_logprobs_abs_diff_{k}": f"rollout_train_logprobs_abs_diff_{k}" for k in ("mean", "std", "min", "max")},
    "trl": {
        "sampling/sampling_logp_difference/mean": "rollout_train_logprobs_abs_diff_mean",
        "sampling/sampling_logp_difference/max": "rollout_train_logprobs_abs_diff_max",
        "sampling/importance_sampling_ratio/min": "rollout_corr/rollout_is_min",
        "sampling/importance_sampling_ratio/mean": "sampling_importance_ratio",
        "sampling/importance_sampling_ratio/max": "rollout_corr/rollout_is_max",
    },
}
FRAMEWORKS = tuple(KEYS)


def framework_keys(metrics: dict[str, Any], framework: str) -> dict[str, float | None]:
    """`metrics` (a summary row, a monitor step) under `framework`'s keys; a value it lacks is None (JSON null)."""
    if framework not in KEYS:
        raise ValueError(f"unknown framework {framework!r} for --keys; one of {', '.join(FRAMEWORKS)}")
    out: dict[str, float | None] = {}
    for theirs, ours in KEYS[framework].items():
        v = metrics.get(ours)
        out[theirs] = None if v is None or not np.isfinite(v) else float(v)
    return out
