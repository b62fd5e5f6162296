"""`gates:`: pass/fail checks a run must meet, for CI and pre-run checks (a broken one exits 3).

Two kinds, one per list item:

    gates:
      - {metric: gen_kl_error, max: 1.0e-3}          # a summary metric of every candidate (pooled row), or `candidates:`
      - {gen_kl_error: {max: 1.0e-3}}                # the same, written as the metric's name
      - {alarm: template_mismatch}                   # broken when that alarm trips (docs/guides/rl-monitor.md#alarms)

Names are checked before anything loads: a metric must be a summary column, an alarm one of the alarms; a
wrong one is a file:line error naming the field. The check itself is crossengine/compare/gates.py.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import Field, field_validator, model_validator

from crossengine.adapters.spec import Strict


class GateSpec(Strict):
    """One gate: a summary metric within [min, max], or an alarm that must not trip."""

    metric: str | None = Field(None, description="A summary column (summary.parquet), checked on each candidate's pooled row.")
    max: float | None = Field(None, description="Broken where the metric is above this.")
    min: float | None = Field(None, description="Broken where the metric is below this.")
    alarm: str | None = Field(None, description="Broken where this alarm trips (with the experiment's `alarms:` limits).")
    candidates: list[str] | None = Field(None, description="The candidates it applies to; default: every one.")

    @model_validator(mode="before")
    @classmethod
    def _named_form(cls, v: Any) -> Any:
        """`{gen_kl_error: {max: 1e-3}}` is `{metric: gen_kl_error, max: 1e-3}`."""
        if isinstance(v, dict) and len(v) == 1:
            ((key, value),) = v.items()
            if key not in cls.model_fields and isinstance(value, dict):
                return {"metric": key, **value}
        return v

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str | None) -> str | None:
        from crossengine.compare.summary import summary_metrics

        known = summary_metrics()
        if v is not None and v not in known:
            near = difflib.get_close_matches(v, known, n=3)
            raise ValueError(f"unknown metric {v!r}: not a summary column" + (f" (did you mean {', '.join(near)}?)" if near else " (docs/reference/metrics.md lists them)"))
        return v

    @field_validator("alarm")
    @classmethod
    def _known_alarm(cls, v: str | None) -> str | None:
        from crossengine.compare.alarms import RULES

        if v is not None and v not in RULES:
            raise ValueError(f"unknown alarm {v!r}; alarms are {', '.join(RULES)}")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> GateSpec:
        if (self.metric is None) == (self.alarm is None):
            raise ValueError("a gate is either {metric: NAME, max: X, min: Y} or {alarm: NAME}")
        if self.metric is not None and self.max is None and self.min is None:
            raise ValueError(f"gate on {self.metric!r} needs max, min or both")
        if self.alarm is not None and (self.max is not None or self.min is not None):
            raise ValueError("an alarm gate takes no max/min: the alarm's own limit applies (change it under `alarms:`)")
        return self

    def says(self) -> str:
        if self.alarm is not None:
            return f"alarm {self.alarm} must not trip"
        bounds = [f">= {self.min:g}" if self.min is not None else "", f"<= {self.max:g}" if self.max is not None else ""]
        return f"{self.metric} {' and '.join(b for b in bounds if b)}"
