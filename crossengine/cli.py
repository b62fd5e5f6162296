"""The `crossengine` command.

    crossengine run experiments/quickstart.yaml       # score, compare, write results/<run_id>/
    crossengine report results/<run_id>              # print a finished run's summary
    crossengine fixtures build                       # tiny offline models for tests and demos
    crossengine schema > experiment.schema.json      # JSON Schema for editors
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import CrossengineError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compare log-probabilities of one model across inference engines.")
fixtures_app = typer.Typer(no_args_is_help=True, help="Tiny offline models (tiny-text, tiny-vision).")
app.add_typer(fixtures_app, name="fixtures")
console = Console(width=None if sys.stdout.isatty() else 160)  # tables stay readable in logs and CI
err_console = Console(stderr=True)


def _fail(exc: Exception, code: int = 2) -> None:
    err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def run(
    experiment: Path = typer.Argument(..., help="Experiment YAML file."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Name of the results folder; an unfinished run with this id is resumed."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Where results/<run_id> goes (default: the experiment's output_dir)."),
    address: Optional[str] = typer.Option(None, "--address", help="Join an existing Ray cluster (default: start a local one)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run of the same id."),
) -> None:
    """Run an experiment: every engine scores the samples; per-token Parquet and a summary come out."""
    from .config import load_experiment
    from .plan import make_plan
    from .report import print_summary
    from .runner import Runner

    try:
        exp = load_experiment(experiment)
        plan = make_plan(exp, experiment, run_id=run_id, output_dir=output_dir)
        console.print(f"run [bold]{plan.run_id}[/bold]: reference {plan.reference.name}, candidates {', '.join(c.name for c in plan.candidates)}; {len(exp.samples)} samples")
        runner = Runner(plan, console=console, address=address, overwrite=overwrite)
        out = runner.run()
    except CrossengineError as exc:
        _fail(exc)
    print_summary(out, console)
    console.print(f"results: {out}  (pandas: pd.read_parquet('{out}/tokens'))")
    if runner.errors:
        err_console.print(f"{len(runner.errors)} sample(s) failed; see errors in {out}/run.json")
        raise typer.Exit(1)


@app.command()
def localize(
    experiment: Path = typer.Argument(..., help="Experiment YAML file (its localize: section is used, or defaults)."),
    run_id: Optional[str] = typer.Option(None, "--run-id"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir"),
    address: Optional[str] = typer.Option(None, "--address"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Find the first module and token where each hf/native candidate leaves the reference; audit buffers."""
    from .config import LocalizeSpec, load_experiment
    from .plan import make_plan
    from .runner import Runner

    try:
        exp = load_experiment(experiment)
        if exp.localize is None:
            exp = exp.model_copy(update={"localize": LocalizeSpec()})
        plan = make_plan(exp, experiment, run_id=run_id or f"{exp.name}-localize-{time.strftime('%Y%m%d-%H%M%S')}", output_dir=output_dir)
        out = Runner(plan, console=console, address=address, overwrite=overwrite, localize_only=True).run()
    except CrossengineError as exc:
        _fail(exc)
    console.print(f"results: {out}/layers.parquet, {out}/buffers.parquet")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A results/<run_id> folder.")) -> None:
    """Print the summary table of a finished run."""
    from .report import print_summary

    if not (run_dir / "summary.parquet").exists():
        _fail(CrossengineError(f"{run_dir}: no summary.parquet (not a finished run)"))
    print_summary(run_dir, console)


@app.command()
def monitor(
    out_dir: Path = typer.Argument(..., help="A folder a KLMonitor writes to."),
    step: Optional[int] = typer.Option(None, "--step", help="Show this step's worst tokens."),
    follow: bool = typer.Option(False, "--follow", help="Keep watching as steps arrive (Ctrl-C stops)."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between checks with --follow."),
) -> None:
    """Show an RL monitor's steps (metrics, sparklines, threshold marks) or one step's worst tokens."""
    from . import monitor_view

    if not (out_dir / "steps").exists():
        _fail(CrossengineError(f"{out_dir}: no steps/ folder (not a KLMonitor output)"))
    if step is not None:
        try:
            console.print(monitor_view.worst_view(out_dir, step))
        except FileNotFoundError as exc:
            _fail(CrossengineError(str(exc)))
    elif follow:
        try:
            monitor_view.follow(out_dir, console, interval)
        except KeyboardInterrupt:
            pass
    else:
        console.print(monitor_view.steps_view(out_dir))


@app.command()
def schema() -> None:
    """Print the experiment file's JSON Schema (for editor completion and validation)."""
    from .config import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


@app.command()
def validate(experiment: Path = typer.Argument(..., help="Experiment YAML file.")) -> None:
    """Check an experiment file without running it."""
    from .config import load_experiment

    try:
        exp = load_experiment(experiment)
    except CrossengineError as exc:
        _fail(exc)
    console.print(f"{experiment}: ok ({len(exp.engines)} engines, {len(exp.variants)} variants, {len(exp.samples)} samples)")


@fixtures_app.command("build")
def fixtures_build(names: Optional[list[str]] = typer.Argument(None, help="Fixture names (default: all).")) -> None:
    """Build the tiny offline fixtures (done automatically when an experiment names one)."""
    from .fixtures import FIXTURES, ensure_fixture

    for name in names or list(FIXTURES):
        if name not in FIXTURES:
            _fail(CrossengineError(f"unknown fixture {name!r}; known: {sorted(FIXTURES)}"))
        console.print(f"{name}: {ensure_fixture(name)}")


if __name__ == "__main__":  # `python -m crossengine.cli` (used by bench/)
    app()
