"""`python -m crossengine.cli`: the same command as `crossengine` (tests and environments without the script use it)."""

from crossengine.cli import app

app(prog_name="crossengine")
