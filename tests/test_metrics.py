"""Every metric column against an independent, per-token numpy computation from raw logits."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from crossengine.adapters.base import TokenLogprobs
from crossengine.columns import METRIC_COLUMNS
from crossengine.compare import metrics
from crossengine.compare.frameworks import framework_metrics
from crossengine.compare.metrics import token_metrics

T, V, K = 40, 300, 8


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


def _scores(logits: np.ndarray, ids: np.ndarray, full: bool) -> TokenLogprobs:
    """What an engine returns, built here from raw logits with plain numpy."""
    lp = np.stack([_log_softmax(row) for row in logits.astype(np.float64)])
    order = np.argsort(-lp, axis=1, kind="stable")[:, :K]
    token_lp = np.array([np.nan] + [lp[t, ids[t]] for t in range(1, T)], dtype=np.float32)
    return TokenLogprobs(
        token_logprobs=token_lp,
        topk_ids=order,
        topk_logprobs=np.take_along_axis(lp, order, 1).astype(np.float32),
        attention=np.zeros(T, np.int8),
        logits=logits.astype(np.float32) if full else None,
    )


def _k3(x: float) -> float:
    return math.exp(x) - x - 1


def _reference_row(r_logits, c_logits, tok, ref: TokenLogprobs, cand: TokenLogprobs, t: int, full: bool, tie_eps: float) -> dict:
    """One token's metrics, written out the slow, obvious way."""
    lr_all, lc_all = _log_softmax(r_logits.astype(np.float64)), _log_softmax(c_logits.astype(np.float64))
    lr, lc = (lr_all[tok], lc_all[tok]) if full else (float(ref.token_logprobs[t]), float(cand.token_logprobs[t]))
    pr, pc = math.exp(lr), math.exp(lc)
    m = math.log(0.5 * pr + 0.5 * pc)
    out = {
        "lp_ref": lr,
        "lp_cand": lc,
        "lp_diff": lc - lr,
        "abs_lp_diff": abs(lc - lr),
        "prob_diff": pc - pr,
        "mult_prob_error": math.exp(abs(lc - lr)),
        "gen_kl": _k3(lr - lc),
        "policy_kl": _k3(lc - lr),
        "js": 0.5 * _k3(lr - m) + 0.5 * _k3(lc - m),
    }
    ref_ids, cand_ids = list(ref.topk_ids[t]), list(cand.topk_ids[t])
    if full:
        p, q = np.exp(lr_all), np.exp(lc_all)
        out["kl_ref_cand"] = float(np.sum(p * (lr_all - lc_all)))
        out["kl_cand_ref"] = float(np.sum(q * (lc_all - lr_all)))
        out["cos_sim"] = float(r_logits @ c_logits / (np.linalg.norm(r_logits) * np.linalg.norm(c_logits)))
        out["top1_ref"], out["top1_cand"] = int(np.argmax(r_logits)), int(np.argmax(c_logits))
        out["rank_in_cand"] = 1 + int(np.sum(c_logits > c_logits[out["top1_ref"]]))
    else:
        out["kl_ref_cand"] = out["kl_cand_ref"] = out["cos_sim"] = float("nan")
        out["top1_ref"], out["top1_cand"] = ref_ids[0], cand_ids[0]
        out["rank_in_cand"] = cand_ids.index(ref_ids[0]) + 1 if ref_ids[0] in cand_ids else -1
    out["top1_match"] = out["top1_ref"] == out["top1_cand"]
    gap = float(ref.topk_logprobs[t, 0] - ref.topk_logprobs[t, 1])
    out["top1_tie"] = (not out["top1_match"]) and gap < tie_eps
    out["topk_overlap"] = len(set(ref_ids) & set(cand_ids)) / K
    out["topk_kl"] = _topk_kl_slow(ref_ids, np.exp(ref.topk_logprobs[t].astype(np.float64)), cand_ids, np.exp(cand.topk_logprobs[t].astype(np.float64)))
    return out


def _topk_kl_slow(ref_ids, ref_p, cand_ids, cand_p) -> float:
    union = list(dict.fromkeys(list(ref_ids) + list(cand_ids)))

    def side(ids, p):
        known = dict(zip(ids, p))
        rest = max(1.0 - sum(known.values()), 0.0)
        unknown = [i for i in union if i not in known]
        share = min(p[-1], rest / (len(unknown) + 1))
        return [known.get(i, share) for i in union] + [max(rest - share * len(unknown), 0.0)]

    pr, pc = side(ref_ids, ref_p), side(cand_ids, cand_p)
    return sum(a * (math.log(a + 1e-300) - math.log(b + 1e-300)) for a, b in zip(pr, pc))


@pytest.fixture(params=["eager", "compiled"])
def kernel(request, monkeypatch):
    """The full-vocabulary kernel as torch.compile runs it (big blocks) and eagerly (small ones);
    after the test, the compiled one must really have been used (no silent eager fallback)."""
    if request.param == "compiled" and not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile's CPU backend needs a C++ compiler (g++ or c++); none on PATH")
    monkeypatch.setattr(metrics, "_COMPILE_FROM_ELEMENTS", 0 if request.param == "compiled" else 1 << 62)
    yield request.param
    if request.param == "compiled":
        assert metrics._compiled not in (None, False), "torch.compile of the metric kernel failed or was not used"


@pytest.mark.parametrize("full", [True, False], ids=["full-vocab", "top-k-only"])
def test_every_metric_column_matches_numpy(full, kernel):
    rng = np.random.default_rng(0)
    ref_logits = rng.normal(0, 3, (T, V)).astype(np.float32)
    cand_logits = (ref_logits + rng.normal(0, 0.3, (T, V))).astype(np.float32)
    cand_logits[5] = ref_logits[5]  # one identical row
    ref_logits[7, :2] = ref_logits[7].max() + np.array([1.0, 1.0 - 1e-4], dtype=np.float32)  # a near-tie
    cand_logits[7] = ref_logits[7]
    cand_logits[7, 1] += 1e-3  # candidate picks the reference's second best
    ids = rng.integers(0, V, T)
    ref, cand = _scores(ref_logits, ids, full), _scores(cand_logits, ids, full)
    got = token_metrics(ref, cand, ids, tie_eps=1e-3)
    assert set(got) == set(METRIC_COLUMNS) | {"nonfinite"}
    assert not got["nonfinite"].any(), "finite logits are never flagged"
    for t in range(1, T):
        want = _reference_row(ref_logits[t], cand_logits[t], ids[t], ref, cand, t, full, 1e-3)
        for col, value in want.items():
            g = got[col][t - 1]
            if isinstance(value, float) and math.isnan(value):
                assert np.isnan(g), (col, t)
            else:
                assert g == pytest.approx(value, abs=1e-6, rel=1e-6), (col, t, g, value)
    assert got["top1_tie"][6] and not got["top1_match"][6], "the near-tie at position 7 is a tie, not a mismatch"


def test_identical_scores_give_exact_zeros(kernel):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (T, V)).astype(np.float32)
    ids = rng.integers(0, V, T)
    s = _scores(logits, ids, True)
    got = token_metrics(s, s, ids, tie_eps=0.0)
    for col in ("lp_diff", "abs_lp_diff", "prob_diff", "gen_kl", "policy_kl", "js", "kl_ref_cand", "kl_cand_ref"):
        assert np.all(got[col] == 0), col
    assert np.all(got["mult_prob_error"] == 1) and np.all(got["top1_match"]) and np.all(got["topk_overlap"] == 1)


def test_topk_kl_is_a_lower_bound_of_full_kl_when_topk_sets_agree():
    rng = np.random.default_rng(2)
    ref_logits = rng.normal(0, 3, (T, V)).astype(np.float32)
    cand_logits = (ref_logits + rng.normal(0, 0.05, (T, V))).astype(np.float32)
    ids = rng.integers(0, V, T)
    got = token_metrics(_scores(ref_logits, ids, True), _scores(cand_logits, ids, True), ids, tie_eps=0.0)
    same = got["topk_overlap"] == 1
    assert same.any()
    assert np.all(got["topk_kl"][same] <= got["kl_ref_cand"][same] + 1e-9)


def _framework_slow(g, t, seq):
    """Each framework's number from its definition, in other algebra than crossengine's code:
    with ρ = p_t / p_g, k3(t − g) = ρ − log ρ − 1, exp(|g − t|) = max(ρ, 1/ρ), and the per-token
    JS of the two sampled-token probabilities = log(AM/GM) = log(½(p_t + p_g)) − ½(t + g).
    Loops, not numpy reductions; nothing here calls crossengine."""
    n = len(g)
    pt, pg = [math.exp(x) for x in t], [math.exp(x) for x in g]
    rho = [a / b for a, b in zip(pt, pg)]
    absd = [abs(math.log(r)) for r in rho]
    pdiff = [abs(a - b) for a, b in zip(pt, pg)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    std = lambda xs: math.sqrt(sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1))  # noqa: E731
    by_seq = lambda vals: mean([mean([v for v, s in zip(vals, seq) if s == k]) for k in sorted(set(seq))])  # noqa: E731
    k3_gen = [r - math.log(r) - 1 for r in rho]
    mt, mg = mean(pt), mean(pg)
    cov = sum((a - mt) * (b - mg) for a, b in zip(pt, pg))
    pearson = cov / math.sqrt(sum((a - mt) ** 2 for a in pt) * sum((b - mg) ** 2 for b in pg))
    return {
        "token_mult_prob_error": mean([max(r, 1 / r) for r in rho]),
        "gen_kl_error": mean(k3_gen),
        "policy_kl_error": mean([1 / r + math.log(r) - 1 for r in rho]),
        "js_divergence_error": mean([math.log(0.5 * (a + b)) - 0.5 * (x + y) for a, b, x, y in zip(pt, pg, t, g)]),
        "sampling_importance_ratio": mean(rho),
        "rollout_probs_diff_max": max(pdiff),
        "rollout_probs_diff_mean": mean(pdiff),
        "rollout_probs_diff_std": std(pdiff),
        "rollout_actor_probs_pearson_corr": pearson,
        "rollout_corr/kl": -mean([math.log(r) for r in rho]),
        "rollout_corr/k3_kl": mean(k3_gen),
        "rollout_corr/chi2_token": mean([r * r for r in rho]) - 1,
        "train_rollout_logprob_abs_diff": by_seq(absd),
        "mismatch_kl": by_seq(k3_gen),
        "rollout_train_logprobs_abs_diff_mean": mean(absd),
        "rollout_train_logprobs_abs_diff_std": std(absd),
        "vllm_kl": -mean([math.log(r) for r in rho]),
        "n": n,
        **_verl_slow(g, t, seq),
        **_miles_prime_skyrl_slow(g, t, seq),
    }


def _groups(seq):
    order = []
    for s in seq:
        if s not in order:
            order.append(s)
    return [[i for i, s in enumerate(seq) if s == k] for k in order]


def _verl_slow(g, t, seq):
    """verl's rollout_corr helper restated token by token (compute_offpolicy_metrics, compute_is_metrics
    with rollout_is=token at threshold 2, compute_rs_metrics' fractions at the IcePop band [0.5, 5])."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    clamp = lambda x, lo, hi: lo if x < lo else (hi if x > hi else x)  # noqa: E731
    w = [math.exp(clamp(b - a, -20.0, 20.0)) for a, b in zip(g, t)]
    c = [clamp(x, 0.5, 2.0) for x in w]
    mc = mean(c)
    per_seq = _groups(seq)
    mt = [mean([t[i] for i in ix]) for ix in per_seq]
    mg = [mean([g[i] for i in ix]) for ix in per_seq]
    d = [b - a for a, b in zip(mt, mg)]
    seq_sum = [sum(t[i] - g[i] for i in ix) for ix in per_seq]
    return {
        "rollout_corr/chi2_token": mean([x * x for x in w]) - 1,
        "rollout_corr/chi2_seq": mean([math.exp(2 * clamp(s, -20.0, 20.0)) for s in seq_sum]) - 1,
        "rollout_corr/training_ppl": mean([math.exp(-x) for x in mt]),
        "rollout_corr/training_log_ppl": -mean(mt),
        "rollout_corr/rollout_ppl": mean([math.exp(-x) for x in mg]),
        "rollout_corr/rollout_log_ppl": -mean(mg),
        "rollout_corr/log_ppl_diff": mean(d),
        "rollout_corr/log_ppl_abs_diff": mean([abs(x) for x in d]),
        "rollout_corr/log_ppl_diff_max": max(d),
        "rollout_corr/log_ppl_diff_min": min(d),
        "rollout_corr/ppl_ratio": mean([math.exp(x) for x in d]),
        "rollout_corr/rollout_is_mean": mean(w),
        "rollout_corr/rollout_is_std": math.sqrt(max(mean([x * x for x in c]) - mc * mc, 0.0)),
        "rollout_corr/rollout_is_min": min(w),
        "rollout_corr/rollout_is_max": max(w),
        "rollout_corr/rollout_is_eff_sample_size": 1 / mean([(x / (mc + 1e-8)) ** 2 for x in c]),
        "is_eff_sample_size_untruncated": mean(w) ** 2 / mean([x * x for x in w]),
        "rollout_corr/rollout_is_ratio_fraction_high": mean([1.0 if x > 2 else 0.0 for x in w]),
        "rollout_corr/rollout_is_ratio_fraction_low": mean([1.0 if x < 0.5 else 0.0 for x in w]),
        "rollout_corr/rollout_rs_ratio_fraction_high": mean([1.0 if x > 5 else 0.0 for x in w]),
        "rollout_corr/rollout_rs_ratio_fraction_low": mean([1.0 if x < 0.5 else 0.0 for x in w]),
        "rollout_corr/rollout_rs_masked_fraction": mean([0.0 if 0.5 <= x <= 5 else 1.0 for x in w]),
    }


def _miles_prime_skyrl_slow(g, t, seq):
    """miles' low_var_kl (k3 clamped to [-10, 10]) by sample; prime-rl's per-sequence mismatch_kl
    stacked (mean/std/max) and its token masks at ratio < 0.125 or > 8; SkyRL's min/max of |g − t|."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    k3 = [math.exp(b - a) - (b - a) - 1 for a, b in zip(g, t)]
    ratio = [math.exp(b - a) for a, b in zip(g, t)]
    per_seq = [mean([k3[i] for i in ix]) for ix in _groups(seq)]
    m = mean(per_seq)
    return {
        "train_rollout_kl": mean([mean([max(-10.0, min(10.0, k3[i])) for i in ix]) for ix in _groups(seq)]),
        "mismatch_kl/std": math.sqrt(sum((x - m) ** 2 for x in per_seq) / (len(per_seq) - 1)),
        "mismatch_kl/max": max(per_seq),
        "is_masked": mean([1.0 if (x < 0.125 or x > 8) else 0.0 for x in ratio]),
        "is_masked_low": mean([1.0 if x < 0.125 else 0.0 for x in ratio]),
        "is_masked_high": mean([1.0 if x > 8 else 0.0 for x in ratio]),
        "rollout_train_logprobs_abs_diff_min": min(abs(a - b) for a, b in zip(g, t)),
        "rollout_train_logprobs_abs_diff_max": max(abs(a - b) for a, b in zip(g, t)),
    }


def test_framework_metrics_match_each_frameworks_definition():
    rng = np.random.default_rng(3)
    t = np.log(rng.uniform(0.05, 0.95, 30))
    g = t + rng.normal(0, 0.2, 30)
    g[[3, 17]] += [2.5, -2.5]  # ratios beyond 8 and below 1/8: every band and mask counts something
    g[25] -= 25.0  # a log-ratio past verl's ±20 clamp
    seq = np.repeat([0, 1, 2], [5, 10, 15])  # unequal lengths: per-sequence means differ from token means
    got = framework_metrics(g, t, seq)
    want = _framework_slow(list(g), list(t), list(seq))
    assert set(got) == set(want) - {"n"}, "every framework metric is checked, js_divergence_error included"
    for name, value in got.items():
        assert value == pytest.approx(want[name], rel=1e-9, abs=1e-12), name
    for name in ("is_masked_low", "is_masked_high", "rollout_corr/rollout_is_ratio_fraction_high", "rollout_corr/rollout_rs_ratio_fraction_low"):
        assert got[name] > 0, f"{name}: the planted ratios must count"
    assert got["train_rollout_kl"] < got["mismatch_kl"], "miles clamps the planted k3 at 10; prime-rl does not"
    assert got["mismatch_kl"] != pytest.approx(got["gen_kl_error"], rel=1e-6), "sequence-first averaging must differ here"


def test_framework_metrics_identical_logprobs():
    t = np.log(np.array([0.2, 0.5, 0.9]))
    got = framework_metrics(t, t)
    assert got["gen_kl_error"] == 0 and got["policy_kl_error"] == 0 and got["js_divergence_error"] == 0
    assert got["token_mult_prob_error"] == 1 and got["sampling_importance_ratio"] == 1


def test_a_side_that_gives_log_probs_gets_the_same_kl_and_rank(kernel):
    """vLLM's full_vocab returns log-probs, not raw logits: KL and rank must match the raw-logit
    numbers (checked against the slow numpy reference); the cosine of logits becomes null."""
    rng = np.random.default_rng(3)
    ref_logits = rng.normal(0, 3, (T, V)).astype(np.float32)
    cand_logits = (ref_logits + rng.normal(0, 1e-3, (T, V))).astype(np.float32)  # close: tiny KLs, where the offset hurts most
    ids = rng.integers(0, V, T)
    ref, cand = _scores(ref_logits, ids, True), _scores(cand_logits, ids, True)
    cand_lp = np.stack([_log_softmax(row) for row in cand_logits.astype(np.float64)]).astype(np.float32)
    cand.logits, cand.logits_are_logprobs = cand_lp, True
    got = token_metrics(ref, cand, ids, tie_eps=1e-3)
    for t in range(1, T):
        want = _reference_row(ref_logits[t], cand_logits[t], ids[t], ref, cand, t, True, 1e-3)
        for col in ("kl_ref_cand", "kl_cand_ref", "rank_in_cand", "top1_cand", "lp_cand"):
            assert got[col][t - 1] == pytest.approx(want[col], abs=1e-9, rel=1e-4), (col, t)
    assert np.isnan(got["cos_sim"]).all()


@pytest.mark.parametrize("sd", [1e-3, 1e-5])
def test_tiny_kls_keep_their_relative_precision(kernel, sd):
    """Logits a hair apart: KL ~ sd²·Var/2. Written as log-softmax differences, or with
    eˣ − 1 − x from exp (inductor's vectorised expm1), float32 would lose it entirely
    (relative error ~0.5 at sd = 1e-5); the kernel's Taylor branch keeps it."""
    rng = np.random.default_rng(7)
    ref_logits = rng.normal(0, 3, (T, V)).astype(np.float32)
    cand_logits = (ref_logits + rng.normal(0, sd, (T, V))).astype(np.float32)
    ids = rng.integers(0, V, T)
    got = token_metrics(_scores(ref_logits, ids, True), _scores(cand_logits, ids, True), ids, tie_eps=0.0)
    r, c = ref_logits[1:].astype(np.float64), cand_logits[1:].astype(np.float64)
    lr = np.stack([_log_softmax(row) for row in r])
    lc = np.stack([_log_softmax(row) for row in c])
    for col, want in (("kl_ref_cand", (np.exp(lr) * (lr - lc)).sum(1)), ("kl_cand_ref", (np.exp(lc) * (lc - lr)).sum(1))):
        rel = np.abs(got[col] / want - 1)
        assert rel.max() < 1e-3, (col, rel.max())


def test_minus_infinity_logits(kernel):
    """−inf on both sides adds nothing; on one side, the KL toward the side without mass is +inf, never NaN."""
    rng = np.random.default_rng(8)
    ref_logits = rng.normal(0, 3, (T, V)).astype(np.float32)
    cand_logits = (ref_logits + rng.normal(0, 0.1, (T, V))).astype(np.float32)
    ids = rng.integers(10, V, T)
    ref_logits[:, :5] = cand_logits[:, :5] = -np.inf  # masked on both sides
    cand_logits[3, 7] = -np.inf  # the candidate alone gives token 7 no mass at position 3
    got = token_metrics(_scores(ref_logits, ids, True), _scores(cand_logits, ids, True), ids, tie_eps=0.0)
    assert got["kl_ref_cand"][2] == np.inf and np.isfinite(got["kl_cand_ref"][2])
    rows = [t for t in range(1, T) if t != 3]
    kept_r, kept_c = ref_logits[rows, 5:].astype(np.float64), cand_logits[rows, 5:].astype(np.float64)
    lr = np.stack([_log_softmax(row) for row in kept_r])
    lc = np.stack([_log_softmax(row) for row in kept_c])
    want = (np.exp(lr) * (lr - lc)).sum(1)
    np.testing.assert_allclose(got["kl_ref_cand"][[t - 1 for t in rows]], want, rtol=1e-5)
