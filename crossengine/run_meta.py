"""run.json as a type: the runner writes a `RunMeta`, reports and `compare` read one.

One model for writer and readers, so a field is renamed in one place and a reader cannot ask
for a key the writer never wrote. Unknown keys are kept (a run.json written by a newer
crossengine still reads); fields added since schema version 1 have defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class RunMeta(BaseModel):
    model_config = ConfigDict(extra="allow")

    run_id: str
    schema_version: int
    crossengine_version: str
    git_sha: str | None = None
    experiment_file: str
    experiment: dict[str, Any] = Field(description="the experiment as resolved; `samples` is {omitted, fingerprint} beyond 1,000 samples")
    samples_fingerprint: str | None = None
    fingerprint: str = Field(description="hash of the experiment and of the files it names: a resumed run must match it")
    files: dict[str, str] = Field(default_factory=dict, description="every file the experiment names (images, chat templates, adapters) -> content hash")
    reference: str
    candidates: dict[str, dict[str, str]] = Field(description="instance -> {cand_engine, variant}")
    model_paths: dict[str, str] = {}
    host: dict[str, Any] = {}
    started_at: str
    resumed_at: list[str] = []
    finished_at: str | None = None
    n_samples: int
    n_batches: int
    status: Literal["running", "complete", "incomplete"] = "running"  # incomplete: finished, but an engine died; resumable
    engines: dict[str, dict[str, Any]] = Field(default_factory=dict, description="instance -> EngineInfo as its worker saw it")
    placement: dict[str, Any] | None = None
    timings: dict[str, float] = {}
    stages: dict[str, float] = Field(default_factory=dict, description="where the wall time went: seconds per stage, `other` (what no stage holds) and `total` (run/meta.py stage_table)")
    logits_transport: dict[str, str] = Field(
        default_factory=dict, description="candidate -> how the reference's full logits reached its worker: object_store, gloo or nccl (placement.logits_transport)"
    )
    errors: list[dict[str, str]] = Field(default_factory=list, description="{sample_id, engine, error} per failed sample")
    expectations: dict[str, list[str]] = Field(default_factory=dict, description="`expect: bitwise` claims: {failed: [...], notes: [...]} lines")
    sampling_checks: dict[str, str] = Field(default_factory=dict, description="dump candidate -> its sampling check: its `sampling:` claim read against the reference's logits")
    gates: dict[str, list[str]] = Field(default_factory=dict, description="`gates:` and --fail-on-alarm: {checked: [...], broken: [...]} lines; a broken one exits 3")
    refit: dict[str, list[dict[str, Any]]] = Field(default_factory=dict, description="refit engine -> per step: tokens, bitwise, max_abs_diff, first, probes, stale, findings")

    @property
    def variants(self) -> bool:
        return bool(self.experiment.get("variants"))

    @classmethod
    def read(cls, run_dir: Path) -> RunMeta:
        return cls.model_validate(json.loads((Path(run_dir) / "run.json").read_text()))
