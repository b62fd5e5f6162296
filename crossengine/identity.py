"""Who a token row belongs to, in one place.

A row's `cand_engine` is an engine of the experiment; `variant` is BASE for that engine
itself, the variant's name for a variant of it, or SAMPLED for the generator's own
sampling-time log-probs (generation mode). Config rejects engines and variants named like
the two reserved values, so the three can never be confused in the Parquet.
"""

from __future__ import annotations

import numpy as np

BASE = "base"
SAMPLED = "sampled"
RESERVED = (BASE, SAMPLED)


def display_name(cand_engine: str, variant: str) -> str:
    """How tables and reports name a row's source: the engine, the variant, or ENGINE:sampled."""
    cand_engine, variant = str(cand_engine), str(variant)
    if variant == BASE:
        return cand_engine
    return f"{cand_engine}:{SAMPLED}" if variant == SAMPLED else variant


def display_names(df):
    """display_name of every row of a frame with cand_engine and variant columns (an object array): computed once per
    pair, not per row (a run's token rows are millions, its pairs a handful)."""
    if not len(df):
        return np.array([], dtype=object)
    groups = df.groupby(["cand_engine", "variant"], observed=True, dropna=False)
    names = np.array([display_name(c, v) for c, v in groups.size().index], dtype=object)  # numbered as ngroup numbers them
    return names[groups.ngroup().to_numpy()]
