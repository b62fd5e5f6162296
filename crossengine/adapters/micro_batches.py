"""Padded and packed micro-batches for torch engines: how trainers batch, as a run condition.

Why a mixin apart from TorchEngine: batching is a noise-floor condition (`batching: padded |
packed`, `padding_side`, `micro_batch_size`) that hf and native share, and the mask and position
ids it builds are exactly what trainers build; an engine supplies `_forward_rows` (how its model
takes a mask and position ids).
"""

from __future__ import annotations

from crossengine.adapters.base import Sample, SampleError


class MicroBatches:
    """Mixed into TorchEngine; uses its `spec`, `device`, `dtype`, `model`, `tokenizer`, `instance`, `forward_clock`."""

    def _unbatchable(self, s: Sample) -> SampleError | None:
        """Padded and packed micro-batches hold token ids only: a sample with other model inputs (pixels) is refused."""
        extra = [k for k in s.model_inputs if k not in self.dropped_inputs]
        if self.spec.batching != "single" and extra:
            return SampleError(
                s.sample_id,
                f"has model inputs besides token ids ({', '.join(sorted(extra))}); engine {self.instance!r} with batching: {self.spec.batching} takes text samples only (batching: single scores it)",
            )
        return None

    def forward_batch(self, samples: list[Sample]) -> list:
        """Raw float32 logits [T_i, V] of each sample, run as one padded or packed micro-batch."""
        with self.forward_clock():
            return self._forward_micro_batch(samples)

    def _forward_micro_batch(self, samples: list[Sample]) -> list:
        import torch

        lengths = [len(s) for s in samples]
        ids = [torch.as_tensor(s.input_ids, device=self.device) for s in samples]
        if self.spec.batching == "packed":
            n = sum(lengths)
            seg = torch.repeat_interleave(torch.arange(len(samples), device=self.device), torch.as_tensor(lengths, device=self.device))
            mask = (seg[:, None] == seg[None, :]) & torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
            position_ids = torch.cat([torch.arange(k, device=self.device) for k in lengths])[None]
            logits = self._forward_rows(torch.cat(ids)[None], self._mask_4d(mask[None, None]), position_ids)[0]
            rows = list(logits.split(lengths))
        else:
            width, left = max(lengths), self.spec.padding_side == "left"
            input_ids = torch.full((len(samples), width), self._pad_id, dtype=torch.long, device=self.device)
            attention = torch.zeros_like(input_ids)
            for r, (x, k) in enumerate(zip(ids, lengths)):
                span = slice(width - k, width) if left else slice(0, k)
                input_ids[r, span], attention[r, span] = x, 1
            position_ids = (attention.cumsum(-1) - 1).clamp(min=0)  # as trainers compute them: left padding keeps positions from 0
            logits = self._forward_rows(input_ids, attention, position_ids)
            rows = [logits[r, width - k :] if left else logits[r, :k] for r, k in enumerate(lengths)]
        return rows

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    def _mask_4d(self, allowed):
        """A packed row's block-diagonal mask as this model's attention takes it: boolean (SDPA), additive
        (eager), or none (flash-attention reads the restarting position ids)."""
        import torch

        impl = str(getattr(getattr(self.model, "config", None), "_attn_implementation", "") or "")
        if "flash" in impl:
            return None
        if impl == "eager":
            return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(~allowed, torch.finfo(self.dtype).min)
        return allowed

    def _forward_rows(self, input_ids, attention_mask, position_ids):
        """Logits [B, N, V] (float32) of a padded or packed micro-batch: how this engine's model takes a mask and position ids."""
        raise NotImplementedError(f"engine {self.name!r} does not run padded or packed micro-batches")
