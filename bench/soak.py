"""Soak: a long dump-vs-HF run stopped by SIGTERM at random points and resumed each time, as a scheduler
would do to it.

    python bench/soak.py --samples 10000 --stops 5

One uninterrupted run first (the baseline), then the same experiment in a process of its own, sent
SIGTERM at `--stops` random moments (each once a random number of new batches is on disk) and resumed
each time with the exact command it printed. Prints, per segment: the exit code, the seconds from the
signal to the process's end, the batches kept, the driver's peak resident memory; then whether the
final token table is bitwise the baseline's, and whether any process of a stopped run was left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

REPO = Path(__file__).resolve().parents[1]


def write_dump(folder: Path, samples: int, tokens: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    prompt = tokens // 3
    with open(folder / "rollout.jsonl", "w") as f:
        for i in range(samples):
            ids = [1, *rng.integers(3, 500, tokens - 1).tolist()]
            lps = (-rng.exponential(3.0, tokens - prompt)).round(6).tolist()
            f.write(json.dumps({"id": f"r{i:06d}", "token_ids": ids, "prompt_len": prompt, "logprobs": lps}) + "\n")
    (folder / "soak.yaml").write_text(
        "model: tiny-text\nreference: trainer\nengines:\n  trainer: {type: hf, dtype: float32}\n  rollout: {type: logprobs, path: rollout.jsonl}\n"
        "samples:\n  - dump: rollout\nbatch_size: 64\ntop_k: 5\n"
    )
    return folder / "soak.yaml"


def tokens_of(run_dir: Path) -> pd.DataFrame:
    df = pd.read_parquet(run_dir / "tokens")
    for c in ("sample_id", "cand_engine", "variant"):
        df[c] = df[c].astype(str)
    return df.drop(columns=["run_id"]).sort_values(["cand_engine", "variant", "sample_id", "position"]).reset_index(drop=True)


def run(cmd: list[str], env: dict, stop_after_parts: int | None, parts: Path) -> dict:
    """One process of the run; with `stop_after_parts`, SIGTERM once that many more parts are on disk."""
    start = len(list(parts.glob("*.parquet"))) if parts.exists() else 0
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    me = psutil.Process(proc.pid)
    peak, t_signal = 0, None
    while proc.poll() is None:
        try:
            peak = max(peak, me.memory_info().rss)
        except psutil.Error:
            pass
        done = len(list(parts.glob("*.parquet"))) if parts.exists() else 0
        if stop_after_parts is not None and t_signal is None and done >= start + stop_after_parts:
            os.kill(proc.pid, signal.SIGTERM)
            t_signal = time.monotonic()
        time.sleep(0.05)
    out, err = proc.communicate()
    stop_s = time.monotonic() - t_signal if t_signal is not None else None
    time.sleep(1.0)  # what a stopped run left would still be there now
    left = [p.pid for p in psutil.process_iter(["pid"]) if _in_session(p, proc.pid)]
    resume = next((line.split("Resume with: ", 1)[1] for line in err.splitlines() if "Resume with: " in line), None)
    return {"code": proc.returncode, "stop_s": stop_s, "peak_rss_mb": peak / 2**20, "parts": len(list(parts.glob("*.parquet"))), "left": left, "resume": resume, "err": err}


def _in_session(p: psutil.Process, sid: int) -> bool:
    try:
        return os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE
    except (OSError, psutil.Error):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=24, help="tokens per sample (a third of them prompt)")
    parser.add_argument("--stops", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="crossengine-soak-"))
    env = {**os.environ, "CROSSENGINE_HOME": os.environ.get("CROSSENGINE_HOME", str(Path.home() / ".cache" / "crossengine")), "PYTHONUNBUFFERED": "1"}
    experiment = write_dump(folder, args.samples, args.tokens, args.seed)
    base = [sys.executable, "-m", "crossengine.cli", "run", str(experiment), "--output-dir", str(folder / "out")]
    t0 = time.monotonic()
    baseline = run([*base, "--run-id", "baseline"], env, None, folder / "out" / "baseline" / "tokens")
    print(f"baseline: exit {baseline['code']} in {time.monotonic() - t0:.0f} s, {baseline['parts']} parts, driver peak {baseline['peak_rss_mb']:.0f} MB", flush=True)
    assert baseline["code"] == 0, baseline["err"][-2000:]
    parts = folder / "out" / "soak" / "tokens"
    batches = baseline["parts"]
    rng = random.Random(args.seed)
    cmd = [*base, "--run-id", "soak"]
    print(f"\n{'segment':>8} {'exit':>5} {'stop s':>7} {'parts':>6} {'driver MB':>10} {'left':>5}")
    for k in range(args.stops + 1):
        last = k == args.stops
        seg = run(cmd, env, None if last else rng.randint(1, max(1, batches // (2 * args.stops))), parts)
        stop = f"{seg['stop_s']:.2f}" if seg["stop_s"] is not None else "-"
        print(f"{k + 1:>8} {seg['code']:>5} {stop:>7} {seg['parts']:>6} {seg['peak_rss_mb']:>10.0f} {len(seg['left']):>5}", flush=True)
        assert not seg["left"], f"processes left: {seg['left']}"
        if last:
            assert seg["code"] == 0, seg["err"][-2000:]
            break
        assert seg["code"] == 143 and seg["resume"], seg["err"][-2000:]
        printed = shlex.split(seg["resume"])
        cmd = [sys.executable, "-m", "crossengine.cli", *printed[1:]]
    a, b = tokens_of(folder / "out" / "baseline"), tokens_of(folder / "out" / "soak")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    print(f"\ntokens: bitwise the uninterrupted run's ({len(a):,} rows); no process left after any stop")


if __name__ == "__main__":
    main()
