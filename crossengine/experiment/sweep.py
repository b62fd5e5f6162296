"""A sweep file: one base experiment and axes; its members are the base with each combination of the axes' values.

    name: drift                                 # default: the file's stem
    experiment: sweep-base.yaml                 # the base, relative to this file
    axes:
      step:                                     # an axis: its name is a column of index.parquet
        field: engines.ckpt.model               # a dotted field of the experiment (or a list of fields set alike)
        values: {1: tiny-text-step1, 2: tiny-text-step2}   # label -> value (a list: each value is its own label)
      dtype: {field: engines.ckpt.dtype, values: [float32, bfloat16]}
    parallel: null                              # at most this many members at once (default: as the cluster holds them)

Members are named `<axis label>-<axis label>...` in axis order and each is an ordinary run in
`<output_dir>/<sweep name>/<member>/`, with its own resume. A member is validated by the same
loader as any experiment (its relative paths against the base's folder); a member whose
values make a bad experiment is reported when it runs, one line, and the others go on.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from crossengine.adapters.spec import Strict
from crossengine.errors import ExperimentError
from crossengine.experiment.files import is_file, line_of, read_mapping
from crossengine.experiment.load import _first_error
from crossengine.experiment.schema import NAME


class Axis(Strict):
    """One axis: which field(s) it sets, and its values by label."""

    field: str | list[str] = Field(description="A dotted field of the experiment, e.g. model or engines.cand.dtype; a list sets each alike.")
    values: dict[str, Any] | list[Any] = Field(min_length=1, description="label -> value, or a list (each value its own label).")

    @field_validator("values", mode="before")
    @classmethod
    def _labels_are_text(cls, v: Any) -> Any:
        return {str(k): x for k, x in v.items()} if isinstance(v, dict) else v  # YAML reads `1: …` as an int key

    def labelled(self) -> list[tuple[str, Any]]:
        if isinstance(self.values, dict):
            return [(str(k), v) for k, v in self.values.items()]
        return [(str(v), v) for v in self.values]

    def fields(self) -> list[str]:
        return [self.field] if isinstance(self.field, str) else list(self.field)


class SweepSpec(Strict):
    name: str | None = Field(None, description="Default: the file's stem; names the sweep's folder.")
    experiment: Path = Field(description="The base experiment file, relative to the sweep file.")
    axes: dict[str, Axis] = Field(min_length=1)
    parallel: int | None = Field(None, ge=1, description="At most this many members at once; default: as many as the cluster holds.")
    output_dir: Path = Field(Path("results"), description="The sweep's folder goes under it.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not NAME.match(v):
            raise ValueError(f"name {v!r} must match {NAME.pattern} (it names the sweep's folder)")
        return v


class Member:
    """One combination: its name, its axes' labels, and the experiment fields it sets."""

    def __init__(self, labels: dict[str, str], overrides: dict[str, Any]):
        self.labels = labels
        self.overrides = overrides
        self.name = "-".join(member_part(v) for v in labels.values())


def member_part(label: str) -> str:
    """A label as it stands in a member's folder name."""
    return re.sub(r"[^A-Za-z0-9._]+", "_", label).strip("_.") or "x"


class Sweep:
    def __init__(self, path: Path, spec: SweepSpec):
        self.path = path
        self.spec = spec
        self.name = spec.name or re.sub(r"[^A-Za-z0-9._-]", "-", path.stem).lstrip("._-") or "sweep"
        base = spec.experiment if spec.experiment.is_absolute() else path.parent / spec.experiment
        self.base = base

    def members(self) -> list[Member]:
        names = list(self.spec.axes)
        out = []
        for combo in itertools.product(*(self.spec.axes[n].labelled() for n in names)):
            labels = {n: label for n, (label, _) in zip(names, combo)}
            overrides = {f: value for n, (_, value) in zip(names, combo) for f in self.spec.axes[n].fields()}
            out.append(Member(labels, overrides))
        return out


def is_sweep_file(path: str | Path) -> bool:
    """Whether a YAML file is a sweep (a mapping with `axes`) rather than an experiment."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False  # the experiment loader says what is wrong with it
    return isinstance(data, dict) and "axes" in data


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep file (yaml.safe_load); one line naming the field on any problem, before anything runs."""

    path = Path(path)
    data, root = read_mapping(path, "sweep", "a sweep is a YAML mapping with experiment and axes")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise _first_error(e, path, root) from None
    sweep = Sweep(path, spec)
    if not is_file(sweep.base):
        raise ExperimentError(str(path), line_of(root, ("experiment",)), "experiment", f"no such experiment file: {sweep.base}")
    for axis_name, axis in spec.axes.items():  # two labels of one axis that make the same folder name
        seen: dict[str, str] = {}
        for label, _ in axis.labelled():
            part = member_part(label)
            if part in seen:
                loc = ("axes", axis_name, "values", label) if isinstance(axis.values, dict) else ("axes", axis_name, "values")
                raise ExperimentError(
                    str(path), line_of(root, loc), f"axes.{axis_name}.values", f"labels {seen[part]!r} and {label!r} both make the member name part {part!r}: give them distinct labels"
                )
            seen[part] = label
    return sweep
