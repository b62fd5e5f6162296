"""Peak driver memory (RSS) of a run with 100 vs 1,000 samples: streaming must keep it flat.

    python bench/memory.py

Each run is a fresh `crossengine run` process (tiny-text, HF vs HF, 64-token samples); the
driver's peak RSS comes from getrusage of that child. Goal: < 10 % growth.
"""

from __future__ import annotations

import resource
import subprocess
import sys

from common import random_samples, tmpdir, write_experiment


def peak_rss_mb(n: int) -> float:
    d = tmpdir()
    engines = "  ref: {type: hf}\n  cand: {type: hf, attn_implementation: eager}"
    path = write_experiment(d, "tiny-text", engines, random_samples(n, 64, 512), "batch_size: 16\n")
    code = (
        "import resource, sys; from typer.main import get_command; from crossengine.cli import app\n"
        f"try: get_command(app).main(['run', {str(path)!r}, '--output-dir', {str(d / 'results')!r}], standalone_mode=False)\n"
        "finally: print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stderr.strip().splitlines()[-1])


def main() -> None:
    small, large = peak_rss_mb(100), peak_rss_mb(1000)
    print(f"driver peak RSS: 100 samples {small:.0f} MB, 1000 samples {large:.0f} MB, growth {100 * (large / small - 1):+.1f}%  (goal < 10%)")


if __name__ == "__main__":
    main()
