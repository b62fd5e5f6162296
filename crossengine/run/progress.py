"""A rich progress bar per engine, counting samples; silent without a console."""

from __future__ import annotations

from crossengine.experiment.plan import EngineInstance, Plan
from crossengine.results import RunDir


class Progress:
    """A rich progress bar per engine; silent without a console."""

    def __init__(self, console, names: list[str], total: int, done: dict[str, int]):
        self.bar = None
        self.tasks: dict[str, int] = {}
        if console is None:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(TextColumn("{task.description:>16}"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"), TimeElapsedColumn(), console=console, transient=False)
        for name in names:
            self.tasks[name] = self.bar.add_task(name, total=total, completed=done.get(name, 0))

    def advance(self, name: str, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.tasks[name], n)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def engine_progress(console, instances: list[EngineInstance], total: int, plan: Plan, run_dir: RunDir) -> Progress:
    done = {inst.name: sum(len(idx) for b, idx in enumerate(plan.batches) if run_dir.done(inst.name, b)) for inst in instances if not inst.is_reference}
    return Progress(console, [i.name for i in instances], total, done)
