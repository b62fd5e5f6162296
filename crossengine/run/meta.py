"""run.json for a new run: what was asked, with what, where, and which files it read.

Why its own module: a resume and `crossengine compare` trust these fields (the fingerprints above
all), so they are built in one place from the plan alone.
"""

from __future__ import annotations

from crossengine import __version__
from crossengine.experiment.plan import Plan
from crossengine.results import git_sha, host_info
from crossengine.run_meta import RunMeta
from crossengine.schemas import SCHEMA_VERSION

SAMPLES_IN_RUN_JSON = 1000


def new_run_meta(plan: Plan, now: str) -> RunMeta:
    fingerprint_of_samples = plan.samples_fingerprint()
    return RunMeta(
        run_id=plan.run_id,
        schema_version=SCHEMA_VERSION,
        crossengine_version=__version__,
        git_sha=git_sha(),
        experiment_file=str(plan.experiment_path),
        experiment=experiment_json(plan, fingerprint_of_samples),
        samples_fingerprint=fingerprint_of_samples,
        fingerprint=plan.fingerprint,
        files=plan.files,
        reference=plan.reference.name,
        candidates={c.name: {"cand_engine": c.cand_engine, "variant": c.variant} for c in plan.candidates},
        model_paths={i.name: i.model_path for i in plan.instances},
        host=host_info(),
        started_at=now,
        n_samples=len(plan.experiment.samples),
        n_batches=len(plan.batches),
    )


def experiment_json(plan: Plan, fingerprint_of_samples: str) -> dict:
    """The experiment as resolved; the sample list only up to SAMPLES_IN_RUN_JSON (a 100k-sample
    run would make run.json hundreds of MB): beyond, its count and fingerprint stand for it."""
    exp = plan.experiment
    if len(exp.samples) <= SAMPLES_IN_RUN_JSON:
        return exp.model_dump(mode="json")
    out = exp.model_dump(mode="json", exclude={"samples"})
    out["samples"] = {"omitted": len(exp.samples), "fingerprint": fingerprint_of_samples}
    return out


# (stage, how its seconds are found in Runner.timings: a key, or a key prefix/suffix over several engines or waves)
STAGES = (
    ("start Ray", lambda k: k == "ray_init_s"),
    ("load engines", lambda k: k.startswith("engine_start_s_wave")),
    ("score and compare", lambda k: k == "scoring_s"),
    ("localise", lambda k: k == "localize_s"),
    ("refit: fresh loads", lambda k: k.endswith(".refit_fresh_s")),
    ("summary", lambda k: k == "summary_s"),
    ("stop engines", lambda k: k == "engine_stop_s"),
)


def stage_table(timings: dict[str, float]) -> dict[str, float]:
    """Where a run's wall time went (run.json `stages`, the report, the terminal's `time:` line): each stage's seconds,
    and `other` for what no stage holds (total_s minus their sum): a run that spends its time outside the engines'
    forwards says so."""
    out = {name: sum(v for k, v in timings.items() if match(k)) for name, match in STAGES}
    out = {k: v for k, v in out.items() if v > 0}
    if "total_s" in timings:
        out["other"] = max(0.0, timings["total_s"] - sum(out.values()))
        out["total"] = timings["total_s"]
    return out
