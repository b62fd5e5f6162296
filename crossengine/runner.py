"""Runs a plan: one Ray actor per engine instance, batches streamed through, parts on disk.

For each batch every engine scores the same samples concurrently; while they work on
batch n+1 the driver turns batch n into metric rows and writes one Parquet part per
candidate. Logits never outlive their batch. A batch whose parts all exist is skipped,
which is all a resumed run needs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from . import __version__
from .adapters.base import Sample, SampleError, TokenLogprobs
from .align import check_scores
from .config import experiment_error
from .errors import CrossengineError
from .metrics import token_metrics
from .plan import EngineInstance, Plan
from .pool import EnginePool, ensure_ray, one_line
from .progress import engine_progress
from .results import RunDir, TokenRows, git_sha, host_info, token_table, write_table
from .summary import summarize


def raw_samples(plan: Plan) -> list[dict[str, Any]]:
    exp = plan.experiment
    return [
        {
            "id": s.id or f"s{i}",
            "text": s.text,
            "images": [str(p) for p in s.images],
            "token_ids": s.token_ids,
            "max_length": exp.max_length,
        }
        for i, s in enumerate(exp.samples)
    ]


def prepare_samples(plan: Plan, pool: EnginePool) -> list[Sample]:
    """Tokenise once, on the reference; a sample that cannot be prepared is an input error."""
    import ray

    raw = raw_samples(plan)
    ref = pool.actors[plan.reference.name]
    try:
        samples = ray.get(ref.prepare.remote(raw))
    except Exception as exc:  # noqa: BLE001
        cause = getattr(exc, "cause", exc)
        if isinstance(cause, SampleError):
            idx = next(i for i, r in enumerate(raw) if r["id"] == cause.sample_id)
            raise experiment_error(plan.experiment_path, ("samples", idx), cause.message) from None
        raise CrossengineError(f"reference {plan.reference.name!r} could not prepare samples: {one_line(exc)}") from None
    vocab = pool.infos[plan.reference.name]["extra"].get("vocab_size")
    for i, s in enumerate(samples):
        if vocab is not None and int(s.input_ids.max()) >= vocab:
            j = int(np.argmax(s.input_ids >= vocab))
            msg = f"token id {int(s.input_ids[j])} >= vocab size {vocab} of {plan.reference.name}"
            raise experiment_error(plan.experiment_path, ("samples", i, "token_ids", j), msg)
    return samples


class Runner:
    """Drives one run; `run()` returns the run folder."""

    def __init__(self, plan: Plan, console=None, address: str | None = None, overwrite: bool = False, localize_only: bool = False):
        self.plan = plan
        self.localize_only = localize_only
        self.console = console
        self.address = address
        self.overwrite = overwrite
        self.run_dir = RunDir(plan.run_dir)
        self.errors: list[dict[str, str]] = []
        self.timings: dict[str, float] = {}

    def _say(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg)

    def _check_existing(self) -> dict | None:
        meta = self.run_dir.read_meta()
        if meta is None:
            return None
        if meta.get("status") == "complete" and not self.overwrite:
            raise CrossengineError(f"{self.run_dir.root}: run {self.plan.run_id!r} is complete; pass --overwrite or choose another --run-id")
        if meta.get("fingerprint") != self.plan.fingerprint and not self.overwrite:
            raise CrossengineError(f"{self.run_dir.root}: the experiment changed since this run started; pass --overwrite or choose another --run-id")
        if self.overwrite:
            import shutil

            shutil.rmtree(self.run_dir.root)
            return None
        return meta

    def run(self) -> Path:
        import ray

        t0 = time.time()
        resumed = self._check_existing()
        gpus = ensure_ray(self.address)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        self.timings["ray_init_s"] = time.time() - t0
        waves = self.plan.waves(gpus)
        infos: dict[str, dict] = {}
        samples: list[Sample] | None = None
        try:
            for w, wave in enumerate(waves):
                t = time.time()
                members = [self.plan.reference, *wave]
                if self.plan.experiment.mode == "generate" and self._generator() not in members:
                    members.append(self._generator())  # it samples every batch, whichever wave scores
                pool = EnginePool(members, self.plan.experiment.seed, cpus, self.plan.experiment_path.parent, self.console)
                self.timings[f"engine_start_s_wave{w}"] = time.time() - t
                self.timings.update({f"{name}.ready_after_s": v for name, v in pool.start_s.items()})
                infos.update(pool.infos)
                try:
                    if samples is None:
                        samples = prepare_samples(self.plan, pool)
                        vocab_text = pa.array(ray.get(pool.actors[self.plan.reference.name].token_texts.remote()), pa.string())
                        self._start_meta(infos, resumed, len(samples))
                    if not self.localize_only:
                        self._run_wave(pool, wave, samples, vocab_text)
                    if self.plan.experiment.localize is not None:
                        self._localize(pool, samples)
                    for name, t_engine in pool.engine_timings().items():
                        self.timings.update({f"{name}.{k}": v for k, v in t_engine.items()})
                finally:
                    pool.close()
        except KeyboardInterrupt:
            self._say(f"[yellow]interrupted; finished batches are kept. Resume with: crossengine run {self.plan.experiment_path} --run-id {self.plan.run_id}")
            raise
        if self.localize_only:
            self._finish_meta(infos)
            return self.run_dir.root
        t = time.time()
        summary = summarize(self.run_dir.tokens)
        write_table(self.run_dir.summary, pa.Table.from_pandas(summary, preserve_index=False))
        if len(self.plan.candidates) > 1:
            from .nearest import nearest_table

            nearest = nearest_table(self.run_dir.tokens, self.plan.reference.name)
            write_table(self.run_dir.root / "nearest.parquet", pa.Table.from_pandas(nearest, preserve_index=False))
        self.timings["summary_s"] = time.time() - t
        self.timings["total_s"] = time.time() - t0
        self._finish_meta(infos)
        return self.run_dir.root

    # --------------------------------------------------------------------- batches

    def _run_wave(self, pool: EnginePool, wave: list[EngineInstance], samples: list[Sample], vocab_text: pa.Array) -> None:
        import ray

        exp = self.plan.experiment
        generative = exp.mode != "score"
        ref = self.plan.reference
        todo = []
        for b, idx in enumerate(self.plan.batches):
            missing = [c for c in wave if not self.run_dir.done(c.name, b)]
            extra = [p for p in self._extra_parts(wave, b) if not p.exists()]
            if missing or extra:  # a generated batch is redone whole: its parts share one sampling
                todo.append((b, idx, wave if generative else missing))
        progress = engine_progress(self.console, [ref, *wave], len(samples), self.plan, self.run_dir)

        def submit(item):
            b, idx, cands = item
            batch = [samples[i] for i in idx]
            gens = {}
            if generative:
                batch, gens = self._generate(pool, batch, cands)
            batch_ref = ray.put(batch)
            futures = {inst.name: pool.actors[inst.name].score.remote(batch_ref, exp.top_k, exp.full_vocab) for inst in [ref, *cands]}
            return b, idx, batch, cands, futures, gens

        t = time.time()
        with progress:
            pending = submit(todo[0]) if todo else None
            for n in range(len(todo)):
                b, idx, batch, cands, futures, gens = pending
                if not generative:  # engines start on the next batch while this one is written
                    pending = submit(todo[n + 1]) if n + 1 < len(todo) else None
                ref_out = ray.get(futures[ref.name])
                progress.advance(ref.name, len(idx))
                for inst in cands:
                    cand_out = ray.get(futures[inst.name])
                    self._write_part(b, inst.name, inst.cand_engine, inst.variant, batch, ref_out, cand_out, vocab_text)
                    progress.advance(inst.name, len(idx))
                if generative:
                    self._write_generated(b, batch, ref_out, gens, vocab_text)
                    pending = submit(todo[n + 1]) if n + 1 < len(todo) else None
        self.timings["scoring_s"] = self.timings.get("scoring_s", 0.0) + time.time() - t

    def _localize(self, pool: EnginePool, samples: list[Sample]) -> None:
        from .localize import localize_wave, print_localization

        t = time.time()
        layers, buffers = localize_wave(pool, self.plan, samples)
        for name, frame in (("layers", layers), ("buffers", buffers)):
            path = self.run_dir.root / f"{name}.parquet"
            if path.exists() and not frame.empty:  # later waves add their candidates
                frame = pd.concat([pd.read_parquet(path), frame], ignore_index=True)
            if not frame.empty:
                write_table(path, pa.Table.from_pandas(frame, preserve_index=False))
        self.timings["localize_s"] = self.timings.get("localize_s", 0.0) + time.time() - t
        if self.console is not None:
            print_localization(layers, buffers, self.plan.experiment.localize.tolerance, self.console)

    # ------------------------------------------------------------------ generation

    def _generator(self) -> EngineInstance:
        name = self.plan.experiment.generator or self.plan.reference.name
        return next(i for i in self.plan.instances if i.name == name)

    def _extra_parts(self, wave: list[EngineInstance], b: int) -> list[Path]:
        """Files a batch writes besides the candidates' token parts."""
        mode = self.plan.experiment.mode
        if mode == "generate":
            return [self.run_dir.part(f"{self._generator().name}.sampled", b)]
        if mode == "greedy":
            return [self.run_dir.greedy_part(c.name, b) for c in wave]
        return []

    def _generate(self, pool: EnginePool, batch: list[Sample], cands: list[EngineInstance]):
        """Sample (or decode greedily) with the generator; in greedy mode every engine decodes."""
        import ray

        from .generation import extend_samples

        exp = self.plan.experiment
        greedy = exp.mode == "greedy"
        sampling = exp.sampling.model_copy(update={"temperature": 0.0, "n": 1}) if greedy else exp.sampling
        generator = self.plan.reference if greedy else self._generator()
        deciders = [generator, *cands] if greedy else [generator]
        t = time.time()
        futures = {i.name: pool.actors[i.name].generate.remote(batch, sampling, exp.top_k) for i in deciders}
        outs = {name: ray.get(f) for name, f in futures.items()}
        self.timings["generate_s"] = self.timings.get("generate_s", 0.0) + time.time() - t
        special = set(pool.infos[self.plan.reference.name]["extra"].get("special_ids", []))
        extended, gens, errors = extend_samples(batch, outs[generator.name], special)
        for err in errors:
            self._error(generator.name, err)
        return extended, {"generator": generator.name, "gens": gens, "raw": outs, "cands": cands, "prompts": batch}

    def _write_generated(self, b: int, batch: list[Sample], ref_out: list, gens: dict, vocab_text: pa.Array) -> None:
        from .generation import GREEDY_SCHEMA, greedy_divergence, sampled_scores

        if self.plan.experiment.mode == "generate":
            name = gens["generator"]
            inst = next(i for i in self.plan.instances if i.name == name)
            sampled = [sampled_scores(s, g) for s, g in zip(batch, gens["gens"])]
            self._write_part(b, f"{name}.sampled", inst.cand_engine, "sampled", batch, ref_out, sampled, vocab_text, completion_only=True)
            return
        texts = vocab_text.to_pylist()
        ref_gens = {g.sample_id: g for g in gens["gens"]}
        extended = {s.sample_id: s for s in batch}
        prompt_ids = [s.sample_id for s in gens["prompts"]]
        for inst in gens["cands"]:
            rows = []
            for sid, out in zip(prompt_ids, gens["raw"][inst.name]):
                if isinstance(out, SampleError):
                    self._error(inst.name, out)
                elif sid in ref_gens:
                    rows.append(greedy_divergence(sid, extended[sid].prompt_len, ref_gens[sid], out[0], self.plan.reference.name, inst.cand_engine, inst.variant, texts))
            write_table(self.run_dir.greedy_part(inst.name, b), pa.Table.from_pylist(rows, schema=GREEDY_SCHEMA))

    def _write_part(
        self, b: int, name: str, cand_engine: str, variant: str, batch: list[Sample], ref_out: list, cand_out: list,
        vocab_text: pa.Array, completion_only: bool = False,
    ) -> None:
        exp = self.plan.experiment
        rows: list[TokenRows] = []
        for sample, r, c in zip(batch, ref_out, cand_out):
            if isinstance(r, SampleError) or isinstance(c, SampleError):
                for x, who in ((r, self.plan.reference.name), (c, name)):
                    if isinstance(x, SampleError):
                        self._error(who, x)
                continue
            misaligned = check_scores(sample, name, r, c)
            if misaligned is not None:
                self._error(name, misaligned)
                continue
            rows.append(_rows(sample, r, c, exp.tie_eps, completion_only))
        table = token_table(rows, self.plan.run_id, self.plan.reference.name, cand_engine, variant, vocab_text)
        write_table(self.run_dir.part(name, b), table)

    def _error(self, engine: str, err: SampleError) -> None:
        entry = {"sample_id": err.sample_id, "engine": engine, "error": err.message}
        if entry not in self.errors:
            self.errors.append(entry)
            self._say(f"[red]error[/red] engine {engine!r}: {err} (sample skipped)")

    # ---------------------------------------------------------------------- run.json

    def _start_meta(self, infos: dict, resumed: dict | None, n_samples: int) -> None:
        meta = resumed or {
            "run_id": self.plan.run_id,
            "schema_version": 1,
            "crossengine_version": __version__,
            "git_sha": git_sha(),
            "experiment_file": str(self.plan.experiment_path),
            "experiment": self.plan.experiment.model_dump(mode="json"),
            "fingerprint": self.plan.fingerprint,
            "reference": self.plan.reference.name,
            "candidates": {c.name: {"cand_engine": c.cand_engine, "variant": c.variant} for c in self.plan.candidates},
            "model_paths": {i.name: i.model_path for i in self.plan.instances},
            "host": host_info(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "n_samples": n_samples,
            "n_batches": len(self.plan.batches),
        }
        if resumed:
            meta.setdefault("resumed_at", []).append(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            self._say(f"resuming run {self.plan.run_id}: finished batches are skipped")
        meta.update(status="running", engines=infos)
        self.run_dir.write_meta(meta)

    def _finish_meta(self, infos: dict) -> None:
        meta = self.run_dir.read_meta() or {}
        meta.update(
            status="complete",
            engines=infos,
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            timings=self.timings,
            errors=meta.get("errors", []) + self.errors,
        )
        self.run_dir.write_meta(meta)


def _rows(sample: Sample, ref: TokenLogprobs, cand: TokenLogprobs, tie_eps: float, completion_only: bool = False) -> TokenRows:
    positions = np.arange(1, len(sample), dtype=np.int32)
    segment = np.zeros(len(positions), dtype=np.int8)
    if sample.prompt_len is not None:
        segment[positions >= sample.prompt_len] = 1
    keep = segment == 1 if completion_only else slice(None)
    metrics = token_metrics(ref, cand, sample.input_ids, tie_eps)
    return TokenRows(
        sample_id=sample.sample_id,
        positions=positions[keep],
        token_ids=sample.input_ids[1:][keep],
        modality=sample.modality[1:][keep],
        attention=ref.attention[1:][keep],
        attention_cand=cand.attention[1:][keep],
        segment=segment[keep],
        metrics={k: v[keep] for k, v in metrics.items()},
    )
