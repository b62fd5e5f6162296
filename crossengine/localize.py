"""Localisation: the first module, and the first token, where a candidate leaves the reference.

Each torch engine (hf, native) runs the chosen samples with forward hooks; module outputs
are matched across engines by name (same architecture), by the built-in HF <-> OLMo-core
mapping, or by the experiment's `localize.module_map`. Writes layers.parquet (one row per
candidate and module: max/mean |Δ|, cosine, first position over tolerance) and
buffers.parquet (the buffer audit of every engine).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

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


def compare(ref: list[tuple[str, np.ndarray]], cand: list[tuple[str, np.ndarray]], tol: float) -> pd.DataFrame:
    """Row per module both engines produced, in the reference's forward order."""
    cand_by_name = {}
    for name, x in cand:
        cand_by_name.setdefault(name, x)  # a module called twice: its first call
    rows, seen = [], set()
    for order, (name, r) in enumerate(ref):
        if name in seen or name not in cand_by_name:
            continue
        seen.add(name)
        c = cand_by_name[name]
        if r.shape != c.shape:
            rows.append({"order": order, "module": name, "shape_mismatch": f"{r.shape} vs {c.shape}"})
            continue
        r64, c64 = r.astype(np.float64).reshape(r.shape[0], -1), c.astype(np.float64).reshape(c.shape[0], -1)
        diff = np.abs(r64 - c64)
        per_pos = diff.max(axis=1)
        over = np.flatnonzero(per_pos > tol)
        norms = np.linalg.norm(r64, axis=1) * np.linalg.norm(c64, axis=1)
        cos = np.where(norms > 0, (r64 * c64).sum(1) / np.where(norms > 0, norms, 1), 1.0)
        rows.append({
            "order": order, "module": name, "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "cos_sim": float(cos.mean()), "first_position": int(over[0]) if len(over) else -1, "shape_mismatch": None,
        })
    return pd.DataFrame(rows)


def first_divergence(layers: pd.DataFrame, tol: float) -> pd.Series | None:
    over = layers[layers["max_abs_diff"] > tol]
    return over.sort_values("order").iloc[0] if len(over) else None


def localize_wave(pool, plan, samples) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trace the reference and every torch candidate of one wave; returns (layers, buffers)."""
    import ray

    spec = plan.experiment.localize
    torch_engines = [i for i in pool.instances if i.spec.type in ("hf", "native")]  # the reference first
    traced = samples[: spec.samples]
    kind = {i.name: pool.infos[i.name]["extra"].get("native", i.spec.type) for i in torch_engines}
    futures = {i.name: pool.actors[i.name].capture.remote(traced, spec.modules) for i in torch_engines}
    captures = {name: ray.get(f) for name, f in futures.items()}
    ref_name = plan.reference.name
    if ref_name not in captures:
        return pd.DataFrame(), pd.DataFrame()

    def named(engine: str, sample_captures):
        extra = spec.module_map.get(engine, {})
        return [(canonical(n, kind[engine], extra), x) for n, x in sample_captures]

    layer_rows = []
    for inst in torch_engines:
        if inst.is_reference:
            continue
        for s, ref_cap, cand_cap in zip(traced, captures[ref_name], captures[inst.name]):
            table = compare(named(ref_name, ref_cap), named(inst.name, cand_cap), spec.tolerance)
            table.insert(0, "sample_id", s.sample_id)
            table.insert(0, "variant", inst.variant)
            table.insert(0, "cand_engine", inst.cand_engine)
            layer_rows.append(table)
    layers = pd.concat(layer_rows, ignore_index=True) if layer_rows else pd.DataFrame()
    buffers = pd.DataFrame()
    if spec.audit_buffers:
        audits = {i.name: ray.get(pool.actors[i.name].audit.remote()) for i in torch_engines}
        buffers = pd.DataFrame([{"engine": name, **row} for name, rows in audits.items() for row in rows])
        if not buffers.empty:
            buffers["issues"] = buffers["issues"].map(lambda xs: "; ".join(xs))
    return layers, buffers


def print_localization(layers: pd.DataFrame, buffers: pd.DataFrame, tol: float, console) -> None:
    from rich.table import Table

    if not layers.empty:
        for (cand, variant), g in layers.groupby(["cand_engine", "variant"], sort=False):
            name = cand if variant == "base" else variant
            first = first_divergence(g, tol)
            if first is None:
                console.print(f"{name}: no module differs by more than {tol:g} from the reference", highlight=False)
            else:
                console.print(f"{name}: first divergence at module [bold]{first['module']}[/bold], token position {first['first_position']} "
                              f"(sample {first['sample_id']}, max |Δ| {first['max_abs_diff']:.3g})")
            table = Table(title=f"layers: {name} vs reference", title_justify="left")
            for col in ("module", "max |Δ|", "mean |Δ|", "cos", "first pos"):
                table.add_column(col, justify="left" if col == "module" else "right")
            per_module = g.groupby(["order", "module"], sort=True).agg(max_abs_diff=("max_abs_diff", "max"), mean_abs_diff=("mean_abs_diff", "mean"),
                                                                        cos_sim=("cos_sim", "min"), first_position=("first_position", "max"))
            for (_, module), r in per_module.iterrows():
                mark = "[red]" if r["max_abs_diff"] > tol else ""
                table.add_row(f"{mark}{module}", f"{r['max_abs_diff']:.3g}", f"{r['mean_abs_diff']:.3g}", f"{r['cos_sim']:.6f}", str(int(r["first_position"])))
            console.print(table)
    if not buffers.empty:
        bad = buffers[~buffers["ok"]]
        console.print(f"buffer audit: {len(buffers)} buffers checked, {len(bad)} with problems", highlight=False)
        for _, r in bad.iterrows():
            kind = "persistent" if r["persistent"] else "non-persistent"
            console.print(f"  [red]{r['engine']}[/red]: {r['buffer']} ({kind}): {r['issues']}")
