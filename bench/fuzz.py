"""Fuzz every parser a user feeds with thousands of structured mutations and print what became of them.

    python bench/fuzz.py --examples 3000

The same properties as tests/test_fuzz.py (which runs a few hundred per parser in the suite):
each mutated input is accepted, or one line names the file (line or row) and the field; an
input that breaks the property stops the run with hypothesis's smallest failing example.
Prints, per parser, how many mutations were accepted and how many were one-line errors.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Folders:
    """tmp_path_factory's one method the dump test uses."""

    def __init__(self, root: Path):
        self.root, self.n = root, 0

    def mktemp(self, name: str) -> Path:
        self.n += 1
        path = self.root / f"{name}{self.n}"
        path.mkdir()
        return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=3000, help="mutations per parser and kind")
    args = parser.parse_args()
    os.environ["CROSSENGINE_FUZZ_EXAMPLES"] = str(args.examples)
    root = Path(tempfile.mkdtemp(prefix="crossengine-fuzz-"))
    os.environ.setdefault("CROSSENGINE_HOME", str(root / "home"))
    from tests import test_fuzz as fuzz  # after the variable: it sets the number of examples

    folders = _Folders(root)
    (sweeps := folders.mktemp("sweep"))
    (sweeps / "base.yaml").write_text(fuzz.yaml_text({k: fuzz.EXPERIMENT[k] for k in ("model", "reference", "engines", "samples")}))
    runs = [
        ("experiment (structured)", lambda: fuzz.test_the_experiment_loader_takes_structured_mutations(experiment_folder=folders.mktemp("exp"))),
        ("experiment (bytes)", lambda: fuzz.test_the_experiment_loader_takes_spoilt_bytes(experiment_folder=folders.mktemp("exp"))),
        ("sweep", lambda: fuzz.test_the_sweep_loader_takes_structured_mutations(sweep_folder=sweeps)),
        ("dumps", lambda: fuzz.test_the_dump_readers_take_structured_mutations(tmp_path_factory=folders)),
    ]
    for name, run in runs:
        t0 = time.perf_counter()
        run()
        print(f"{name:26} done in {time.perf_counter() - t0:6.1f} s", flush=True)
    print(f"\n{'parser':28} {'outcome':26} {'count':>7}")
    for (parser_name, outcome), count in sorted(fuzz.OUTCOMES.items()):
        print(f"{parser_name:28} {outcome:26} {count:>7}")
    print(f"\nno traceback, no multi-line error, nothing written, in {sum(fuzz.OUTCOMES.values())} parsed inputs")


if __name__ == "__main__":
    main()
