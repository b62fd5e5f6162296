"""Millions of tokens: two rollout dumps through the whole pipeline vs a plain pandas/pyarrow script.

    python bench/millions.py [--tokens 2000000] [--length 1024] [--small 200000] [--batch-size 8]

Two dumps of N scored tokens (generic Parquet layout: records of `--length` tokens, the first 16 a prompt; random ids,
the candidate's log-probs the reference's plus N(0, 0.01)), both `logprobs` engines: no model runs, so what is timed is
crossengine itself: reading, matching, metrics, Parquet parts, summary, alarms, report. Beside it, the script a user
would write instead: read both files with pyarrow, one row per token, join on (id, position), compute the same
per-token columns the dumps allow and write them as Parquet. Both in this one invocation, back to back.

Prints each ratio as N.NNx: crossengine's wall time (its CLI process, Ray's start included) and the run's own stages
without Ray's start and the engines' load, each over the script's time; the driver's peak and private memory at
`--small` and at N tokens (flat: ≤ 10 % growth); report.html's size and the time headless Chromium takes to load it.
Goals: ≤ 1.2x the script; driver memory flat; report.html ≤ 20 MB, opening in ≤ 5 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import tmpdir

PROMPT = 16


def make_dumps(d: Path, tokens: int, length: int, seed: int = 0) -> tuple[Path, Path]:
    """(reference, candidate) Parquet dumps holding `tokens` scored tokens together each."""
    rng = np.random.default_rng(seed)
    n = max(1, tokens // (length - PROMPT))
    ids = rng.integers(3, 500, (n, length), dtype=np.int32)
    ref = -rng.exponential(1.0, (n, length - PROMPT)).astype(np.float32)
    cand = np.minimum(ref + rng.normal(0, 0.01, ref.shape), 0).astype(np.float32)  # still log-probs
    paths = []
    for name, lp in (("ref", ref), ("cand", cand)):
        table = pa.table(
            {
                "id": [f"r{i}" for i in range(n)],
                "token_ids": pa.FixedSizeListArray.from_arrays(ids.reshape(-1), length).cast(pa.list_(pa.int32())),
                "prompt_len": np.full(n, PROMPT, np.int32),
                "logprobs": pa.FixedSizeListArray.from_arrays(lp.reshape(-1), length - PROMPT).cast(pa.list_(pa.float32())),
            }
        )
        paths.append(d / f"{name}.parquet")
        pq.write_table(table, paths[-1])
    return paths[0], paths[1]


def run_crossengine(d: Path, ref: Path, cand: Path, batch_size: int) -> dict:
    """`crossengine run` + `report --html` in a fresh process: wall, run.json stages, the driver's peak/private MB."""
    exp = d / "x.yaml"
    exp.write_text(f"model: tiny-text\nreference: ref\nengines:\n  ref: {{type: logprobs, path: {ref}}}\n  cand: {{type: logprobs, path: {cand}}}\nbatch_size: {batch_size}\nsamples:\n  - dump: ref\n")
    code = (
        "import resource, sys, time; from typer.main import get_command; from crossengine.cli import app\n"
        "t = time.perf_counter()\n"
        f"get_command(app).main(['run', {str(exp)!r}, '--output-dir', {str(d / 'results')!r}, '--run-id', 'm'], standalone_mode=False)\n"
        "wall = time.perf_counter() - t\n"
        "st = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)\n"
        "print(wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, float(st['RssAnon'].split()[0]) / 1024, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"crossengine run failed:\n{out.stderr[-3000:]}")
    wall, peak, anon = (float(x) for x in out.stderr.strip().splitlines()[-1].split())
    run = d / "results" / "m"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "crossengine.cli", "report", str(run), "--html"], check=True, capture_output=True)
    report_s = time.perf_counter() - t
    meta = json.loads((run / "run.json").read_text())
    if meta["errors"]:
        sys.exit(f"crossengine run had {len(meta['errors'])} errors, e.g. {meta['errors'][0]}")
    stages = meta.get("stages", {})
    return {"wall": wall, "peak": peak, "anon": anon, "stages": stages, "report_s": report_s, "run": run}


def plain_script(d: Path, ref: Path, cand: Path) -> float:
    """What a user writes instead: one row per scored token from each file, joined, the per-token columns, Parquet."""
    t = time.perf_counter()
    sides = {}
    for name, path in (("ref", ref), ("cand", cand)):
        table = pq.read_table(path, columns=["id", "prompt_len", "logprobs"])
        lengths = pa.compute.list_value_length(table["logprobs"]).to_numpy()
        prompt = table["prompt_len"].to_numpy()
        sides[name] = {
            "sample_id": np.repeat(table["id"].to_numpy(zero_copy_only=False), lengths),
            "position": np.concatenate([np.arange(p, p + n) for p, n in zip(prompt, lengths)]),
            f"lp_{name}": table["logprobs"].combine_chunks().flatten().to_numpy(),
        }
    import pandas as pd

    df = pd.DataFrame(sides["ref"]).merge(pd.DataFrame(sides["cand"]), on=["sample_id", "position"])
    log_ratio = df["lp_cand"].to_numpy(np.float64) - df["lp_ref"].to_numpy(np.float64)
    df["abs_lp_diff"] = np.abs(log_ratio)
    df["prob_ratio"] = np.exp(log_ratio)
    df["k3"] = np.exp(-log_ratio) - 1 + log_ratio
    df.to_parquet(d / "plain.parquet")
    return time.perf_counter() - t


def chromium_load_s(page: Path) -> float | None:
    """Seconds headless Chromium takes to load the page and run its scripts (--dump-dom returns after load)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return None
    t = time.perf_counter()
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()], capture_output=True, timeout=120)
    return time.perf_counter() - t


def measure(tokens: int, length: int, batch_size: int) -> dict:
    d = tmpdir()
    ref, cand = make_dumps(d, tokens, length)
    plain = plain_script(d, ref, cand)
    ours = run_crossengine(d, ref, cand, batch_size)
    stages = ours["stages"]
    own = sum(v for k, v in stages.items() if k not in ("total", "start Ray", "load engines"))
    page = ours["run"] / "report.html"
    return {**ours, "plain": plain, "own": own, "report_mb": page.stat().st_size / 2**20, "open_s": chromium_load_s(page)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--small", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    results = {n: measure(n, args.length, args.batch_size) for n in (args.small, args.tokens)}
    for n, r in results.items():
        print(f"{n:,} tokens: crossengine {r['wall']:.1f}s (its stages without Ray's start and the load: {r['own']:.1f}s), plain script {r['plain']:.1f}s")
        print(f"  ratio, whole run:   {r['wall'] / r['plain']:.2f}x   (goal <= 1.20x)")
        print(f"  ratio, own stages:  {r['own'] / r['plain']:.2f}x")
        print("  stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["stages"].items()))
        print(f"  driver: peak RSS {r['peak']:.0f} MB, private {r['anon']:.0f} MB; report.html {r['report_mb']:.1f} MB written in {r['report_s']:.1f}s, Chromium load {r['open_s']:.1f}s")
    small, large = results[args.small], results[args.tokens]
    print(f"driver private memory {args.small:,} -> {args.tokens:,} tokens: {100 * (large['anon'] / small['anon'] - 1):+.1f}% (goal <= +10%)")


if __name__ == "__main__":
    main()
