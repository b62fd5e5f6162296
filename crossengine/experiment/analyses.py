"""Every analysis an experiment can ask for, and for each engine whether it applies: one line per
engine it skips, said before anything loads.

Why one table: a requested analysis that an engine cannot do used to be dropped in silence (a
`localize:` run with a vLLM engine wrote no layers table and said nothing). Each analysis here
names what in the experiment asks for it and, from the engine's traits alone, why an engine is
left out; `Plan.lines()` prints the result and `crossengine validate` shows it, with no Ray and
no weights. An analysis whose absence is an error (routing on an engine type that cannot report it) is
refused by the loader instead; a dump that records no routing is skipped here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from crossengine.adapters import engine_class
from crossengine.experiment.schema import Experiment

if TYPE_CHECKING:  # the plan imports this module; its types are only annotations here
    from crossengine.experiment.plan import EngineInstance, Plan


@dataclass(frozen=True)
class Analysis:
    name: str  # as the line says it
    asked: Callable[[Experiment], bool]  # does the experiment ask for it
    skips: Callable[[EngineInstance, Plan], str | None]  # why this engine is left out, or None
    candidates_only: bool = False  # the reference takes no part of its own


def _localise(inst: EngineInstance, plan: Plan) -> str | None:
    if not inst.traits.captures_modules:
        return f"{inst.spec.type} engines cannot capture module outputs: no layers.parquet rows for it"
    return None


def _full_vocab(inst: EngineInstance, plan: Plan) -> str | None:
    if inst.traits.gives_full_logits(inst.spec):
        return None
    option = inst.traits.full_logits_option
    how = f" (set {option}: true on it)" if option else ""
    return f"{inst.spec.type} engines give top-k only{how}: its KL is topk_kl, cos_sim and kl_ref_cand stay null"


def _noise(inst: EngineInstance, plan: Plan) -> str | None:
    if inst.traits.has_records:
        return "its numbers are a file: nothing to vary, no floor for it"
    return None


def _chunking(inst: EngineInstance, plan: Plan) -> str | None:
    if inst.traits.gives_full_logits(inst.spec) and not inst.traits.chunks_logits:
        return f"{inst.spec.type} engines cannot score in position blocks: it holds a whole sample's logits"
    return None


def records_routing(inst: EngineInstance, plan: Plan) -> bool:
    """Whether an engine records routing: every engine that reports it, but a dump whose first record holds no routed
    experts (its source opened once per plan, `Plan.records`; a bad first record is said where the run reads it)."""
    if not inst.traits.has_records:
        return True
    source = plan.records(inst.name)
    first = next(iter(source.index()), None)
    try:
        return first is not None and getattr(source.read(first[1]), "routing", None) is not None
    except ValueError:
        return True


def _routing(inst: EngineInstance, plan: Plan) -> str | None:
    if not records_routing(inst, plan):
        return "its dump records no routed experts (`routed_experts`; slime: `rollout_routed_experts`): its routing_flips stay null"
    return None


def _processed(inst: EngineInstance, plan: Plan) -> str | None:
    if inst.traits.has_records or inst.traits.processes_logprobs:
        return None
    also = " (as a generator it reports processed ones)" if inst.traits.processed_logprobs_option else ""
    return f"{inst.spec.type} engines score raw log-probs only: its teacher-forced lp columns stay raw{also}"


def processed_dumps(exp: Experiment) -> dict:
    """Dump engine or variant -> its `sampling:`, where it declares processed log-probs (the loader refuses two different ones)."""
    return {
        name: spec.sampling
        for name, (_, _, spec) in exp.resolved_engines().items()
        if engine_class(spec.type).traits.has_records and getattr(spec, "sampling", None) is not None and spec.sampling.logprobs == "processed"
    }


def score_as(exp: Experiment) -> dict | None:
    """The processed quantity the torch engines score (a dump's declared one, else a generation's own sampler's); None: raw."""
    declared = next(iter(processed_dumps(exp).values()), None)
    if declared is not None:
        return declared.model_dump(exclude={"logprobs"})
    return exp.sampling.reading() if exp.mode != "score" else None


def _tensor_transport(inst: EngineInstance, plan: Plan) -> str | None:
    if not inst.traits.gives_full_logits(inst.spec):
        return None  # nothing of its travels as full logits
    why = inst.tensor_blocker()
    return f"it {why}: the object store carries its logits" if why else None


ANALYSES: tuple[Analysis, ...] = (
    Analysis("localise", lambda e: e.localize is not None, _localise),
    Analysis("full vocabulary", lambda e: e.full_vocab, _full_vocab),
    Analysis("noise floor", lambda e: e.noise is not None, _noise),
    Analysis("routing", lambda e: e.routing, _routing),
    Analysis("processed log-probs", lambda e: score_as(e) is not None, _processed),
    Analysis("logits budget", lambda e: e.full_vocab and e.placement.logits_budget_gb is not None, _chunking),
    Analysis("tensor transport", lambda e: e.full_vocab and e.placement.logits_transport in ("gloo", "nccl"), _tensor_transport),
)


def skipped_lines(plan: Plan) -> list[str]:
    """`skipped: <analysis> for engine '<name>': <why>` for every requested analysis and engine it leaves out."""
    out = []
    for analysis in ANALYSES:
        if not analysis.asked(plan.experiment):
            continue
        for inst in plan.instances:
            why = analysis.skips(inst, plan)
            if why:
                out.append(f"skipped: {analysis.name} for engine {inst.name!r}: {why}")
    return out
