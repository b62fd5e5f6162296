"""After a wave's last batch: each `refit:` engine loads its checkpoints fresh, and its tables and lines are written.

The comparison itself runs in the engine's worker (crossengine/adapters/refit.py); the driver receives only log-prob columns
and findings, writes refit.parquet and refit_params.parquet (appended to by later waves and resumed runs), the summary
under run.json's `refit`, and one line per step. A failure here is one line naming the engine; the run goes on.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from crossengine.compare.refit import refit_line, refit_summary, refit_tables
from crossengine.errors import EngineFailure
from crossengine.results import write_table


def finish_refits(runner, pool, wave) -> None:
    if runner.localize_only:  # no batch was scored: nothing to compare
        return
    for inst in wave:
        if inst.spec.refit is None or inst.name in runner.dead:
            continue
        t = time.time()
        try:
            steps = runner.fetch(inst.name, pool.call(inst.name, "refit_finish"), "loading its refit checkpoints fresh")
        except EngineFailure as exc:
            runner.errors.append({"sample_id": "", "engine": inst.name, "error": str(exc)})
            runner.warn(f"error: {exc}")
            continue
        tokens, audit = refit_tables(inst.name, steps)
        root = runner.run_dir.root
        _append(root / "refit.parquet", tokens)
        _append(root / "refit_params.parquet", audit)
        summary = refit_summary(tokens.to_pandas(), audit.to_pandas())
        meta = runner.run_dir.read_meta()
        meta.refit[inst.name] = meta.refit.get(inst.name, []) + summary
        runner.run_dir.write_meta(meta)
        for s in summary:
            runner.say_plain(f"refit: {refit_line(inst.name, s)}")
        runner.timings[f"{inst.name}.refit_fresh_s"] = time.time() - t


def _append(path: Path, table: pa.Table) -> None:
    """Write `table`, after what an earlier wave or session wrote there."""
    if path.exists():
        table = pa.concat_tables([pq.read_table(path).cast(table.schema), table])
    write_table(path, table)
