"""The house rules a contributor can rely on, checked rather than stated: the import layers
(import-linter, with a planted back-import it must catch), imports at module level, module size,
comments that name only files that exist, lint and format, and the documentation site built
strictly. Pure file reads and subprocesses of the tools; no engine starts."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "crossengine"
MAX_LINES = 400
# A function-level import is allowed for these alone (docs/internals/layers.md says why): slow to
# import or optional ...
SLOW_OR_OPTIONAL = {"torch", "transformers", "vllm", "ray", "plotly", "peft", "olmo_core", "wandb", "huggingface_hub", "safetensors", "tokenizers", "PIL", "psutil", "torchvision"}
# ... or absent from an engine's own environment (crossengine installed there without its dependencies)
ABSENT_IN_ENGINE_ENVS = {"pandas", "pyarrow", "rich"}
LAZY_OK = SLOW_OR_OPTIONAL | ABSENT_IN_ENGINE_ENVS


def _sources(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / "crossengine").rglob("*.py") if "remote_code" not in p.parts)


def _module(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class ImportRule:
    """Function-level imports of one copy of the package (`root`), judged by the rule above."""

    def __init__(self, root: Path = ROOT):
        self.root = root
        self.modules = {_module(p, root): p for p in _sources(root)}

    def targets(self, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
        """Absolute module names an import statement loads (a `from pkg import mod` names the module)."""
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            pkg = _module(path, self.root).split(".")
            pkg = pkg if path.name == "__init__.py" else pkg[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join(pkg + ([node.module] if node.module else []))
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in self.modules else base for a in node.names]

    def top_level(self, path: Path) -> set[str]:
        out: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.update(self.targets(path, node))
        return out

    def owner(self, name: str) -> str | None:
        while name and name not in self.modules:
            name = name.rpartition(".")[0]
        return name or None

    def loads_lazy_dependency(self, module: str, seen: frozenset = frozenset()) -> bool:
        """Whether importing this internal module imports a LAZY_OK module at its top, itself or through others."""
        for target in self.top_level(self.modules[module]):
            if target.split(".")[0] in LAZY_OK:
                return True
            owner = self.owner(target) if target.startswith("crossengine") else None
            if owner and owner not in seen and owner != module and self.loads_lazy_dependency(owner, seen | {module}):
                return True
        return False

    def offenders(self) -> list[str]:
        found = []
        for path in self.modules.values():
            at_top = self.top_level(path)
            for fn in ast.walk(ast.parse(path.read_text())):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    if not isinstance(node, (ast.Import, ast.ImportFrom)):
                        continue
                    for target in self.targets(path, node):
                        where = f"{path.relative_to(self.root)}:{node.lineno}: {target}"
                        owner = self.owner(target) if target.startswith("crossengine") else None
                        if target in at_top:
                            found.append(where + " (already imported at the top)")
                        elif target.split(".")[0] in LAZY_OK or (owner and self.loads_lazy_dependency(owner)):
                            continue
                        else:
                            found.append(where)
        return sorted(found)


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([exe, "--no-cache", "--config", str(root / "pyproject.toml")], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_import_layers_hold():
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_import_layers_catch_a_planted_back_import(tmp_path):
    """The negative control: a copy of the package where compare/ imports report/ inside a function
    (the kind of import that hid the graph before) must break the contract."""
    shutil.copytree(PACKAGE, tmp_path / "crossengine", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    planted = tmp_path / "crossengine" / "compare" / "summary.py"
    planted.write_text(planted.read_text() + "\n\ndef _planted():\n    from crossengine.report import terminal  # a back-import\n\n    return terminal\n")
    out = _lint_imports(tmp_path)
    assert out.returncode != 0
    assert "crossengine.compare.summary -> crossengine.report.terminal" in out.stdout


def test_imports_sit_at_module_level():
    offenders = ImportRule().offenders()
    assert not offenders, "function-level imports outside the allowed list (docs/internals/layers.md):\n" + "\n".join(offenders)


def test_the_import_rule_sees_a_function_level_import(tmp_path):
    """Negative control for the rule above: a plain stdlib import planted inside a function is reported."""
    shutil.copytree(PACKAGE, tmp_path / "crossengine", ignore=shutil.ignore_patterns("__pycache__"))
    planted = tmp_path / "crossengine" / "identity.py"
    planted.write_text(planted.read_text() + "\n\ndef _planted():\n    import json\n\n    return json\n")
    assert [o for o in ImportRule(tmp_path).offenders() if o.startswith("crossengine/identity.py")] == [f"crossengine/identity.py:{len(planted.read_text().splitlines()) - 2}: json"]


def test_no_module_exceeds_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


# a repository path in a comment or docstring (a folder of the repository, a slash, a file name)
_PATH = re.compile(r"(?<![\w./-])((?:crossengine|tests|bench|scripts|experiments|docs)/[\w./-]*\w)")


def test_comments_name_only_files_that_exist():
    files = [*_sources(), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("scripts/*"), ROOT / "pyproject.toml", ROOT / ".ci" / "run"]
    dead = [f"{f.relative_to(ROOT)}:{i}: {m.group(1)}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1) for m in _PATH.finditer(line) if not (ROOT / m.group(1)).exists()]
    assert not dead, "references to files that do not exist:\n" + "\n".join(dead)


def test_py_typed_ships():
    assert (PACKAGE / "py.typed").is_file()


def _ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_lint_passes():
    out = _ruff("check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_holds():
    out = _ruff("format", "--check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_docs_site_builds_strictly(tmp_path):
    """A broken link, a missing anchor or a generated table that fails to build fails here."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "crossengine validate" in cli and "--run-id" in cli  # generated from the typer app
    experiment = (tmp_path / "site" / "reference" / "experiment" / "index.html").read_text()
    assert "logits_budget_gb" in experiment  # generated from the pydantic schema


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 12_000, f"README.md is {len(text)} characters"
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), f"README links to a missing file: {link}"
