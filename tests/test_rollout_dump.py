"""A saved rollout scored as it was: the `logprobs` engine, samples from a dump, bad records, alarms.

The shipped example (experiments/rollout-dump.yaml) runs from the CLI as a user runs it; the
dump's numbers must come through untouched, the other engines' numbers must not depend on the
dump being there, every bad record must be one line naming file:line and field, and the
template alarm must name exactly the two records the fixture script planted.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from crossengine.cli import app

from .conftest import EXPERIMENTS, run_experiment

DUMP = EXPERIMENTS / "data" / "rollout-dump.jsonl"
RECORDS = [json.loads(line) for line in DUMP.read_text().splitlines()]
PLANTED = {"tpl-03", "tpl-08"}  # scripts/make-rollout-dump.py: TEMPLATE_MISMATCH


@pytest.fixture(scope="module")
def shipped(ray_cluster, tmp_path_factory):
    """experiments/rollout-dump.yaml through the CLI (in-process, on the session's cluster)."""
    d = tmp_path_factory.mktemp("rollout-dump")
    shutil.copytree(EXPERIMENTS / "data", d / "data")
    shutil.copy(EXPERIMENTS / "rollout-dump.yaml", d / "rollout-dump.yaml")
    result = CliRunner().invoke(app, ["run", str(d / "rollout-dump.yaml"), "--output-dir", str(d / "results"), "--run-id", "t"])
    return d, d / "results" / "t", result


def test_the_dump_engine_hands_over_the_files_numbers(shipped):
    _, run_dir, result = shipped
    assert result.exit_code == 0, result.output
    tokens = pd.read_parquet(run_dir / "tokens")
    rows = tokens[tokens["cand_engine"] == "rollout"]
    assert set(rows["sample_id"].astype(str)) == {r["id"] for r in RECORDS}
    for r in RECORDS:
        got = rows[rows["sample_id"] == r["id"]].sort_values("position")
        assert got["position"].tolist() == list(range(r["prompt_len"], len(r["token_ids"]))), "rows: exactly the scored response"
        assert got["token_id"].tolist() == r["token_ids"][r["prompt_len"] :]
        np.testing.assert_array_equal(got["lp_cand"].to_numpy(), np.asarray(r["logprobs"], np.float32))
        assert set(got["segment"].astype(str)) == {"completion"}
    assert rows["top1_match"].isna().all() and rows["top1_cand"].isna().all(), "no top-k in the dump: top-1 is null, not a mismatch"
    summary = pd.read_parquet(run_dir / "summary.parquet")
    pooled = summary[(summary["cand_engine"] == "rollout") & (summary["modality"] == "all") & (summary["position_bucket"] == "all")].iloc[0]
    assert np.isnan(pooled["top1_agreement"]) and pooled["n_tokens"] == len(rows)


def test_template_alarm_names_exactly_the_planted_records(shipped):
    _, run_dir, result = shipped
    alarms = pd.read_parquet(run_dir / "alarms.parquet")
    template = alarms[alarms["alarm"] == "template_mismatch"]
    assert len(template) == 1 and template.iloc[0]["cand_engine"] == "rollout"
    assert set(template.iloc[0]["samples"]) == PLANTED
    assert not (alarms["alarm"] == "template_mismatch").loc[alarms["cand_engine"] != "rollout"].any()
    line = next(x for x in result.output.splitlines() if x.startswith("alarm: template_mismatch"))
    assert all(s in line for s in PLANTED) and "chat-template" in line
    report = (run_dir / "report.html").read_text()
    assert "Alarms" in report and "tpl-03" in report


def test_other_engines_score_the_same_ids_alike_without_the_dump(shipped, tmp_path):
    """The trainer's bf16 variant, run again on the dump's ids given as token_ids (no dump engine at all):
    bitwise the same rows."""
    d, run_dir, _ = shipped
    samples = "\n".join(f"  - {{id: {r['id']}, token_ids: {r['token_ids']}, prompt_len: {r['prompt_len']}}}" for r in RECORDS)
    path = tmp_path / "no-dump.yaml"
    path.write_text(f"model: tiny-text\nreference: trainer\nengines:\n  trainer: {{type: hf, dtype: float32}}\nvariants:\n  trainer-bf16: {{engine: trainer, dtype: bfloat16}}\nsamples:\n{samples}\n")
    other, _ = run_experiment(path, tmp_path / "results")
    cols = ["sample_id", "position", "token_id", "segment", "lp_ref", "lp_cand", "kl_ref_cand", "top1_cand"]
    a = pd.read_parquet(run_dir / "tokens")
    b = pd.read_parquet(other / "tokens")
    a = a[a["variant"] == "trainer-bf16"][cols].astype({"sample_id": str, "segment": str}).sort_values(["sample_id", "position"]).reset_index(drop=True)
    b = b[cols].astype({"sample_id": str, "segment": str}).sort_values(["sample_id", "position"]).reset_index(drop=True)
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b, check_dtype=False)  # a column with nulls in another part reads as float


BAD_RECORDS = {  # id -> (how the record is spoilt, the field the one-line error must name)
    "short": (lambda r: r.update(logprobs=r["logprobs"][:-1]), "logprobs: has 11 values"),
    "nan": (lambda r: r["logprobs"].__setitem__(2, float("nan")), "logprobs[2]: nan is not a finite log-prob"),
    "positive": (lambda r: r["logprobs"].__setitem__(0, 0.5), "logprobs[0]: 0.5 is positive"),
    "vocab": (lambda r: r["token_ids"].__setitem__(-1, 9999), "is outside the vocabulary of the reference's model (512 ids)"),
    "plen": (lambda r: r.update(prompt_len=len(r["token_ids"])), "prompt_len: 43 is out of range"),
    "noids": (lambda r: r.pop("token_ids"), "token_ids: missing"),
    # the top-k a dump holds is checked like its log-probs: every value the comparison would read
    "topvocab": (lambda r: r.update(top_ids=_top(r, 5, 99999), top_logprobs=_top(r, -1.0)), "top_ids[0][1]: 99999 is not a token id (the reference's model has 512 ids)"),
    "topneg": (lambda r: r.update(top_ids=_top(r, 5, -7), top_logprobs=_top(r, -1.0)), "top_ids[0][1]: -7 is not a token id"),
    "topnan": (lambda r: r.update(top_ids=_top(r, 5), top_logprobs=_top(r, -1.0, float("nan"))), "top_logprobs[0][1]: nan is not a finite log-prob"),
    "toppos": (lambda r: r.update(top_ids=_top(r, 5), top_logprobs=_top(r, -1.0, 3.0)), "top_logprobs[0][1]: 3.0 is positive"),
}


def _top(record: dict, value, second=None) -> list[list]:
    """A top-2 list per scored token, its first row's second entry `second` (where given)."""
    rows = [[value, value] for _ in record["logprobs"]]
    if second is not None:
        rows[0][1] = second
    return rows


def test_each_bad_record_is_one_line_and_its_sample_is_skipped(ray_cluster, tmp_path):
    lines = [json.dumps(r) for r in RECORDS[:2]]
    for rid, (spoil, _) in BAD_RECORDS.items():
        r = json.loads(json.dumps(RECORDS[0]))
        r["id"] = rid
        spoil(r)
        lines.append(json.dumps(r))
    lines.append('{"id": "broken", "token_ids": [1, 2')
    (tmp_path / "dump.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "e.yaml").write_text("model: tiny-text\nreference: trainer\nengines:\n  trainer: {type: hf}\n  rollout: {type: logprobs, path: dump.jsonl}\nsamples:\n  - dump: rollout\n")
    result = CliRunner().invoke(app, ["run", str(tmp_path / "e.yaml"), "--output-dir", str(tmp_path / "out"), "--run-id", "t"])
    assert result.exit_code == 1, result.output
    meta = json.loads((tmp_path / "out" / "t" / "run.json").read_text())
    errors = {e["sample_id"]: e["error"] for e in meta["errors"]}
    line_of = {rid: 3 + i for i, rid in enumerate(BAD_RECORDS)}
    for rid, (_, says) in BAD_RECORDS.items():
        assert f"dump.jsonl:{line_of[rid]}: " in errors[rid] and says in errors[rid], errors[rid]
        assert "\n" not in errors[rid]
    broken = 3 + len(BAD_RECORDS)
    assert f"dump.jsonl:{broken}: <record>: not a JSON object" in errors[f"line{broken}"]
    tokens = pd.read_parquet(tmp_path / "out" / "t" / "tokens")
    assert set(tokens["sample_id"].astype(str)) == {RECORDS[0]["id"], RECORDS[1]["id"]}, "bad records are skipped, the good ones scored"


def test_samples_given_as_token_ids_are_matched_to_records_by_id(crossengine_home):
    """The engine itself (no Ray): a record by id, a differing id sequence, an id the dump lacks."""
    from crossengine.adapters.base import Sample
    from crossengine.adapters.logprobs import LogprobsEngine, LogprobsSpec
    from crossengine.adapters.tokens import text_modality
    from crossengine.experiment.fixtures import ensure_fixture

    engine = LogprobsEngine(LogprobsSpec(type="logprobs", path=str(DUMP)), str(ensure_fixture("tiny-text")), "rollout")
    r = RECORDS[1]
    ids = np.asarray(r["token_ids"], np.int64)
    same = Sample(r["id"], ids, text_modality(ids, [], None))
    other = Sample(r["id"], np.where(np.arange(len(ids)) == 35, (ids + 1) % 500, ids), text_modality(ids, [], None))
    missing = Sample("nope", ids, text_modality(ids, [], None))
    got, differ, absent = engine.score([same, other, missing], top_k=5, full_vocab=False)
    np.testing.assert_array_equal(got.token_logprobs[r["prompt_len"] :], np.asarray(r["logprobs"], np.float32))
    assert np.isnan(got.token_logprobs[: r["prompt_len"]]).all() and got.scored.sum() == len(r["logprobs"])
    assert "rollout-dump.jsonl:2: token_ids: differ from the scored tokens at position 35" in differ.message
    assert "no record with id 'nope'" in absent.message


def test_prime_rl_layout_parquet_and_renamed_fields(tmp_path):
    """prime-rl's token export (aligned arrays, loss_mask, two log-prob columns) and the same records as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from crossengine.adapters.dumps import DumpFile

    n, p = 10, 4
    rec = {
        "step": 3,
        "export_step": 3,
        "rank": 0,
        "export_sequence_idx": 7,
        "token_ids": list(range(1, n + 1)),
        "loss_mask": [False] * p + [True, True, False, True, True, True],  # a masked tool token inside the response
        "inference_logprobs": [0.0] * p + [-0.5, -1.0, 0.0, -1.5, -2.0, -2.5],
        "trainer_logprobs": [0.0] * p + [-0.6, -1.1, 0.0, -1.4, -2.1, -2.4],
    }
    (tmp_path / "rank_0.jsonl").write_text(json.dumps(rec) + "\n")
    inference = DumpFile(tmp_path / "rank_0.jsonl", "prime-rl")
    [(rid, pointer, where)] = list(inference.index())
    assert rid == "step3-rank0-seq7" and where.endswith("rank_0.jsonl:1")
    got = inference.read(pointer)
    assert got.prompt_len == p and got.scored.tolist() == rec["loss_mask"]
    np.testing.assert_array_equal(got.logprobs[got.scored], np.float32([-0.5, -1.0, -1.5, -2.0, -2.5]))
    trainer = DumpFile(tmp_path / "rank_0.jsonl", "prime-rl", {"logprobs": "trainer_logprobs"}).read(pointer)
    np.testing.assert_array_equal(trainer.logprobs[trainer.scored], np.float32([-0.6, -1.1, -1.4, -2.1, -2.4]))
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "dump.parquet")
    jsonl, parquet = DumpFile(DUMP), DumpFile(tmp_path / "dump.parquet")
    for (a_id, a_ptr, _), (b_id, b_ptr, b_where) in zip(jsonl.index(), parquet.index()):
        a, b = jsonl.read(a_ptr), parquet.read(b_ptr)
        assert a_id == b_id and b_where.endswith(f"dump.parquet:row {b_ptr[1]}")
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        np.testing.assert_array_equal(a.token_ids, b.token_ids)


def test_a_large_dump_streams_ids_not_records(tmp_path):
    """Indexing 20,000 records holds one record at a time; the experiment's samples hold ids and pointers only."""
    import tracemalloc

    from crossengine.adapters.dumps import DumpFile
    from crossengine.experiment.load import load_experiment

    rng = np.random.default_rng(0)
    with open(tmp_path / "big.jsonl", "w") as f:
        for i in range(20000):
            ids = [1, *rng.integers(3, 500, 63).tolist()]
            f.write(json.dumps({"id": f"r{i}", "token_ids": ids, "prompt_len": 32, "logprobs": [-1.5] * 32}) + "\n")
    size = (tmp_path / "big.jsonl").stat().st_size
    tracemalloc.start()
    n = sum(1 for _ in DumpFile(tmp_path / "big.jsonl").index())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 20000 and peak < size / 20, f"indexing held {peak} bytes of a {size}-byte file"
    (tmp_path / "e.yaml").write_text("model: tiny-text\nreference: t\nengines:\n  t: {type: hf}\n  d: {type: logprobs, path: big.jsonl}\nsamples:\n  - dump: d\n")
    exp = load_experiment(tmp_path / "e.yaml")
    assert len(exp.samples) == 20000 and exp.samples[123].id == "r123"
    assert all(s.token_ids is None and s._record is not None for s in exp.samples)


@pytest.mark.parametrize(
    "text, says",
    [
        ("  - dump: nosuch\n", "samples[0].dump: 'nosuch' is not one of the engines"),
        ("  - dump: t\n", "engine 't' (hf) holds no samples of its own"),
    ],
)
def test_dump_samples_name_an_engine_with_records(tmp_path, text, says):
    from crossengine.errors import ExperimentError
    from crossengine.experiment.load import load_experiment

    (tmp_path / "e.yaml").write_text(f"model: tiny-text\nreference: t\nengines:\n  t: {{type: hf}}\n  d: {{type: logprobs, path: {DUMP}}}\nsamples:\n{text}")
    with pytest.raises(ExperimentError) as err:
        load_experiment(tmp_path / "e.yaml")
    assert says in str(err.value) and ":7:" in str(err.value)


def test_a_missing_dump_file_is_one_line_before_anything_runs(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(_write(tmp_path, "  d: {type: logprobs, path: nowhere.jsonl}\n"))])
    assert result.exit_code == 2 and "engines.d.path: no such file" in result.output and "nowhere.jsonl" in result.output


def _write(tmp_path, engine_line: str):
    path = tmp_path / "e.yaml"
    path.write_text(f"model: tiny-text\nreference: t\nengines:\n  t: {{type: hf}}\n{engine_line}samples:\n  - token_ids: [1, 2, 3]\n")
    return path


GENERIC = {"id": "r", "token_ids": [1, 5, 6, 7], "prompt_len": 2, "logprobs": [-1.0, -2.0], "mask": [True, True], "top_ids": [[5, 9], [6, 9]], "top_logprobs": [[-1.0, -2.0], [-2.0, -3.0]]}
NEMO = {
    "idx": 0,
    "input_lengths": [4],
    "token_ids": [[1, 5, 6, 7, 0]],
    "token_loss_mask": [[0, 0, 1, 1, 0]],
    "generation_logprobs": [[0.0, 0.0, -1.0, -2.0, 0.0]],
    "prev_logprobs": [[0.0, 0.0, -1.1, -2.1, 0.0]],
}
PRIME = {"export_step": 1, "rank": 0, "export_sequence_idx": 2, "token_ids": [1, 5, 6, 7], "loss_mask": [False, False, True, True], "inference_logprobs": [0.0, 0.0, -1.0, -2.0]}


def _spoil(record: dict, field: str, value) -> dict:
    out = json.loads(json.dumps(record))
    if value is _DROP:
        out.pop(field)
    else:
        out[field] = value
    return out


_DROP = object()
# (layout, field spoilt, value (_DROP: the key removed), what the one line must say): every field each layout reads
RECORD_CASES = [
    ("generic", "id", _DROP, "id: missing"),
    ("generic", "token_ids", _DROP, "token_ids: missing"),
    ("generic", "token_ids", "1 5 6", "token_ids: must be a list"),
    ("generic", "token_ids", [1, -5, 6, 7], "token_ids: must be a list of at least 2 token ids"),
    ("generic", "token_ids", [1, 5, 6, 9999], "token_ids[3]: token id 9999 is outside the vocabulary"),
    ("generic", "prompt_len", _DROP, "prompt_len: missing"),
    ("generic", "prompt_len", 4, "prompt_len: 4 is out of range"),
    ("generic", "prompt_len", True, "prompt_len: True is out of range"),
    ("generic", "logprobs", _DROP, "logprobs: missing"),
    ("generic", "logprobs", [-1.0], "logprobs: has 1 values"),
    ("generic", "logprobs", [-1.0, "x"], "logprobs[1]: 'x' is not a finite log-prob"),
    ("generic", "logprobs", [-1.0, float("inf")], "logprobs[1]: inf is not a finite log-prob"),
    ("generic", "logprobs", [-1.0, 0.5], "logprobs[1]: 0.5 is positive"),
    ("generic", "mask", [True], "mask: needs one bool per scored token (2)"),
    ("generic", "top_ids", [[5, 9]], "top_ids: needs one list per scored token (2)"),
    ("generic", "top_ids", [[5, 9], [6]], "top_ids: needs the same k"),
    ("generic", "top_ids", [[5, 9], [6, 99999]], "top_ids[1][1]: 99999 is not a token id"),
    ("generic", "top_ids", [[5, 9], [6, 2.5]], "top_ids[1][1]: 2.5 is not a token id"),
    ("generic", "top_logprobs", [[-1.0, -2.0]], "top_logprobs: needs one list per scored token (2)"),
    ("generic", "top_logprobs", [[-1.0, -2.0], [-2.0, float("nan")]], "top_logprobs[1][1]: nan is not a finite log-prob"),
    ("generic", "top_logprobs", [[-1.0, -2.0], [3.0, -3.0]], "top_logprobs[1][0]: 3.0 is positive"),
    ("prime-rl", "token_ids", _DROP, "token_ids: missing"),
    ("prime-rl", "inference_logprobs", _DROP, "inference_logprobs: missing (the prime-rl layout's name for 'logprobs')"),
    ("prime-rl", "inference_logprobs", [0.0, 0.0, -1.0], "inference_logprobs: has 3 values, one per token (4)"),
    ("prime-rl", "inference_logprobs", [0.0, 0.0, -1.0, float("nan")], "inference_logprobs[1]: nan is not a finite log-prob"),
    ("prime-rl", "loss_mask", [True], "loss_mask: needs one bool per token (4)"),
    ("prime-rl", "loss_mask", [False] * 4, "loss_mask: scores no token"),
    ("prime-rl", "export_sequence_idx", _DROP, "export_step/rank/export_sequence_idx: missing"),
    ("nemo-rl", "idx", _DROP, "idx: missing"),
    ("nemo-rl", "input_lengths", _DROP, "input_lengths: None is not a token count"),
    ("nemo-rl", "input_lengths", [6], "token_ids: has 5 values, fewer than input_lengths 6"),
    ("nemo-rl", "generation_logprobs", _DROP, "generation_logprobs: missing (the nemo-rl layout's name for 'logprobs')"),
    ("nemo-rl", "generation_logprobs", [[0.0, 0.0, -1.0, 0.5, 0.0]], "generation_logprobs[1]: 0.5 is positive"),
    ("nemo-rl", "token_loss_mask", [[0, 0, 0, 0, 1]], "token_loss_mask: scores no token"),
]


@pytest.mark.parametrize(("layout", "field", "value", "says"), RECORD_CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(RECORD_CASES)])
def test_every_field_of_every_layout_is_checked(tmp_path, layout, field, value, says):
    """Table-driven over every field the layouts read: one line naming FILE:LINE and the field, never a silent misalignment."""
    from crossengine.adapters.dumps import DumpFile, RecordError

    good = {"generic": GENERIC, "prime-rl": PRIME, "nemo-rl": NEMO}[layout]
    (tmp_path / "d.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(_spoil(good, field, value)) + "\n")
    dump = DumpFile(tmp_path / "d.jsonl", layout)
    dump.vocab_size = 512
    (_, ok, _), (_, bad, _) = list(dump.index())
    dump.read(ok)  # the unspoilt record reads: the case is about its field alone
    with pytest.raises(RecordError) as err:
        dump.read(bad)
    assert f"d.jsonl:2: {says}" in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_a_dump_read_with_the_other_layout_says_which_layout(tmp_path):
    from crossengine.adapters.dumps import DumpFile, RecordError

    (tmp_path / "prime.jsonl").write_text(json.dumps({**PRIME, "id": "x"}) + "\n")
    (tmp_path / "generic.jsonl").write_text(json.dumps(GENERIC) + "\n")
    for path, layout, other in (("prime.jsonl", "generic", "prime-rl"), ("generic.jsonl", "prime-rl", "generic")):
        dump = DumpFile(tmp_path / path, layout)
        [(_, pointer, _)] = list(dump.index())
        with pytest.raises(RecordError) as err:
            dump.read(pointer)
        assert f"give the engine layout: {other}" in str(err.value), str(err.value)
        assert "by fields:" not in str(err.value), "the user wrote no fields: rename"


@pytest.mark.parametrize(
    ("path_line", "says"),
    [
        ("  d: {type: logprobs, path: notparquet.parquet}\n", "not a Parquet file"),
        ("  d: {type: logprobs, path: folder}\n", "is a folder; name a file"),
    ],
    ids=["not-parquet", "a-folder"],
)
def test_a_dump_path_that_is_not_a_dump_is_one_line(tmp_path, path_line, says):
    (tmp_path / "notparquet.parquet").write_text(json.dumps(GENERIC) + "\n")
    (tmp_path / "folder").mkdir()
    path = tmp_path / "e.yaml"
    path.write_text(f"model: tiny-text\nreference: t\nengines:\n  t: {{type: hf}}\n{path_line}samples:\n  - dump: d\n")
    for command in ("validate", "run"):
        result = CliRunner().invoke(app, [command, str(path), "--output-dir", str(tmp_path / "out")] if command == "run" else [command, str(path)])
        assert result.exit_code == 2, result.output
        message = result.stderr.strip()
        assert message.splitlines() == [message] and says in message and "Traceback" not in result.output, message
    assert not (tmp_path / "out").exists()


def _keys_formulas(rows: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Each framework's keys recomputed from the token rows by the formulas docs/reference/metrics.md states (g: the dump, t: the trainer)."""
    g, t = rows["lp_cand"].to_numpy(np.float64), rows["lp_ref"].to_numpy(np.float64)
    r, seq = t - g, rows["sample_id"].astype(str).to_numpy()
    k3 = np.expm1(r) - r
    per_seq = lambda x: pd.Series(x).groupby(seq).mean()  # noqa: E731 - one sequence's mean, then the mean over sequences
    return {
        "trl": {"sampling/sampling_logp_difference/mean": np.abs(r).mean(), "sampling/sampling_logp_difference/max": np.abs(r).max(), "sampling/importance_sampling_ratio/mean": np.exp(r).mean()},
        "nemo-rl": {"train/token_mult_prob_error": np.exp(np.abs(r)).mean(), "train/gen_kl_error": k3.mean()},
        "verl": {"rollout_corr/kl": (g - t).mean(), "training/rollout_probs_diff_max": np.abs(np.exp(t) - np.exp(g)).max()},
        "prime-rl": {"mismatch_kl/all/mean": per_seq(k3).mean(), "mismatch_kl/all/max": per_seq(k3).max()},
        "slime": {"train/train_rollout_logprob_abs_diff": per_seq(np.abs(r)).mean()},
        "skyrl": {"policy/rollout_train_logprobs_abs_diff_mean": np.abs(r).mean(), "policy/rollout_train_logprobs_abs_diff_max": np.abs(r).max()},
    }


@pytest.mark.parametrize("framework", ["verl", "nemo-rl", "prime-rl", "slime", "skyrl", "trl"])
def test_each_frameworks_keys_are_its_formulas_on_the_shipped_dump(shipped, framework):
    _, run_dir, _ = shipped
    result = CliRunner().invoke(app, ["report", str(run_dir), "--keys", framework])
    assert result.exit_code == 0, result.output
    got = json.loads((run_dir / "metrics.json").read_text())
    assert got["keys"] == framework and f"{framework}'s keys" in result.output
    tokens = pd.read_parquet(run_dir / "tokens")
    for key, want in _keys_formulas(tokens[tokens["cand_engine"] == "rollout"])[framework].items():
        assert got["candidates"]["rollout"][key] == pytest.approx(want, rel=1e-9, abs=1e-12), key


def test_nemo_rl_training_data_is_read_as_written_unpadded(tmp_path):
    """A NeMo-RL train_data_step line (batch of one, padded arrays): cut at input_lengths, scored where token_loss_mask is
    set; `fields: {logprobs: prev_logprobs}` reads the trainer's side of the same line."""
    from crossengine.adapters.dumps import DumpFile

    (tmp_path / "train_data_step3.jsonl").write_text(json.dumps(NEMO) + "\n" + json.dumps({**NEMO, "idx": 1}) + "\n")
    for fields, want in (({}, [-1.0, -2.0]), ({"logprobs": "prev_logprobs"}, [-1.1, -2.1])):
        dump = DumpFile(tmp_path / "train_data_step3.jsonl", "nemo-rl", fields)
        index = list(dump.index())
        assert [rid for rid, _, _ in index] == ["0", "1"]
        rec = dump.read(index[0][1])
        assert rec.token_ids.tolist() == [1, 5, 6, 7] and rec.prompt_len == 2, "the padding after input_lengths is gone"
        assert rec.scored.tolist() == [False, False, True, True]
        np.testing.assert_array_equal(rec.logprobs[2:], np.asarray(want, np.float32))
