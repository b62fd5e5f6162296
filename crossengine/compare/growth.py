"""Error growth by layer: whether a candidate's gap appears at one layer or compounds through all of them.

From the aligned module pairs (layers.parquet), the relative error ‖cand − ref‖ / ‖ref‖ (over the localised positions)
of the residual stream after each decoder layer, of each layer's attention and MLP block output, and of the logits:
localize.parquet, one line per candidate and one chart in the report. Blocks are read from the reference's module names
(`layers.N`, `blocks.N`, `h.N` and their `self_attn`/`attention`/`attn`, `mlp`/`feed_forward`/`block_sparse_moe`), the
logits from its output layer (`lm_head`, vLLM's `logits_processor`).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from crossengine.identity import display_name

_LAYER = r"(?:^|\.)(?:layers|blocks|h)\.(\d+)"
_BLOCKS = [
    (re.compile(_LAYER + r"$"), "residual"),
    (re.compile(_LAYER + r"\.(?:self_attn|attention|attn)$"), "attention"),
    (re.compile(_LAYER + r"\.(?:mlp|feed_forward|block_sparse_moe|moe)$"), "mlp"),
]
_LOGITS = re.compile(r"(?:^|\.)(?:lm_head|logits_processor)$")
PARTS = ("residual", "attention", "mlp", "logits")


def block_of(key: str) -> tuple[int, str | None]:
    """(layer, part) of a module's canonical name: a decoder layer's residual stream, attention or MLP block, or the
    logits (layer -1 until the table knows how many layers there are); (-1, None) for anything else."""
    for pattern, part in _BLOCKS:
        m = pattern.search(key)
        if m:
            return int(m.group(1)), part
    return (-1, "logits") if _LOGITS.search(key) else (-1, None)


def growth_table(layers: pd.DataFrame) -> pd.DataFrame:
    """localize.parquet: per candidate, sample, layer and part, the relative error (logits after the last layer)."""
    if layers.empty or "part" not in layers:
        return pd.DataFrame()
    rows = layers[layers["part"].notna()].copy()
    if rows.empty:
        return pd.DataFrame()
    last = rows.loc[rows["part"] != "logits", "layer"].max()
    rows.loc[rows["part"] == "logits", "layer"] = (int(last) + 1) if pd.notna(last) else 0
    cols = ["cand_engine", "variant", "sample_id", "layer", "part", "module", "cand_module", "rel_error", "max_abs_diff"]
    rows["part"] = pd.Categorical(rows["part"], categories=PARTS)
    out = rows[cols].sort_values(["cand_engine", "variant", "sample_id", "layer", "part"]).reset_index(drop=True)
    out["part"] = out["part"].astype(str)
    out["layer"] = out["layer"].astype(np.int32)
    return out


def growth_lines(growth: pd.DataFrame) -> list[str]:
    """One line per candidate: the residual stream's relative error at its first and last layer (worst sample), how
    much it grew, the layer where it first jumps most, and the logits'."""
    lines = []
    if growth.empty:
        return lines
    for (cand, variant), g in growth.groupby(["cand_engine", "variant"], sort=False):
        per = g.groupby(["part", "layer"])["rel_error"].max()
        stream = per.get("residual")
        if stream is None or stream.empty:
            continue
        first, last = float(stream.iloc[0]), float(stream.iloc[-1])
        ratio = np.divide(stream.values[1:], np.maximum(stream.values[:-1], 1e-30))
        jump = f"; largest step at layer {int(stream.index[1 + int(np.argmax(ratio))])} (×{ratio.max():.3g})" if len(ratio) else ""
        logits = per.get("logits")
        tail = f"; logits {float(logits.max()):.3g}" if logits is not None and len(logits) else ""
        grew = f"×{last / first:.3g}" if first > 0 else "from exactly 0"
        lines.append(
            f"{display_name(str(cand), str(variant))}: relative error of the residual stream {first:.3g} after layer {int(stream.index[0])} → "
            f"{last:.3g} after layer {int(stream.index[-1])} ({grew} over {len(stream)} layers{jump}){tail} (localize.parquet)"
        )
    return lines
