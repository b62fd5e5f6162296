"""The run modes (score, generate, greedy) as small classes with one contract.

For each batch of a wave the Runner (which keeps resume, waves and pools) asks a mode three
things, and nothing else; a mode sees of the run only a `RunContext` (the run folder, engine
calls, error recording, timings), never the Runner:

    owed(wave, b)                -> the candidates batch b still has to produce (empty: done)
    submit(pool, b, idx, cands)  -> a `Pending` batch: the engines' work started, as ObjectRefs
    write(pending, wave, progress) -> wait for that work and write the batch's files

`pipelined` modes let the runner submit batch n+1 before writing batch n (scoring); the
generative modes must sample before anyone scores, so their batches go one after another.
Every mode scores the same way: the reference scores, each candidate compares in its own
worker (crossengine/run/worker.py), the driver writes token rows. Generate and greedy first
decode, then add what they sampled or decoded (`write_extra`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from crossengine.adapters.base import Generation, RawSample, Sample, SampleError
from crossengine.compare.inputs import first_differences
from crossengine.compare.noise import coarser_eps
from crossengine.compare.sampling import Fit
from crossengine.compare.tables import noise_table, routing_part_table, token_table
from crossengine.compare.tokens import (
    CompareOptions,
    Part,
    compare_batch,
    payload_bytes,
)
from crossengine.errors import EngineDied
from crossengine.experiment.plan import EngineInstance, Plan
from crossengine.identity import SAMPLED
from crossengine.results import RunDir, write_table
from crossengine.schemas import INPUTS_SCHEMA, WORST_SCHEMA

if TYPE_CHECKING:  # the runner imports this module; this is for type names only
    from crossengine.run.pool import EnginePool


@dataclass
class RunContext:
    """What a mode may use of the run it serves; the Runner makes one and keeps the rest (resume, waves, pools, run.json)."""

    plan: Plan
    run_dir: RunDir
    timings: dict[str, float]
    fetch: Callable[[str, Any, str], Any]  # (engine, ObjectRef, doing) -> value; a failure is one line naming the engine
    record_error: Callable[[str, SampleError], None]  # a sample an engine could not run: reported once, skipped
    prepare: Callable[[Any, list[int], str], list[Sample]]  # (pool, sample indices, doing) -> the reference's prepared samples
    check_reference: Callable[[int, int, str], None]  # (batch, wave, digest): the reference is bitwise the same in every wave
    say_plain: Callable[[str], None]  # a terminal line holding user text (never read as markup)
    warn: Callable[[str], None]  # an error or warning line (stderr)
    dead: dict[str, str]  # candidates whose engine died: no later batch asks them
    engine_died: Callable[[str, Exception], None]  # (candidate, EngineDied): said once, recorded
    vocab_text: pa.Array | None = None  # every token's text, from the reference (token_text column); set once engines start
    sampling: dict = field(default_factory=dict)  # dump candidate -> (declared Reading, compare.sampling.Fit over its batches)


def raw_sample(plan, i: int) -> RawSample:
    """What the reference engine needs to prepare sample i (ids are assigned by config); a sample
    taken from a dump is read from its record now (ValueError, naming file:line and field, if bad)."""
    exp = plan.experiment
    s = exp.samples[i]
    if s.dump is not None:
        record = plan.records(s.dump).read(s._record)
        return RawSample(s.id, token_ids=record.token_ids.tolist(), max_length=exp.max_length, prompt_len=record.prompt_len)
    messages = [m.model_dump(mode="json", exclude_none=True) for m in s.messages] if s.messages else None
    return RawSample(s.id, s.text, [str(p) for p in s.images], s.token_ids, exp.max_length, messages, prompt_len=s.prompt_len)


def raw_batch(plan, indices: list[int], record_error: Callable[[str, SampleError], None]) -> list[RawSample]:
    """raw_sample of each index; a dump record that cannot be scored is recorded against its engine and skipped."""
    out = []
    for i in indices:
        try:
            out.append(raw_sample(plan, i))
        except ValueError as exc:
            s = plan.experiment.samples[i]
            record_error(s.dump or plan.reference.name, SampleError(s.id, str(exc)))
    return out


@dataclass
class Decoded:
    """What a generative mode decoded for a batch, before anyone scores it."""

    generator: EngineInstance
    prompts: list[Sample]
    extended: list[Sample]  # prompt + completion: what every engine scores
    generations: list[Generation]  # the generator's, one per extended sample
    outputs: dict[str, list] = field(default_factory=dict)  # each decoding engine's raw outputs, per prompt


@dataclass
class Pending:
    """A submitted batch: ObjectRefs of the engines' work, nothing fetched yet."""

    b: int
    idx: list[int]
    cands: list[EngineInstance]
    batch: Any  # the prepared (or extended) samples
    ref_out: Any  # the reference's scores (they go to the candidates, never here)
    ref_check: Any  # compare.ReferenceCheck
    parts: dict[str, Any]  # candidate name -> compare.Part
    decoded: Decoded | None = None
    release: Callable[[], None] | None = None  # the reference may drop what it held for this batch (long samples' hidden states)


class Mode:
    """Scoring: the reference's samples, scored by every engine, compared per candidate."""

    pipelined = True

    def __init__(self, run: RunContext):
        self.run = run
        self.plan = run.plan
        self.exp = run.plan.experiment
        self.noise_said: set[tuple[str, str]] = set()  # (engine, reason) of noise conditions a sample failed, said once
        self._prepared: dict[int, tuple[Any, list]] = {}  # batch -> (ObjectRef of its prepared samples, raw samples), submitted ahead

    def always_loaded(self) -> list[EngineInstance]:
        """Engines every wave needs (placed beside the reference)."""
        return [self.plan.reference]

    def owed(self, wave: list[EngineInstance], b: int) -> list[EngineInstance]:
        return [c for c in wave if c.name not in self.run.dead and not self.run.run_dir.done(c.name, b)]

    def submit(self, pool: EnginePool, b: int, idx: list[int], cands: list[EngineInstance], ahead: tuple[int, list[int]] | None = None) -> Pending:
        """Nothing waits: the reference's prepared samples go to every engine as an ObjectRef. `ahead`: the next
        batch (number, samples), prepared now, before this batch's scores on the reference's thread, so that a candidate
        that finished this batch's forward starts the next at once instead of waiting for the reference."""
        batch, raw = self._prepared.pop(b, None) or self._prepare(pool, idx)
        if ahead is not None:
            self._prepared[ahead[0]] = self._prepare(pool, ahead[1])
        return self._score(pool, b, idx, cands, batch, raw=raw)

    def _prepare(self, pool: EnginePool, idx: list[int]) -> tuple[Any, list]:
        raw = raw_batch(self.plan, idx, self.run.record_error)
        return pool.call(self.plan.reference.name, "prepare", raw), raw

    def _score(self, pool: EnginePool, b: int, idx: list[int], cands: list[EngineInstance], batch, decoded: Decoded | None = None, raw=None) -> Pending:
        ref = self.plan.reference.name
        cands = [c for c in cands if c.name not in self.run.dead]
        # the reference's floor is measured in every wave (each wave's candidates read it with its scores), written once
        key = uuid.uuid4().hex
        ref_out, ref_check = pool.score_reference(ref, batch, self.exp.top_k, self.exp.full_vocab, self.plan.noise_plan(self.plan.reference), key)
        parts = {
            c.name: pool.score_and_compare(c.name, batch, ref_out, self.exp.top_k, self.exp.full_vocab, self.options(c), raw if c.spec.inputs == "own" else None, self.plan.noise_plan(c))
            for c in cands
        }
        return Pending(b, idx, cands, batch, ref_out, ref_check, parts, decoded, lambda: pool.release(ref, key))

    def write(self, p: Pending, w: int, progress) -> None:
        run, ref = self.run, self.plan.reference.name
        what = f"batch {p.b} (samples {', '.join(self.exp.samples[i].id for i in p.idx[:3])}{', ...' if len(p.idx) > 3 else ''})"
        check = run.fetch(ref, p.ref_check, f"{'preparing and ' if self.pipelined else ''}scoring {what}")
        for err in check.errors:
            run.record_error(ref, err)
        run.check_reference(p.b, w, check.digest)
        if not run.run_dir.noise_part(ref, p.b).exists():  # every wave re-scores the reference: its floor is written once
            self.write_noise(ref, p.b, check.noise, check.noise_s)
        progress.advance(ref, len(p.idx))
        for inst in p.cands:
            if inst.name in run.dead:  # died on an earlier batch; this one was submitted before it was known
                continue
            try:
                part = run.fetch(inst.name, p.parts[inst.name], f"scoring {what}")
            except EngineDied as exc:
                run.engine_died(inst.name, exc)
                continue
            self.write_part(p.b, self.options(inst), part)
            progress.advance(inst.name, len(p.idx))
        self.write_extra(p)
        if p.release is not None:
            p.release()

    def write_extra(self, p: Pending) -> None:
        """Files a batch writes besides the candidates' token parts (none when scoring)."""

    def options(self, inst: EngineInstance, completion_only: bool = False) -> CompareOptions:
        noise = self.exp.noise
        margin = noise.margin if noise is not None else 1.0
        rounding = noise.rounding_ulps * coarser_eps(self.plan.reference, inst, self.exp.dtype) if noise is not None else 0.0
        ref = self.plan.reference
        side = "cand" if inst.traits.has_records else "ref" if ref.traits.has_records and inst.full_logits else None  # a dump's claim, checked
        sampling = getattr((inst if side == "cand" else ref).spec, "sampling", None) if side else None
        reading = sampling.reading() if sampling is not None else None
        return CompareOptions(ref.name, inst.name, inst.cand_engine, inst.variant, self.exp.tie_eps, completion_only, margin, rounding, reading, side or "cand")

    def write_noise(self, name: str, b: int, rows: list, seconds: float) -> None:
        """An engine's floor for one batch (noise/), where it has one; before its token part marks the batch done."""
        if self.plan.noise_plan(self.plan.instance(name)) is None:
            return
        self.run.timings[f"{name}.noise_s"] = self.run.timings.get(f"{name}.noise_s", 0.0) + seconds
        for r in rows:
            for why in r.skipped:  # e.g. a batching that takes text samples only: that condition is left out of this sample's floor
                if (name, why) not in self.noise_said:  # once per engine and reason, naming the first sample
                    self.noise_said.add((name, why))
                    self.run.warn(f"noise floor of {name!r}: condition {why} (first at sample {r.sample_id}; left out of the floor where it fails)")
        write_table(self.run.run_dir.noise_part(name, b), noise_table(rows, name, self.run.vocab_text))

    def write_part(self, b: int, options: CompareOptions, part: Part) -> None:
        """One candidate's batch: the worst rows first, then the token part that marks the batch done."""
        run, name = self.run, options.candidate
        for err in part.errors:
            run.record_error(name, err)
        run.timings[f"{name}.metrics_s"] = run.timings.get(f"{name}.metrics_s", 0.0) + part.metrics_s
        run.timings["bytes_to_driver"] = run.timings.get("bytes_to_driver", 0) + payload_bytes(part)
        if part.sampling is not None:  # said once at the end (Runner.sampling_lines)
            label = name if options.check_side == "cand" else f"{options.reference} (read with {name}'s logits)"
            run.sampling.setdefault(label, (options.check_reading, Fit()))[1].add(part.sampling)
        if part.inputs is not None:  # before the token part that marks the batch done
            rows = [{"cand_engine": options.cand_engine, "variant": options.variant, **r} for r in part.inputs]
            write_table(run.run_dir.inputs_part(name, b), pa.Table.from_pylist(rows, schema=INPUTS_SCHEMA))
            for line in first_differences(part.inputs):
                run.say_plain(f"inputs of {name!r}, {line}")
        if name in self.plan.names():  # not the generator's own sampling, which has no floor
            self.write_noise(name, b, part.noise, part.noise_s)
        if self.exp.routing:
            write_table(run.run_dir.routing_part(name, b), routing_part_table(part.routing, options.cand_engine, options.variant))
        write_table(run.run_dir.worst_part(name, b), pa.Table.from_pylist(part.worst, schema=WORST_SCHEMA))
        write_table(run.run_dir.part(name, b), token_table(part.rows, self.plan.run_id, self.plan.reference.name, options.cand_engine, options.variant, run.vocab_text))


class _Decoding(Mode):
    """Generate and greedy: decode first (this waits), then score prompt + completion."""

    pipelined = False

    def extra_parts(self, wave: list[EngineInstance], b: int) -> list[Path]:
        raise NotImplementedError

    def owed(self, wave: list[EngineInstance], b: int) -> list[EngineInstance]:
        """A decoded batch is redone whole: its parts share one sampling."""
        missing = super().owed(wave, b) or [p for p in self.extra_parts(wave, b) if not p.exists()]
        return list(wave) if missing else []

    def deciders(self, cands: list[EngineInstance]) -> tuple[EngineInstance, list[EngineInstance], Any]:
        """(generator, every engine that decodes, sampling parameters)."""
        raise NotImplementedError

    def submit(self, pool: EnginePool, b: int, idx: list[int], cands: list[EngineInstance], ahead: tuple[int, list[int]] | None = None) -> Pending:
        import ray

        prompts = self.run.prepare(pool, idx, f"preparing batch {b}")
        decoded = self._decode(pool, prompts, cands, b) if prompts else None
        return self._score(pool, b, idx, cands, ray.put(decoded.extended if decoded else []), decoded)

    def _decode(self, pool: EnginePool, prompts: list[Sample], cands: list[EngineInstance], b: int) -> Decoded:

        from crossengine.compare.generation import extend_samples

        run = self.run
        generator, deciders, sampling = self.deciders(cands)
        t = time.time()
        futures = {i.name: pool.call(i.name, "generate", prompts, sampling, self.exp.top_k) for i in deciders}
        outputs = {name: run.fetch(name, f, f"generating batch {b}") for name, f in futures.items()}
        run.timings["generate_s"] = run.timings.get("generate_s", 0.0) + time.time() - t
        special = set(pool.infos[self.plan.reference.name]["special_ids"])
        extended, generations, errors = extend_samples(prompts, outputs[generator.name], special)
        for err in errors:
            run.record_error(generator.name, err)
        return Decoded(generator, prompts, extended, generations, outputs)


class GenerateMode(_Decoding):
    """The generator samples; everyone rescores; its own sampling-time log-probs are a candidate too."""

    def generator(self) -> EngineInstance:
        return self.plan.instance(self.exp.generator or self.plan.reference.name)

    def always_loaded(self) -> list[EngineInstance]:
        gen = self.generator()
        return [self.plan.reference] + ([gen] if gen is not self.plan.reference else [])

    def extra_parts(self, wave: list[EngineInstance], b: int) -> list[Path]:
        return [self.run.run_dir.part(f"{self.generator().name}.{SAMPLED}", b)]

    def deciders(self, cands):
        gen = self.generator()
        return gen, [gen], self.exp.sampling

    def write_extra(self, p: Pending) -> None:
        """The generator's sampling-time log-probs vs the reference, on the completion only."""
        import ray

        from crossengine.compare.generation import sampled_scores

        gen = self.generator()
        options = replace(self.options(gen, completion_only=True), candidate=f"{gen.name}.{SAMPLED}", variant=SAMPLED)
        if p.decoded is None:  # every sample failed to prepare: an empty part marks the batch done
            self.write_part(p.b, options, Part())
            return
        sampled = [sampled_scores(s, g) for s, g in zip(p.decoded.extended, p.decoded.generations)]
        part = ray.remote(num_cpus=0)(compare_batch).remote(p.batch, p.ref_out, sampled, options)  # the reference's logits stay off the driver
        self.write_part(p.b, options, self.run.fetch(gen.name, part, f"comparing batch {p.b}'s sampled tokens"))


class GreedyMode(_Decoding):
    """Every engine decodes greedily; the reference's decode is rescored; where each decode leaves it."""

    def extra_parts(self, wave: list[EngineInstance], b: int) -> list[Path]:
        return [self.run.run_dir.greedy_part(c.name, b) for c in wave]

    def deciders(self, cands):
        ref = self.plan.reference
        return ref, [ref, *cands], self.exp.sampling.model_copy(update={"temperature": 0.0, "n": 1})

    def write_extra(self, p: Pending) -> None:
        from crossengine.compare.generation import GREEDY_SCHEMA, greedy_divergence

        d = p.decoded  # None when every sample failed to prepare: empty parts mark the batch done
        if d is not None:
            texts = self.run.vocab_text.to_pylist()
            ref_gens = {g.sample_id: g for g in d.generations}
            extended = {s.sample_id: s for s in d.extended}
        for inst in p.cands:
            rows = []
            for prompt, out in zip(d.prompts, d.outputs[inst.name]) if d is not None else ():
                sid = prompt.sample_id
                if isinstance(out, SampleError):
                    self.run.record_error(inst.name, out)
                elif sid in ref_gens:
                    rows.append(greedy_divergence(sid, extended[sid].prompt_len, ref_gens[sid], out[0], self.plan.reference.name, inst.cand_engine, inst.variant, texts))
            write_table(self.run.run_dir.greedy_part(inst.name, p.b), pa.Table.from_pylist(rows, schema=GREEDY_SCHEMA))


MODES: dict[str, type[Mode]] = {"score": Mode, "generate": GenerateMode, "greedy": GreedyMode}
