"""Peak driver memory (RSS) of a run with 100 vs 10,000 samples: streaming must keep it flat.

    python bench/memory.py [N]     # 100 vs N samples (default 10,000)

Each run is a fresh `crossengine run` process (tiny-text, HF vs HF, 64-token samples). Peak
RSS (getrusage) counts pages of Ray's shared-memory object store that the driver mapped
when reading engine outputs zero-copy; the private (anonymous) part at the end of the run
is reported beside it, from /proc/self/status. Goal: < 10 % growth.
"""

from __future__ import annotations

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
        "finally:\n"
        "    st = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)\n"
        "    anon = float(st['RssAnon'].split()[0]) / 1024; shm = float(st['RssShmem'].split()[0]) / 1024\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, anon, shm, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return tuple(float(x) for x in out.stderr.strip().splitlines()[-1].split())


def main() -> None:
    small, large = 100, int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    (peak_s, anon_s, shm_s), (peak_l, anon_l, shm_l) = peak_rss_mb(small), peak_rss_mb(large)
    grow = lambda a, b: 100 * (b / a - 1)  # noqa: E731
    print(f"driver peak RSS:      {small} samples {peak_s:.0f} MB, {large} samples {peak_l:.0f} MB, growth {grow(peak_s, peak_l):+.1f}%")
    print(f"  private (RssAnon):  {anon_s:.0f} MB -> {anon_l:.0f} MB, growth {grow(anon_s, anon_l):+.1f}%  (goal < 10%)")
    print(f"  shared (RssShmem):  {shm_s:.0f} MB -> {shm_l:.0f} MB (Ray object-store pages mapped by the driver)")


if __name__ == "__main__":
    main()
