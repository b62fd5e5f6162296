"""The rollout-vs-trainer gap under each RL framework's own name (README, "RL metrics").

Trainers average differently (global token mean, per-sequence mean first, pooled std), so
a threshold learnt in one does not transfer to another. Each number here is computed
exactly the way its framework logs it, from three arrays over the valid tokens only:
g (generator log-prob), t (trainer log-prob) and seq (which sequence each token is in).
Used by run summaries and by the RL monitor alike.
"""

from __future__ import annotations

import numpy as np

from crossengine.compare.metrics import sampled_token_metrics

# name -> (framework, one-line definition); README.md's table states the same; keep them in step.
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
    "rollout_corr/chi2_token": ("verl", "mean of ρ² − 1"),
    "train_rollout_logprob_abs_diff": ("slime", "per-sequence mean of |t − g|, then mean over sequences"),
    "mismatch_kl": ("prime-rl", "per-sequence mean of k3(t − g), then mean over sequences"),
    "rollout_train_logprobs_abs_diff_mean": ("SkyRL", "mean of |g − t|"),
    "rollout_train_logprobs_abs_diff_std": ("SkyRL", "std (n − 1) of |g − t|"),
    "vllm_kl": ("OpenRLHF", "token mean of g − t"),
}


def _per_sequence_mean(values: np.ndarray, seq: np.ndarray) -> float:
    if np.issubdtype(seq.dtype, np.integer) and len(seq) and seq.min() >= 0:
        index = seq  # row numbers already: no sort needed
    else:
        _, index = np.unique(seq, return_inverse=True)
    sums = np.bincount(index, weights=values)
    counts = np.bincount(index)
    present = counts > 0
    return float(np.mean(sums[present] / counts[present]))


def _std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else float("nan")


def framework_metrics(g: np.ndarray, t: np.ndarray, seq: np.ndarray | None = None, tok: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Every §4b metric over valid tokens; `seq` defaults to one sequence; `tok` reuses per-token values."""
    g = np.asarray(g, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    n = len(g)
    if n == 0:
        return {name: float("nan") for name in DEFINITIONS}
    seq = np.zeros(n, dtype=np.int64) if seq is None else np.asarray(seq)
    tok = tok if tok is not None else sampled_token_metrics(lt=t, lg=g)
    r = t - g
    rho = np.exp(r)
    prob_diff = np.abs(tok["prob_diff"])
    abs_diff = tok["abs_lp_diff"]
    pt, pg = np.exp(t), np.exp(g)
    with np.errstate(invalid="ignore", divide="ignore"):
        pearson = float(np.corrcoef(pt, pg)[0, 1]) if n > 1 and pt.std() > 0 and pg.std() > 0 else float("nan")
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
        "rollout_corr/chi2_token": float(np.mean(rho**2) - 1),
        "train_rollout_logprob_abs_diff": _per_sequence_mean(abs_diff, seq),
        "mismatch_kl": _per_sequence_mean(tok["gen_kl"], seq),
        "rollout_train_logprobs_abs_diff_mean": float(abs_diff.mean()),
        "rollout_train_logprobs_abs_diff_std": _std(abs_diff),
        "vllm_kl": float(np.mean(g - t)),
    }
