"""Property-based fuzzing of every parser a user feeds: the experiment loader (through `validate`, as a
user runs it), the sweep loader, and the dump readers (generic and prime-rl, JSONL and Parquet).
Structured mutations of valid files (tests/fuzzing.py): accepted, or exactly one line naming the file
(line or row) and the field; never a traceback; nothing written. Fixed seeds, a few hundred examples per
parser in the quick loop; bench/fuzz.py runs thousands."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from crossengine.adapters.dumps import DumpFile, RecordError
from crossengine.cli import app
from crossengine.errors import CrossengineError
from crossengine.experiment.sweep import load_sweep

from .fuzzing import mutated, one_line_naming, spoilt_bytes, yaml_text

EXAMPLES = int(os.environ.get("CROSSENGINE_FUZZ_EXAMPLES", "250"))
OUTCOMES: Counter = Counter()  # (parser, "accepted" | "one line") -> count; bench/fuzz.py prints them
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)

EXPERIMENT = {
    "model": "tiny-text",
    "reference": "a",
    "engines": {"a": {"type": "hf", "dtype": "float32"}, "b": {"type": "hf", "dtype": "bfloat16", "attn_implementation": "eager"}},
    "variants": {"c": {"engine": "b", "dtype": "float32"}},
    "samples": [{"text": "hello there"}, {"id": "ids", "token_ids": [1, 40, 41, 42]}],
    "top_k": 5,
    "tie_eps": 0.001,
    "noise": {"conditions": ["alone", "repeat"], "margin": 1.0},
    "alarms": {"gen_kl_error": 0.002, "rollout_is_mean": [0.5, 2.0]},
    "placement": {"timeout_s": 60, "logits_budget_gb": 1.0},
}
SWEEP = {"name": "s", "experiment": "base.yaml", "axes": {"step": {"field": "engines.b.dtype", "values": {"lo": "bfloat16", "hi": "float32"}}}, "parallel": 2}
GENERIC = {"id": "r", "token_ids": [1, 5, 6, 7], "prompt_len": 2, "logprobs": [-1.0, -2.0], "mask": [True, True], "top_ids": [[5, 9], [6, 9]], "top_logprobs": [[-1.0, -2.0], [-2.0, -3.0]]}
PRIME = {"export_step": 1, "rank": 0, "export_sequence_idx": 2, "token_ids": [1, 5, 6, 7], "loss_mask": [False, False, True, True], "inference_logprobs": [0.0, 0.0, -1.0, -2.0]}


def _validate(tmp_path, data: bytes):
    path = tmp_path / "exp.yaml"
    path.write_bytes(data)
    before = set(tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert set(tmp_path.rglob("*")) == before, "validate wrote nothing"
    assert result.exit_code in (0, 2), (result.exit_code, result.output, data[:400])
    if result.exit_code == 2:
        assert one_line_naming(result.stderr, path), (result.stderr, data[:400])
    OUTCOMES["experiment", "accepted" if result.exit_code == 0 else "one line"] += 1
    return result


@pytest.fixture(scope="module")
def experiment_folder(tmp_path_factory, crossengine_home):
    return tmp_path_factory.mktemp("fuzz-experiment")


@FUZZ
@seed(1)
@given(st.data())
def test_the_experiment_loader_takes_structured_mutations(experiment_folder, data):
    """A mutated experiment through `validate`: valid, or one line naming file:line and the field."""
    _validate(experiment_folder, yaml_text(data.draw(mutated(EXPERIMENT))).encode())


@FUZZ
@seed(2)
@given(st.data())
def test_the_experiment_loader_takes_spoilt_bytes(experiment_folder, data):
    """Truncated files and bytes that are not UTF-8: one line naming the file."""
    _validate(experiment_folder, data.draw(spoilt_bytes(yaml_text(EXPERIMENT))))


@pytest.fixture(scope="module")
def sweep_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-sweep")
    (d / "base.yaml").write_text(yaml_text({k: EXPERIMENT[k] for k in ("model", "reference", "engines", "samples")}))
    return d


@FUZZ
@seed(3)
@given(st.data())
def test_the_sweep_loader_takes_structured_mutations(sweep_folder, data):
    path = sweep_folder / "sweep.yaml"
    text = yaml_text(data.draw(mutated(SWEEP))) if data.draw(st.booleans()) else None
    path.write_bytes(text.encode() if text is not None else data.draw(spoilt_bytes(yaml_text(SWEEP))))
    try:
        sweep = load_sweep(path)
    except CrossengineError as exc:
        assert one_line_naming(f"error: {exc}", path), str(exc)
        OUTCOMES["sweep", "one line"] += 1
    else:
        assert [m.name for m in sweep.members()]
        OUTCOMES["sweep", "accepted"] += 1


@FUZZ
@seed(4)
@given(st.data(), st.sampled_from(["generic", "prime-rl"]), st.booleans())
def test_the_dump_readers_take_structured_mutations(tmp_path_factory, data, layout, parquet):
    """A good record, then a mutated one: the good one reads; the mutated one reads or is one line naming FILE:LINE (row)."""
    good = GENERIC if layout == "generic" else PRIME
    bad = data.draw(mutated(good))
    folder = tmp_path_factory.mktemp("dump")
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "d.parquet"
        try:
            pq.write_table(pa.Table.from_pylist([good, bad]), path)
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            OUTCOMES[f"dump {layout} parquet", "not writable as Parquet"] += 1
            return  # pyarrow cannot hold this mutation in one table: no such Parquet file can exist
    else:
        path = folder / "d.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    dump = DumpFile(path, layout)
    dump.vocab_size = 512
    entries = list(dump.index())
    assert len(entries) == 2
    kind = f"dump {layout} {'parquet' if parquet else 'jsonl'}"
    for n, (_, pointer, _) in enumerate(entries):
        try:
            dump.read(pointer)
            OUTCOMES[kind, "accepted"] += n
        except RecordError as exc:
            OUTCOMES[kind, "one line"] += 1
            # in JSONL the unspoilt record always reads; in Parquet one column type holds both rows, so a
            # mutation can make the good row's values unreadable too: then it is named by its own row
            assert n == 1 or parquet, str(exc)
            message = str(exc)
            here = f"{path}:row {n + 1}: " if parquet else f"{path}:{n + 1}: "
            assert message.startswith(here) and "\n" not in message, message
