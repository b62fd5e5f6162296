"""Where a run's tables and report are computed from its Parquet parts: a Ray worker of its own.

Why a worker: the driver never holds token rows, and the worker starts with the engines, so
its imports (pandas, pyarrow, the compare and report modules) are paid while models load.
"""

from __future__ import annotations

from pathlib import Path

from crossengine.compare.summary import summarize
from crossengine.identity import SAMPLED


def reducer_class():
    import ray

    @ray.remote(num_cpus=0)
    class Reducer:
        """Where a run's tables and report are computed from its Parquet: a worker of its own (the driver
        never holds token rows), started with the engines so that its start and imports (pandas, pyarrow,
        the compare and report modules) are paid while models load rather than after the last batch."""

        def __init__(self):
            import crossengine.compare.alarms  # noqa: F401
            import crossengine.compare.nearest  # noqa: F401
            import crossengine.report.html  # noqa: F401

        def reduce(self, *args):
            return reduce_tokens(*args)

        def report(self, root):
            from crossengine.report.html import run_report

            return run_report(root)

    return Reducer


def reduce_tokens(root: str, reference: str, expected: list[tuple[str, str]], alarm_limits: dict | None = None, dense: bool | None = None, routing: bool = False):
    """Runs in a Ray worker (see Runner._reduce): summary, nearest engines, alarms, noise floors, routing rates (with `routing`)."""
    from crossengine.compare.alarms import run_alarms
    from crossengine.compare.floor import floor_table
    from crossengine.compare.routing_summary import routing_table

    tokens_dir = Path(root) / "tokens"
    summary = summarize(tokens_dir, expected)
    alarms = run_alarms(tokens_dir, summary, alarm_limits, dense)
    floors = floor_table(Path(root) / "noise")
    rates = routing_table(Path(root) / "routing") if routing else None
    scored = summary[(summary["modality"] == "all") & (summary["n_tokens"] > 0) & (summary["variant"] != SAMPLED)] if len(summary) else summary
    if len(scored[["cand_engine", "variant"]].drop_duplicates()) < 2:  # nearest needs two candidates with token rows (the generator's own sampling is not one)
        return summary, None, alarms, floors, rates
    from crossengine.compare.nearest import nearest_table

    return summary, nearest_table(tokens_dir, reference), alarms, floors, rates
