"""The rollout-vs-trainer gap under each RL framework's own name (docs/reference/metrics.md).

Trainers average differently (global token mean, per-sequence mean first, pooled std), so
a threshold learnt in one does not transfer to another. Each number here is computed
exactly the way its framework logs it, from three arrays over the valid tokens only:
g (generator log-prob), t (trainer log-prob) and seq (which sequence each token is in).
Used by run summaries and by the RL monitor alike.
"""

from __future__ import annotations

import numpy as np

from crossengine.compare.metrics import sampled_token_metrics

# name -> (framework, one-line definition); docs/reference/metrics.md's table states the same; keep them in step.
# verl's own constants: SAFETY_BOUND clamps log-ratios before exp; TIS threshold 2.0 (its lower
# bound 1/2); the rejection band [0.5, 5] is IcePop's. prime-rl's LossConfig defaults mask
# ratios outside [0.125, 8]. verl divides its masked means by (n + 1e-8); that epsilon changes
# nothing above 1e-8 relative and is left out here.
SAFETY_BOUND = 20.0
TIS_THRESHOLD = 2.0
ICEPOP_BAND = (0.5, 5.0)
PRIME_MASK = (0.125, 8.0)
DEFINITIONS: dict[str, tuple[str, str]] = {
    "token_mult_prob_error": ("NeMo-RL", "Σ exp(|g − t|) / valid tokens"),
    "gen_kl_error": ("NeMo-RL", "token mean of k3(t − g), k3(x) = eˣ − x − 1"),
    "policy_kl_error": ("NeMo-RL", "token mean of k3(g − t)"),
    "js_divergence_error": ("NeMo-RL", "token mean of ½k3(t − m) + ½k3(g − m), m = log(½eᵗ + ½eᵍ)"),
    "sampling_importance_ratio": ("NeMo-RL", "token mean of ρ = exp(t − g)"),
    "rollout_probs_diff_max": ("verl", "max of |eᵗ − eᵍ|"),
    "rollout_probs_diff_mean": ("verl", "mean of |eᵗ − eᵍ|"),
    "rollout_probs_diff_std": ("verl", "std (n − 1, as torch.std) of |eᵗ − eᵍ|"),
    "rollout_actor_probs_pearson_corr": ("verl", "Pearson correlation of eᵗ and eᵍ"),
    "rollout_corr/kl": ("verl", "mean of g − t (k1, signed)"),
    "rollout_corr/k3_kl": ("verl", "mean of ρ − r − 1, r = t − g"),
    "rollout_corr/chi2_token": ("verl", "mean of w² − 1, w = exp(clamp(r, ±20))"),
    "rollout_corr/chi2_seq": ("verl", "mean over sequences of exp(2·clamp(Σr, ±20)) − 1"),
    "rollout_corr/training_ppl": ("verl", "mean over sequences of exp(−mean t)"),
    "rollout_corr/training_log_ppl": ("verl", "mean over sequences of −mean t"),
    "rollout_corr/rollout_ppl": ("verl", "mean over sequences of exp(−mean g)"),
    "rollout_corr/rollout_log_ppl": ("verl", "mean over sequences of −mean g"),
    "rollout_corr/log_ppl_diff": ("verl", "mean over sequences of d = mean g − mean t"),
    "rollout_corr/log_ppl_abs_diff": ("verl", "mean over sequences of |d|"),
    "rollout_corr/log_ppl_diff_max": ("verl", "max over sequences of d"),
    "rollout_corr/log_ppl_diff_min": ("verl", "min over sequences of d"),
    "rollout_corr/ppl_ratio": ("verl", "mean over sequences of exp(d)"),
    "rollout_corr/rollout_is_mean": ("verl", "token mean of w (rollout_is: token, before truncation)"),
    "rollout_corr/rollout_is_std": ("verl", "√(E[c²] − E[c]²), c = clamp(w, 0.5, 2)"),
    "rollout_corr/rollout_is_min": ("verl", "min of w"),
    "rollout_corr/rollout_is_max": ("verl", "max of w"),
    "rollout_corr/rollout_is_eff_sample_size": ("verl", "1 / mean((c / (mean c + 1e-8))²), c = clamp(w, 0.5, 2)"),
    "is_eff_sample_size_untruncated": ("crossengine", "1 / mean((w / mean w)²): verl's ESS without its clamp to [0.5, 2], which bounds verl's above 0.64"),
    "rollout_corr/rollout_is_ratio_fraction_high": ("verl", "fraction of tokens with w > 2 (TIS threshold)"),
    "rollout_corr/rollout_is_ratio_fraction_low": ("verl", "fraction of tokens with w < 0.5"),
    "rollout_corr/rollout_rs_ratio_fraction_high": ("verl", "fraction of tokens with w > 5 (rollout_rs: token, IcePop band [0.5, 5])"),
    "rollout_corr/rollout_rs_ratio_fraction_low": ("verl", "fraction of tokens with w < 0.5 (IcePop band)"),
    "rollout_corr/rollout_rs_masked_fraction": ("verl", "fraction of tokens outside [0.5, 5]"),
    "train_rollout_logprob_abs_diff": ("slime", "per-sequence mean of |t − g|, then mean over sequences"),
    "train_rollout_kl": ("miles", "per-sequence mean of clamp(k3(t − g), −10, 10) (low_var_kl), then mean over sequences"),
    "mismatch_kl": ("prime-rl", "per-sequence mean of k3(t − g), then mean over sequences (mismatch_kl/mean)"),
    "mismatch_kl/std": ("prime-rl", "std (n − 1) over sequences of the per-sequence means"),
    "mismatch_kl/max": ("prime-rl", "max over sequences of the per-sequence means"),
    "is_masked": ("prime-rl", "fraction of tokens with ρ < 0.125 or ρ > 8 (is_masked/mean)"),
    "is_masked_low": ("prime-rl", "fraction of tokens with ρ < 0.125"),
    "is_masked_high": ("prime-rl", "fraction of tokens with ρ > 8"),
    "rollout_train_logprobs_abs_diff_mean": ("SkyRL", "mean of |g − t|"),
    "rollout_train_logprobs_abs_diff_std": ("SkyRL", "std (n − 1) of |g − t|"),
    "rollout_train_logprobs_abs_diff_min": ("SkyRL", "min of |g − t|"),
    "rollout_train_logprobs_abs_diff_max": ("SkyRL", "max of |g − t|"),
    "vllm_kl": ("OpenRLHF", "token mean of g − t"),
}


def _per_sequence(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Each present sequence's mean of `values` (`index`: row numbers 0..S−1)."""
    sums = np.bincount(index, weights=values)
    counts = np.bincount(index)
    present = counts > 0
    return sums[present] / counts[present]


def _sequence_index(seq: np.ndarray) -> np.ndarray:
    if np.issubdtype(seq.dtype, np.integer) and len(seq) and seq.min() >= 0:
        return seq  # row numbers already: no sort needed
    return np.unique(seq, return_inverse=True)[1]


def _std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else float("nan")


def framework_metrics(g: np.ndarray, t: np.ndarray, seq: np.ndarray | None = None, tok: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Every §4b metric over valid tokens; `seq` defaults to one sequence; `tok` reuses per-token values."""
    g = np.asarray(g, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    n = len(g)
    if n == 0:
        return {name: float("nan") for name in DEFINITIONS}
    index = _sequence_index(np.zeros(n, dtype=np.int64) if seq is None else np.asarray(seq))
    tok = tok if tok is not None else sampled_token_metrics(lt=t, lg=g)
    r = t - g
    rho = np.exp(r)
    w = np.exp(np.clip(r, -SAFETY_BOUND, SAFETY_BOUND))  # verl's IS weight
    c = np.clip(w, 1 / TIS_THRESHOLD, TIS_THRESHOLD)
    prob_diff = np.abs(tok["prob_diff"])
    abs_diff = tok["abs_lp_diff"]
    pt, pg = np.exp(t), np.exp(g)
    with np.errstate(invalid="ignore", divide="ignore"):
        pearson = float(np.corrcoef(pt, pg)[0, 1]) if n > 1 and pt.std() > 0 and pg.std() > 0 else float("nan")
    mean_t, mean_g = _per_sequence(t, index), _per_sequence(g, index)
    d = mean_g - mean_t
    seq_r = np.bincount(index, weights=r)[np.bincount(index) > 0]
    mismatch = _per_sequence(tok["gen_kl"], index)
    lo, hi = ICEPOP_BAND
    return {
        "token_mult_prob_error": float(tok["mult_prob_error"].mean()),
        "gen_kl_error": float(tok["gen_kl"].mean()),
        "policy_kl_error": float(tok["policy_kl"].mean()),
        "js_divergence_error": float(tok["js"].mean()),
        "sampling_importance_ratio": float(rho.mean()),
        "rollout_probs_diff_max": float(prob_diff.max()),
        "rollout_probs_diff_mean": float(prob_diff.mean()),
        "rollout_probs_diff_std": _std(prob_diff),
        "rollout_actor_probs_pearson_corr": pearson,
        "rollout_corr/kl": float(np.mean(g - t)),
        "rollout_corr/k3_kl": float(np.mean(rho - r - 1)),
        "rollout_corr/chi2_token": float(np.mean(w**2) - 1),
        "rollout_corr/chi2_seq": float(np.mean(np.exp(2 * np.clip(seq_r, -SAFETY_BOUND, SAFETY_BOUND))) - 1),
        "rollout_corr/training_ppl": float(np.mean(np.exp(-mean_t))),
        "rollout_corr/training_log_ppl": float(np.mean(-mean_t)),
        "rollout_corr/rollout_ppl": float(np.mean(np.exp(-mean_g))),
        "rollout_corr/rollout_log_ppl": float(np.mean(-mean_g)),
        "rollout_corr/log_ppl_diff": float(d.mean()),
        "rollout_corr/log_ppl_abs_diff": float(np.abs(d).mean()),
        "rollout_corr/log_ppl_diff_max": float(d.max()),
        "rollout_corr/log_ppl_diff_min": float(d.min()),
        "rollout_corr/ppl_ratio": float(np.exp(d).mean()),
        "rollout_corr/rollout_is_mean": float(w.mean()),
        "rollout_corr/rollout_is_std": float(np.sqrt(max(np.mean(c**2) - np.mean(c) ** 2, 0.0))) if n > 1 else 0.0,
        "rollout_corr/rollout_is_min": float(w.min()),
        "rollout_corr/rollout_is_max": float(w.max()),
        "rollout_corr/rollout_is_eff_sample_size": float(1 / np.mean((c / (c.mean() + 1e-8)) ** 2)),
        "is_eff_sample_size_untruncated": float(1 / np.mean((w / w.mean()) ** 2)),
        "rollout_corr/rollout_is_ratio_fraction_high": float(np.mean(w > TIS_THRESHOLD)),
        "rollout_corr/rollout_is_ratio_fraction_low": float(np.mean(w < 1 / TIS_THRESHOLD)),
        "rollout_corr/rollout_rs_ratio_fraction_high": float(np.mean(w > hi)),
        "rollout_corr/rollout_rs_ratio_fraction_low": float(np.mean(w < lo)),
        "rollout_corr/rollout_rs_masked_fraction": float(np.mean((w < lo) | (w > hi))),
        "train_rollout_logprob_abs_diff": float(_per_sequence(abs_diff, index).mean()),
        "train_rollout_kl": float(_per_sequence(np.clip(tok["gen_kl"], -10, 10), index).mean()),
        "mismatch_kl": float(mismatch.mean()),
        "mismatch_kl/std": _std(mismatch),
        "mismatch_kl/max": float(mismatch.max()),
        "is_masked": float(np.mean((rho < PRIME_MASK[0]) | (rho > PRIME_MASK[1]))),
        "is_masked_low": float(np.mean(rho < PRIME_MASK[0])),
        "is_masked_high": float(np.mean(rho > PRIME_MASK[1])),
        "rollout_train_logprobs_abs_diff_mean": float(abs_diff.mean()),
        "rollout_train_logprobs_abs_diff_std": _std(abs_diff),
        "rollout_train_logprobs_abs_diff_min": float(abs_diff.min()),
        "rollout_train_logprobs_abs_diff_max": float(abs_diff.max()),
        "vllm_kl": float(np.mean(g - t)),
    }
