"""Localisation after a wave's batches: the runner's step, apart so that the runner stays the run's outline.

The comparison itself is crossengine/compare/localize.py (captures in the workers, alignment, tolerance); here are the
samples it takes, the tables it writes and the lines it prints.
"""

from __future__ import annotations

import time

import pandas as pd
import pyarrow as pa

from crossengine.compare.growth import growth_lines, growth_table
from crossengine.compare.localize import localize_wave, print_localization
from crossengine.results import write_table
from crossengine.run.modes import raw_batch


def localise_wave(runner, pool) -> None:
    """`localize:` (or `crossengine localize`) for the wave's engines: the first module where each candidate leaves the
    reference, the error growth by layer and the weight/buffer audit; layers.parquet, localize.parquet and buffers.parquet
    (later waves add their candidates)."""
    t = time.time()
    n = min(runner.plan.experiment.localize.samples, len(runner.plan.experiment.samples))
    samples = runner.prepare(pool, list(range(n)), "preparing samples to localise")
    raw = {r.id: r for r in raw_batch(runner.plan, list(range(n)), runner.record_error)}
    layers, buffers, messages = localize_wave(pool, runner.plan, samples, raw)
    growth = growth_table(layers)
    for name, frame in (("layers", layers), ("buffers", buffers), ("localize", growth)):
        path = runner.run_dir.root / f"{name}.parquet"
        if path.exists() and not frame.empty:  # later waves add their candidates
            frame = pd.concat([pd.read_parquet(path), frame], ignore_index=True)
        if not frame.empty:
            write_table(path, pa.Table.from_pandas(frame, preserve_index=False))
    runner.timings["localize_s"] = runner.timings.get("localize_s", 0.0) + time.time() - t
    if runner.console is not None:
        print_localization(layers, buffers, runner.plan.experiment.localize.tolerance, runner.console, messages + growth_lines(growth))
