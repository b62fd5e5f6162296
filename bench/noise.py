"""What the noise floor costs: scoring time with `noise:` vs without, from the CLI, as a user runs it.

    python bench/noise.py [--samples 16] [--length 256]

The same experiment (the bench model: V = 32k, hidden 512, 4 layers; an fp32 reference and a
bf16 candidate, both hf) runs three times in fresh processes: without a floor, with the default
conditions (alone, shuffled, repeat), and with those plus padded and packed. The floor scores
every batch once more per condition on each engine with one, so scoring should take about
1 + conditions times as long; the script prints the measured ratio beside that expectation
(run.json's `scoring_s`, and each engine's `noise_s`).
"""

from __future__ import annotations

from common import bench_workload, run_cli, write_experiment

ENGINES = "  ref: {type: hf, dtype: float32}\n  cand: {type: hf, dtype: bfloat16}"
CASES = {
    "no floor": "",
    "alone, shuffled, repeat": "noise: {conditions: [alone, shuffled, repeat], fillers: 7}\n",
    "+ padded, packed": "noise: {conditions: [alone, shuffled, repeat, padded, packed], fillers: 7}\n",
}


def main() -> None:
    args, d, model, samples = bench_workload(16)
    base = None
    print(f"{args.samples} samples x {args.length} tokens, V = 32000; scoring_s from run.json")
    for k, (name, extra) in enumerate(CASES.items()):
        case = d / f"case{k}"
        case.mkdir()
        meta = run_cli(write_experiment(case, str(model), ENGINES, samples, extra + "batch_size: 8\n"), case / "out")
        t = meta["timings"]
        base = base or t["scoring_s"]
        n = len(extra.split("[")[1].split("]")[0].split(",")) if extra else 0
        noise = ", ".join(f"{e} {t[f'{e}.noise_s']:.1f}s" for e in ("ref", "cand") if f"{e}.noise_s" in t)
        print(f"{name:26s} scoring {t['scoring_s']:6.1f}s  x{t['scoring_s'] / base:4.2f} (expected about x{1 + n})  {('noise: ' + noise) if noise else ''}")


if __name__ == "__main__":
    main()
