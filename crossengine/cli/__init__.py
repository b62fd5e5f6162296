"""The `crossengine` command.

crossengine run experiments/quickstart.yaml       # score, compare, write results/<run_id>/
crossengine report results/<run_id>              # print a finished run's summary
crossengine fixtures build                       # tiny offline models for tests and demos
crossengine schema > experiment.schema.json      # JSON Schema for editors
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import typer

from crossengine.adapters import BUILTIN, UnknownEngine, engine_class, registered
from crossengine.adapters.base import EngineTraits
from crossengine.adapters.spec import EngineSpec
from crossengine.cli.options import ADDRESS_OPTION, FAIL_ON_ALARM_OPTION, HTML_OPTION, KEYS_OPTION, NUM_GPUS_OPTION, OUT_OPTION, console, err_console, fail
from crossengine.compare.gates import GATE_EXIT
from crossengine.errors import CrossengineError
from crossengine.experiment.fixtures import FIXTURES, ensure_fixture
from crossengine.experiment.load import load_experiment
from crossengine.experiment.plan import make_plan
from crossengine.experiment.preflight import preflight
from crossengine.experiment.schema import LocalizeSpec, json_schema
from crossengine.experiment.shapes import SHAPES
from crossengine.experiment.sweep import is_sweep_file, load_sweep
from crossengine.run.cluster import stop_local_cluster
from crossengine.run.pool import one_line
from crossengine.run.signals import StopSignals, Terminated

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compare log-probabilities of one model across inference engines.")
fixtures_app = typer.Typer(no_args_is_help=True, help="Tiny offline models (tiny-text, tiny-vision).")
app.add_typer(fixtures_app, name="fixtures")


def _plan(experiment: Path, run_id: str | None, output_dir: Path | None, localize: bool = False, overrides: dict | None = None):
    """Load, resolve and preflight an experiment (`overrides`: a sweep member's fields): every check that needs no Ray and no weights."""

    exp = load_experiment(experiment, overrides)
    if localize:
        if exp.localize is None:
            exp = exp.model_copy(update={"localize": LocalizeSpec()})
        run_id = run_id or f"{exp.name}-localize-{time.strftime('%Y%m%d-%H%M%S')}"
    plan = make_plan(exp, experiment, run_id=run_id, output_dir=output_dir)
    for note in preflight(plan):
        err_console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    return plan


def _say_plan_lines(plan) -> None:
    """What the plan knows before anything loads: what each analysis will do on stdout, what it skips on stderr."""
    for line in plan.lines():
        (err_console if line.startswith("skipped:") else console).print(line, markup=False, highlight=False, soft_wrap=True)


def _plan_interruptibly(experiment: Path, run_id: str | None, output_dir: Path | None, localize: bool = False):
    """_plan, where Ctrl-C/SIGTERM end the command at once (130/143): the checks import transformers and
    user code, and a KeyboardInterrupt raised inside such an import was seen swallowed (the run went on to
    the end). Nothing is written and no cluster started yet, so the process just leaves. (plan, signals)."""

    def leave_now(signum, frame):  # nothing started, nothing written: no need to wait for the import under way
        sys.stderr.write("interrupted before anything started; nothing was written\n")
        sys.stderr.flush()
        os._exit(143 if signum == signal.SIGTERM else 130)

    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, leave_now) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        plan = _plan(experiment, run_id, output_dir, localize=localize)
    except CrossengineError as exc:
        fail(exc)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    signals = StopSignals()
    signals.install()  # from here a stop is remembered and raised where it lands (Runner.run)
    return plan, signals


def _execute(runner) -> Path:
    """Run; one line and exit 2 on any crossengine error, 130 on Ctrl-C, 143 on SIGTERM."""
    try:
        return runner.run()
    except CrossengineError as exc:
        fail(exc)
    except KeyboardInterrupt as exc:
        code = 143 if isinstance(exc, Terminated) or runner.terminated else 130
        stop_local_ray_and_exit(code)
    except Exception as exc:  # noqa: BLE001 - a bug of ours: still one line, the traceback in the run's log
        log = runner.run_dir.log_exception("internal error", exc)
        fail(CrossengineError(f"internal error ({type(exc).__name__}: {one_line(exc)}); traceback: {log}. Please report it; resume with: {runner.resume_command}"))


def stop_local_ray_and_exit(code: int) -> None:
    """After a stop, end the local Ray cluster this run started at once and exit: Ray's own exit
    handler stops it gracefully, which took 3-4 s here after the run itself had stopped. A joined
    cluster (--address) is left as it is; then Python exits as usual."""

    if stop_local_cluster():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code)


@app.command()
def run(
    experiment: Path = typer.Argument(..., help="Experiment YAML file."),
    run_id: str | None = typer.Option(None, "--run-id", help="Name of the results folder; an unfinished run with this id is resumed."),
    output_dir: Path | None = typer.Option(None, "--output-dir", help="Where results/<run_id> goes (default: the experiment's output_dir)."),
    address: str | None = ADDRESS_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run of the same id."),
    num_gpus: float | None = NUM_GPUS_OPTION,
    fail_on_alarm: bool = FAIL_ON_ALARM_OPTION,
    keys: str | None = KEYS_OPTION,
) -> None:
    """Run an experiment: every engine scores the samples; per-token Parquet and a summary come out."""
    from crossengine.report.terminal import print_summary
    from crossengine.report.verdicts import print_gates, write_framework_keys
    from crossengine.run.runner import Runner

    plan, signals = _plan_interruptibly(experiment, run_id, output_dir)
    console.print(f"run [bold]{plan.run_id}[/bold]: reference {plan.reference.name}, candidates {', '.join(c.name for c in plan.candidates)}; {len(plan.experiment.samples)} samples")
    _say_plan_lines(plan)
    runner = Runner(plan, console=console, err_console=err_console, address=address, overwrite=overwrite, num_gpus=num_gpus, signals=signals)
    out = _execute(runner)
    print_summary(out, console, err_console)
    console.print(f"results: {out}  (pandas: pd.read_parquet('{out}/tokens'))")
    if runner.dead:
        err_console.print(
            f"engine(s) {', '.join(repr(n) for n in runner.dead)} died (see above); the others finished. Resume with: {runner.resume_command}", markup=False, highlight=False, soft_wrap=True
        )
    broken = print_gates(out, plan.experiment.gates, fail_on_alarm, console, err_console)
    if keys:
        write_framework_keys(out, keys, console)
    if runner.errors:
        failed = sum(1 for e in runner.errors if e["sample_id"])
        if failed:
            err_console.print(f"{failed} sample(s) failed; see errors in {out}/run.json")
        raise typer.Exit(1)
    if runner.expect_failures:  # said above, with the first token that differs
        raise typer.Exit(1)
    if broken:
        raise typer.Exit(GATE_EXIT)


@app.command()
def sweep(
    sweep_file: Path = typer.Argument(..., help="Sweep YAML file: a base experiment and axes."),
    output_dir: Path | None = typer.Option(None, "--output-dir", help="Where <sweep name>/ goes (default: the sweep's output_dir)."),
    address: str | None = ADDRESS_OPTION,
    parallel: int | None = typer.Option(None, "--parallel", help="At most this many members at once (default: as the cluster holds them)."),
    num_gpus: float | None = NUM_GPUS_OPTION,
    fail_on_alarm: bool = FAIL_ON_ALARM_OPTION,
) -> None:
    """Run every member of a sweep (base experiment × axes) over one cluster; index.parquet and report.html come out."""
    from crossengine.run.sweep import SweepRunner

    if parallel is not None and parallel < 1:
        fail(CrossengineError(f"--parallel: at most this many members at once, so 1 or more (got {parallel})"))
    resume = " ".join(
        ["crossengine sweep", shlex.quote(str(sweep_file))]
        + (["--output-dir", shlex.quote(str(output_dir))] if output_dir else [])
        + (["--address", shlex.quote(address)] if address else [])
        + (["--num-gpus", f"{num_gpus:g}"] if num_gpus is not None else [])
        + (["--parallel", str(parallel)] if parallel else [])
        + (["--fail-on-alarm"] if fail_on_alarm else [])
    )
    try:
        sweep = load_sweep(sweep_file)
    except CrossengineError as exc:
        fail(exc)
    members = sweep.members()
    console.print(f"sweep [bold]{sweep.name}[/bold]: {len(members)} members ({' × '.join(f'{k} {len(a.labelled())}' for k, a in sweep.spec.axes.items())})")
    runner = SweepRunner(sweep, output_dir, address, num_gpus, parallel, console, fail_on_alarm)
    signals = StopSignals()
    signals.install()
    try:
        outcomes = runner.run()
    except CrossengineError as exc:
        fail(exc)
    except KeyboardInterrupt as exc:
        err_console.print(f"interrupted; finished members are kept. Resume with: {resume}", markup=False, highlight=False, soft_wrap=True)
        stop_local_ray_and_exit(143 if isinstance(exc, Terminated) or signals.received == signal.SIGTERM else 130)
    finally:
        signals.restore()
    from crossengine.report.sweep_html import sweep_report

    page = sweep_report(runner.root)
    failed = [o for o in outcomes if o.status in ("failed", "errors", "incomplete")]
    console.print(f"index: {runner.root / 'index.parquet'}  report: {page}", soft_wrap=True)
    if failed:
        err_console.print(f"{len(failed)} of {len(outcomes)} member(s) did not finish cleanly: {', '.join(o.member.name for o in failed)}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    gated = [o for o in outcomes if o.gates_broken]
    if gated:
        err_console.print(
            f"{len(gated)} of {len(outcomes)} member(s) broke a gate: {', '.join(o.member.name for o in gated)} (gates_broken in the index)", markup=False, highlight=False, soft_wrap=True
        )
        raise typer.Exit(GATE_EXIT)


@app.command()
def localize(
    experiment: Path = typer.Argument(..., help="Experiment YAML file (its localize: section is used, or defaults)."),
    run_id: str | None = typer.Option(None, "--run-id"),
    output_dir: Path | None = typer.Option(None, "--output-dir"),
    address: str | None = ADDRESS_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite"),
    num_gpus: float | None = NUM_GPUS_OPTION,
) -> None:
    """Find the first module and token where each candidate (hf, native, vllm) leaves the reference, how its error grows by layer; audit weights and buffers."""
    from crossengine.run.runner import Runner

    plan, signals = _plan_interruptibly(experiment, run_id, output_dir, localize=True)
    out = _execute(Runner(plan, console=console, err_console=err_console, address=address, overwrite=overwrite, localize_only=True, num_gpus=num_gpus, signals=signals))
    written = [str(out / f) for f in ("layers.parquet", "localize.parquet", "buffers.parquet") if (out / f).exists()]
    console.print(f"results: {', '.join(written) or f'{out} (no module table: see the messages above)'}", soft_wrap=True)


# Typer has no option with an optional value, so `--html [PATH]` is `--html [--out PATH]`.


def _html_path(html: bool, out: Path | None, default: Path) -> Path | None:
    if not html and out is None:
        return None
    return out or default


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A results/<run_id> folder."), html: bool = HTML_OPTION, out: Path | None = OUT_OPTION, keys: str | None = KEYS_OPTION) -> None:
    """Print the summary table of a finished run; --html writes its report page (RUN/report.html, or --out PATH)."""
    from crossengine.report.terminal import print_summary
    from crossengine.report.verdicts import write_framework_keys

    localised = (run_dir / "layers.parquet").exists() or (run_dir / "buffers.parquet").exists()
    if not (run_dir / "summary.parquet").exists():
        if not localised or keys:  # `crossengine localize` scores nothing: its page is the localisation alone
            fail(CrossengineError(f"{run_dir}: no summary.parquet (not a finished run{'' if localised else ' or localisation'})"))
        console.print(f"{run_dir}: a localisation (crossengine localize): no scores; --html draws its tables", highlight=False)
    else:
        print_summary(run_dir, console, err_console)
    if keys:
        write_framework_keys(run_dir, keys, console)
    page = _html_path(html, out, run_dir / "report.html")
    if page is not None:
        from crossengine.report.html import run_report

        console.print(f"report: {run_report(run_dir, page)}")


@app.command()
def compare(
    run_a: Path = typer.Argument(..., help="The run before a change."),
    run_b: Path = typer.Argument(..., help="The same experiment after it."),
    html: str | None = typer.Option(None, "--html", help="Also write the comparison as an HTML page at this path."),
) -> None:
    """Two runs of the same samples side by side: every metric per candidate/variant and split, with the change."""
    from crossengine.compare.runs import compare_runs
    from crossengine.report.runs_html import compare_report
    from crossengine.report.terminal import compare_view

    for d in (run_a, run_b):
        if not (d / "summary.parquet").exists():
            fail(CrossengineError(f"{d}: no summary.parquet (not a finished run)"))
    try:
        table = compare_runs(run_a, run_b)
    except CrossengineError as exc:
        fail(exc)
    console.print(compare_view(table, run_a, run_b))
    if html:
        console.print(f"report: {compare_report(run_a, run_b, table, Path(html))}")


@app.command()
def monitor(
    out_dir: Path = typer.Argument(..., help="A folder a KLMonitor writes to."),
    step: int | None = typer.Option(None, "--step", help="Show this step's worst tokens."),
    follow: bool = typer.Option(False, "--follow", help="Keep watching as steps arrive (Ctrl-C stops)."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between checks with --follow."),
    html: bool = HTML_OPTION,
    out: Path | None = OUT_OPTION,
    alarm: list[str] = typer.Option([], "--alarm", help="Change an alarm's limit: NAME=VALUE (a number, LOW,HIGH, or off); repeatable."),
) -> None:
    """Show an RL monitor's steps (metrics, sparklines, threshold marks) or one step's worst tokens, then its alarms."""
    from crossengine.report import monitor_view

    if not (out_dir / "steps").exists():
        fail(CrossengineError(f"{out_dir}: no steps/ folder (not a KLMonitor output)"))
    page = _html_path(html, out, out_dir / "monitor.html")
    try:
        overrides = monitor_view.parse_alarm_options(alarm)
        if page is not None:
            from crossengine.report.monitor_html import monitor_report

            console.print(f"report: {monitor_report(out_dir, page)}")
        elif step is not None:
            console.print(monitor_view.worst_view(out_dir, step))
        elif follow:
            try:
                monitor_view.follow(out_dir, console, interval)
            except KeyboardInterrupt:
                pass
        else:
            console.print(monitor_view.steps_view(out_dir))
        if page is None and not follow:
            for line in monitor_view.alarm_lines(out_dir, step, overrides):
                console.print(line, style="bold red", markup=False, highlight=False, soft_wrap=True)
    except (FileNotFoundError, ValueError) as exc:
        fail(CrossengineError(str(exc)))
    except CrossengineError as exc:
        fail(exc)


@app.command()
def schema() -> None:
    """Print the experiment file's JSON Schema (for editor completion and validation)."""

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


@app.command()
def engines() -> None:
    """List every registered engine type (built-in, entry points of `crossengine.engines`) with its own fields and traits."""

    from rich.table import Table

    table = Table(title="engine types ('package.module:Class' also works as a type)", show_lines=True)
    for col in ("type", "class", "from", "its own fields", "traits (beyond the defaults)"):
        table.add_column(col, overflow="fold")
    for kind, ref in sorted(registered().items()):
        source = "built-in" if kind in BUILTIN else "entry point"
        try:
            cls = engine_class(kind)
        except UnknownEngine as exc:
            table.add_row(kind, ref, source, "", f"[red]{exc}[/red]")
            continue
        own = [f for f in cls.Spec.model_fields if f not in EngineSpec.model_fields]
        traits = [f"{f.name}={getattr(cls.traits, f.name)}" for f in dataclasses.fields(EngineTraits) if getattr(cls.traits, f.name) != f.default]
        table.add_row(kind, ref, source, ", ".join(own) or "-", ", ".join(traits) or "-")
    console.print(table)


@app.command()
def validate(experiment: Path = typer.Argument(..., help="Experiment YAML file, or a sweep file (then every member).")) -> None:
    """Check an experiment as `run` would before starting anything: schema, files, user code, token ids, images."""

    try:
        if is_sweep_file(experiment):
            sweep = load_sweep(experiment)
            for member in sweep.members():
                try:
                    _plan(sweep.base, None, None, overrides=member.overrides)
                except CrossengineError as exc:
                    raise CrossengineError(f"member {member.name}: {exc}") from None
            console.print(f"{experiment}: ok ({len(sweep.members())} members of {sweep.base.name})")
            return
        plan = _plan(experiment, None, None)
    except CrossengineError as exc:
        fail(exc)
    exp = plan.experiment
    console.print(f"{experiment}: ok ({len(exp.engines)} engines, {len(exp.variants)} variants, {len(exp.samples)} samples)")
    _say_plan_lines(plan)


@fixtures_app.command("build")
def fixtures_build(names: list[str] | None = typer.Argument(None, help="Fixture names (default: all but the real shapes, shape-*).")) -> None:
    """Build the offline fixtures (done automatically when an experiment names one); the real-shape ones when named."""

    for name in names or [n for n in FIXTURES if n not in SHAPES]:
        if name not in FIXTURES:
            fail(CrossengineError(f"unknown fixture {name!r}; known: {sorted(FIXTURES)}"))
        console.print(f"{name}: {ensure_fixture(name)}")
