"""Fused projections: one engine's `qkv_proj` against another's `q_proj`, `k_proj`, `v_proj`.

vLLM (and other serving code) stacks projections that share an input into one matrix multiply: `qkv_proj` is
q, k and v side by side along the features, `gate_up_proj` is gate and up. Transformers keeps them apart. Where one
side has a fused module and the other has all of its parts under the same parent, the parts' outputs are
concatenated in the fused name's order into one record that aligns with it by name, shape and values: no map per
architecture. The fused name is read, not listed: its stem split at `_` (`gate_up` -> gate, up) or into letters
(`qkv` -> q, k, v), each part being a sibling `<part><suffix>` (`_proj`).
"""

from __future__ import annotations

import numpy as np


def _parts(key: str, have: set[str]) -> list[str] | None:
    """The sibling keys a fused key stacks, where every one of them is in `have`."""
    parent, _, leaf = key.rpartition(".")
    stem, sep, suffix = leaf.rpartition("_")
    if not sep or not stem:
        return None
    prefix = f"{parent}." if parent else ""
    for split in (stem.split("_"), list(stem)):
        names = [f"{prefix}{p}_{suffix}" for p in split]
        if len(names) > 1 and all(n in have for n in names):
            return names
    return None


def fuse_parts(side: list[dict], other: list[dict]) -> list[dict]:
    """`side`'s records plus, for each fused module of `other` that `side` computes in parts, their concatenation
    (named `parent.q_proj+k_proj+v_proj`, keyed as the fused module), placed where the first of its parts is: the fused
    module runs before whatever follows any part (Qwen3 norms q before it computes k: q_proj, q_norm, k_proj, ...)."""
    keys = {r["key"]: i for i, r in enumerate(side)}
    extra: dict[int, list[dict]] = {}
    for fused in other:
        if fused["key"] in keys:
            continue
        parts = _parts(fused["key"], set(keys))
        if parts is None:
            continue
        records = [side[keys[p]] for p in parts]
        if len({r["output"].shape[0] for r in records}) != 1:
            continue
        parent = records[0]["name"].rpartition(".")[0]
        name = f"{parent}.{'+'.join(r['name'].rpartition('.')[2] for r in records)}"
        merged = {**records[0], "name": name, "key": fused["key"], "output": np.concatenate([r["output"] for r in records], axis=1)}
        extra.setdefault(min(keys[p] for p in parts), []).append(merged)
    if not extra:
        return side
    out = []
    for i, r in enumerate(side):
        out.extend(extra.get(i, []))
        out.append(r)
    return out
