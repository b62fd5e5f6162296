"""The `crossengine` command's shared pieces: its two consoles, the one-line failure, and the options several commands take.

Why apart: the commands (crossengine/cli/__init__.py) are many; what they share is declared once here.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from crossengine.compare.keys import FRAMEWORKS
from crossengine.errors import CrossengineError

console = Console(width=None if sys.stdout.isatty() else 160)  # tables stay readable in logs and CI
err_console = Console(stderr=True)


def fail(exc: Exception, code: int = 2) -> None:
    err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _known_keys(value: str | None) -> str | None:
    """--keys names one of the frameworks whose keys compare/keys.py maps; anything else is one line, exit 2."""
    if value is not None and value not in FRAMEWORKS:
        fail(CrossengineError(f"--keys {value!r}: one of {', '.join(FRAMEWORKS)}"))
    return value


ADDRESS_OPTION = typer.Option(None, "--address", help="Join an existing Ray cluster (default: start a local one).")
NUM_GPUS_OPTION = typer.Option(None, "--num-gpus", help="GPUs a local Ray cluster may use (default: all it finds); ignored with --address.")
KEYS_OPTION = typer.Option(
    None,
    "--keys",
    callback=_known_keys,
    help=f"Also write metrics.json under one RL framework's own metric keys: {', '.join(FRAMEWORKS)}.",
)
FAIL_ON_ALARM_OPTION = typer.Option(False, "--fail-on-alarm", help="A tripped alarm breaks the run's gates: exit 3 (CI), as a broken `gates:` entry does.")


HTML_OPTION = typer.Option(False, "--html", help="Write the self-contained HTML page (default: inside the folder; --out elsewhere).")
OUT_OPTION = typer.Option(None, "--out", help="With --html: where the page goes.")
