"""Localisation: the first module, and the first token, where a candidate leaves the reference.

Each torch engine (hf, native) runs the chosen samples with forward hooks on every module
(or those `localize.modules` names); module outputs are aligned across engines by forward
order, output shape and values, with names as anchors (`align`), so two implementations
with their own module names need no hand-written map (`localize.module_map` still
overrides). Writes layers.parquet (one row per candidate and aligned module pair: max/mean
|Δ|, cosine, first position over tolerance, how much its inputs already differed) and
buffers.parquet (the audit of every engine's buffers and unloaded weights). When nothing
matches, the run says why, naming both sides' modules: never an empty table in silence.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from crossengine.adapters.base import SampleError
from crossengine.compare.fused import fuse_parts
from crossengine.compare.growth import block_of
from crossengine.identity import display_name

# OLMo-core module names -> HF's (after HF's "model." prefix is stripped)
OLMO_CORE_TO_HF = [
    (r"^blocks\.(\d+)$", r"layers.\1"),
    (r"^blocks\.(\d+)\.attention$", r"layers.\1.self_attn"),
    (r"^blocks\.(\d+)\.feed_forward$", r"layers.\1.mlp"),
    (r"^embeddings$", "embed_tokens"),
    (r"^lm_head\.norm$", "norm"),
]


def canonical(name: str, engine_kind: str, extra: dict[str, str]) -> str:
    """A module's name in the shared vocabulary used to match engines."""
    if name in extra:
        return extra[name]
    name = re.sub(r"^model\.(language_model\.)?", "", name)
    if engine_kind == "olmo-core":
        for pattern, repl in OLMO_CORE_TO_HF:
            if re.match(pattern, name):
                return re.sub(pattern, repl, name)
    return name


def _signature(x: np.ndarray, n: int = 64) -> np.ndarray:
    """A module output's fingerprint: its first n positions projected on two fixed random
    directions (seeded by the feature size), so equal outputs give equal fingerprints."""
    k = min(n, x.shape[0])
    directions = np.random.default_rng(x.shape[1]).standard_normal((x.shape[1], 2)) / np.sqrt(x.shape[1])
    sig = np.zeros((n, 2))
    sig[:k] = x[:k].astype(np.float64) @ directions
    return sig.reshape(-1)


def _layer_index(name: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\d+", name))


def align(ref: list[dict], cand: list[dict]) -> list[tuple[int, int]]:
    """Pairs (i, j) of reference and candidate modules that compute the same thing.

    Modules are matched in forward order (a monotone alignment, solved by dynamic
    programming) among those with the same output shape, scored mostly by how alike their
    outputs are (a fixed random projection: equal outputs score highest), with equal names
    (after `canonical`) as strong anchors and the same leaf/container kind, layer numbers
    and last name part as tiebreaks. Identical trees align by name;
    two implementations with their own names (HF vs OLMo-core, two ports of one model) align
    without a hand-written map.
    """
    n, m = len(ref), len(cand)
    if not n or not m:
        return []
    shape_r = [r["output"].shape for r in ref]
    shape_c = [c["output"].shape for c in cand]
    sig_r = np.stack([_signature(r["output"]) for r in ref])
    sig_c = np.stack([_signature(c["output"]) for c in cand])
    scale = np.maximum(np.linalg.norm(sig_r, axis=1)[:, None], np.linalg.norm(sig_c, axis=1)[None, :]) + 1e-12
    distance = np.linalg.norm(sig_r[:, None, :] - sig_c[None, :, :], axis=-1) / scale  # relative, 0 when equal
    alike = 1.0 / (1.0 + 100.0 * distance)  # 1 for equal outputs, ~0 for unrelated ones
    score = np.zeros((n, m))
    for i, r in enumerate(ref):
        last_r, idx_r = r["key"].rpartition(".")[2], _layer_index(r["key"])
        for j, c in enumerate(cand):
            if shape_r[i] != shape_c[j]:
                continue
            s = 0.1 + 4.0 * alike[i, j] + 0.5 * (r["leaf"] == c["leaf"])  # a pair that merely fits scores little
            if r["key"] == c["key"]:
                s += 6.0
            else:
                s += 0.25 * (last_r == c["key"].rpartition(".")[2]) + 0.5 * (idx_r == _layer_index(c["key"]))
            score[i, j] = s
    best = np.zeros((n + 1, m + 1))
    for i in range(1, n + 1):
        diag = np.where(score[i - 1] > 0, best[i - 1, :-1] + score[i - 1], -np.inf)
        row = np.maximum(best[i - 1, 1:], diag)
        best[i, 1:] = np.maximum.accumulate(row)
    pairs = []
    i, j = n, m
    while i > 0 and j > 0:
        if best[i, j] == best[i - 1, j]:
            i -= 1
        elif best[i, j] == best[i, j - 1]:
            j -= 1
        else:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
    return pairs[::-1]


def _diff(r: np.ndarray, c: np.ndarray, tol: float) -> dict:
    r64, c64 = r.astype(np.float64), c.astype(np.float64)
    diff = np.abs(r64 - c64)
    per_pos = diff.max(axis=1)
    over = np.flatnonzero(per_pos > tol)
    norms = np.linalg.norm(r64, axis=1) * np.linalg.norm(c64, axis=1)
    cos = np.where(norms > 0, (r64 * c64).sum(1) / np.where(norms > 0, norms, 1), 1.0)
    scale = np.linalg.norm(r64)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "rel_error": float(np.linalg.norm(r64 - c64) / scale) if scale > 0 else (np.inf if diff.max() > 0 else 0.0),
        "cos_sim": float(cos.mean()),
        "first_position": int(over[0]) if len(over) else -1,
    }


def compare(ref: list[dict], cand: list[dict], tol: float) -> pd.DataFrame:
    """Row per aligned module pair, in the reference's forward order.

    Each record is a capture (name, key, leaf, output, input). `input_max_abs_diff` compares
    what the two modules were given: over tolerance at the first divergent module means the
    difference came from outside it (an uncaptured function, a buffer), not from inside.
    """
    rows = []
    for i, j in align(ref, cand):
        r, c = ref[i], cand[j]
        layer, part = block_of(r["key"])
        row = {"order": i, "module": r["name"], "cand_module": c["name"], "leaf": r["leaf"], "layer": layer, "part": part, **_diff(r["output"], c["output"], tol), "input_max_abs_diff": None}
        if r["input"] is not None and c["input"] is not None and r["input"].shape == c["input"].shape:
            row["input_max_abs_diff"] = float(np.abs(r["input"].astype(np.float64) - c["input"].astype(np.float64)).max())
        rows.append(row)
    return pd.DataFrame(rows)


def first_divergence(layers: pd.DataFrame, tol: float) -> pd.Series | None:
    """The earliest module over tolerance; `origin` says whether its inputs already differed."""
    over = layers[layers["max_abs_diff"] > tol]
    if not len(over):
        return None
    first = over.sort_values(["order", "sample_id"] if "sample_id" in over else ["order"]).iloc[0].copy()
    inp = first.get("input_max_abs_diff")
    first["origin"] = "inputs" if inp is not None and not pd.isna(inp) and inp > tol else "inside"
    return first


def _unmatched(ref_name: str, cand_name: str, ref: list[dict], cand: list[dict]) -> str:
    few = lambda caps: ", ".join(c["name"] for c in caps[:5]) + (", ..." if len(caps) > 5 else "")  # noqa: E731
    return (
        f"{cand_name}: no module matches the reference's (different shapes or nothing captured): "
        f"{ref_name} has [{few(ref) or 'none'}], {cand_name} has [{few(cand) or 'none'}]; "
        "set localize.modules to what both compute, or localize.module_map"
    )


def _alignment_notes(ref_name: str, cand_name: str, table: pd.DataFrame, ref_cap, cand_cap, ref_k, cand_k) -> list[str]:
    """What the alignment did beyond equal names: pairs under other names, and each side's modules with no counterpart
    (never a silent gap)."""
    notes = []
    renamed = table.loc[table["module"] != table["cand_module"], ["module", "cand_module"]]
    if len(renamed):
        pairs = ", ".join(f"{a} ↔ {b}" for a, b in renamed.head(4).itertuples(index=False))
        notes.append(f"{cand_name}: {len(table)} modules aligned by forward order, shape and values ({len(renamed)} with other names: {pairs}, ...; all in layers.parquet's cand_module)")
    for who, caps, used, col in ((ref_name, ref_cap, ref_k, "module"), (cand_name, cand_cap, cand_k, "cand_module")):
        paired = set(table[col])
        paired |= {f"{f.rpartition('.')[0]}.{part}" for f in paired if "+" in f for part in f.rpartition(".")[2].split("+")}  # compared inside a fused pair
        alone = [c["name"] for c in used if c["name"] not in paired and "+" not in c["name"]] + [c["name"] for c in caps if c.get("internal")]
        if alone:
            few = ", ".join(alone[:6]) + (", ..." if len(alone) > 6 else "")
            notes.append(f"{who}: {len(alone)} modules have no counterpart in {cand_name if who == ref_name else ref_name} and are not compared: {few}")
    return notes


def localize_wave(pool, plan, samples, raw: dict) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Trace the reference and every torch candidate of one wave; returns (layers, buffers, messages).
    `raw` (sample id -> RawSample) lets a candidate with `inputs: own` trace its own inputs."""
    import ray

    spec = plan.experiment.localize
    torch_engines = [i for i in pool.instances if i.traits.captures_modules]  # the reference first
    traced = samples[: spec.samples]
    kind = {i.name: pool.infos[i.name].get("implementation") or i.spec.type for i in torch_engines}
    own = [raw[s.sample_id] for s in traced]
    futures = {i.name: pool.capture(i.name, traced, spec.modules, spec.max_positions, own if i.spec.inputs == "own" else None) for i in torch_engines}
    captures = {name: ray.get(f) for name, f in futures.items()}
    ref_name = plan.reference.name
    messages = []
    if ref_name not in captures:
        messages.append(
            f"localisation skipped: the reference {ref_name!r} is a {plan.reference.spec.type} engine, which cannot capture its modules; "
            "localisation needs a reference that can (`crossengine engines`: capture modules)"
        )
        return pd.DataFrame(), pd.DataFrame(), messages
    long = [s.sample_id for s in traced if len(s) > spec.max_positions]
    if long:
        messages.append(f"localisation kept the first {spec.max_positions} positions of samples {', '.join(long)} (localize.max_positions)")

    def keyed(engine: str, caps: list[dict]) -> list[dict]:
        extra = spec.module_map.get(engine, {})
        return [{**c, "key": canonical(c["name"], kind[engine], extra)} for c in caps if not c.get("internal")]

    layer_rows, noted = [], set()
    for inst in torch_engines:
        if inst.is_reference:
            continue
        for s, ref_cap, cand_cap in zip(traced, captures[ref_name], captures[inst.name]):
            failed = next((c for c in (ref_cap, cand_cap) if isinstance(c, SampleError)), None)
            if failed is not None:  # an engine that cannot run this sample (too long for it): said, the others go on
                who = ref_name if failed is ref_cap else inst.name
                messages.append(f"{inst.name}: sample {s.sample_id} not localised: {who} cannot run it ({failed.message})")
                continue
            ref_k, cand_k = keyed(ref_name, ref_cap), keyed(inst.name, cand_cap)
            ref_k, cand_k = fuse_parts(ref_k, cand_k), fuse_parts(cand_k, ref_k)  # one side's qkv_proj, the other's q, k, v
            table = compare(ref_k, cand_k, spec.tolerance)
            if table.empty:
                messages.append(_unmatched(ref_name, inst.name, ref_cap, cand_cap))
                continue
            if inst.name not in noted:  # once per candidate, at its first localised sample
                noted.add(inst.name)
                messages.extend(_alignment_notes(ref_name, inst.name, table, ref_cap, cand_cap, ref_k, cand_k))
            table.insert(0, "sample_id", s.sample_id)
            table.insert(0, "variant", inst.variant)
            table.insert(0, "cand_engine", inst.cand_engine)
            layer_rows.append(table)
    layers = pd.concat(layer_rows, ignore_index=True) if layer_rows else pd.DataFrame()
    buffers = pd.DataFrame()
    if spec.audit_buffers:
        against = plan.reference.model_path if plan.reference.traits.audits_buffers else None  # the weights the comparison assumes
        audits = {i.name: ray.get(pool.call(i.name, "audit", against)) for i in torch_engines if i.traits.audits_buffers}
        buffers = pd.DataFrame([{"engine": name, **row} for name, rows in audits.items() for row in rows])
        if not buffers.empty:
            buffers["issues"] = buffers["issues"].map(lambda xs: "; ".join(xs))
    return layers, buffers, messages


def print_localization(layers: pd.DataFrame, buffers: pd.DataFrame, tol: float, console, messages: list[str] = ()) -> None:
    from rich.table import Table

    for m in messages:
        console.print(m, highlight=False, soft_wrap=True, markup=False)
    if not layers.empty:
        for (cand, variant), g in layers.groupby(["cand_engine", "variant"], sort=False):
            name = display_name(cand, variant)
            first = first_divergence(g, tol)
            if first is None:
                console.print(f"{name}: no module differs by more than {tol:g} from the reference", highlight=False)
            else:
                where = "already present in its inputs (it came from outside the module)" if first["origin"] == "inputs" else "appearing inside it (its inputs agree)"
                other = f" ({cand}'s {first['cand_module']})" if first["cand_module"] != first["module"] else ""
                console.print(
                    f"{name}: first divergence at module [bold]{first['module']}[/bold]{other}, token position {first['first_position']} "
                    f"(sample {first['sample_id']}, max |Δ| {first['max_abs_diff']:.3g}), {where}",
                    soft_wrap=True,
                )
            table = Table(title=f"layers: {name} vs reference", title_justify="left")
            for col in ("module", "max |Δ|", "mean |Δ|", "cos", "first pos"):
                table.add_column(col, justify="left" if col == "module" else "right")
            per_module = g.groupby(["order", "module"], sort=True).agg(
                max_abs_diff=("max_abs_diff", "max"), mean_abs_diff=("mean_abs_diff", "mean"), cos_sim=("cos_sim", "min"), first_position=("first_position", "max")
            )
            for (_, module), r in per_module.iterrows():
                mark = "[red]" if r["max_abs_diff"] > tol else ""
                table.add_row(f"{mark}{module}", f"{r['max_abs_diff']:.3g}", f"{r['mean_abs_diff']:.3g}", f"{r['cos_sim']:.6f}", str(int(r["first_position"])))
            console.print(table)
    if not buffers.empty:
        bad = buffers[~buffers["ok"]]
        console.print(f"audit: {len(buffers)} parameters and buffers checked, {len(bad)} with problems", highlight=False)
        for _, r in bad.iterrows():
            kind = "parameter" if r["kind"] == "parameter" else "persistent" if r["persistent"] else "non-persistent"
            console.print(f"  [red]{r['engine']}[/red]: {r['buffer']} ({kind}): {r['issues']}")
