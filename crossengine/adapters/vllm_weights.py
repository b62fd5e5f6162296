"""Weights in and out of vLLM's live model, for `refit:` (docs/guides/weight-sync.md).

In: vLLM 0.32's own in-place reload, `Worker.reload_weights(weights_iterator=...)`, the layer-wise path that re-runs each
layer's `process_weights_after_loading`. The model's plain `load_weights` is what vLLM's older RLHF examples call, but on
the CPU backend it fails ("Attempted to load weight ... into parameter (torch.Size([0]))"): the CPU linear kernels repack
each weight at load and leave an empty parameter behind. Measured here, fp32 tiny-text: a reload of step 1 scores
bitwise like a fresh load of step 1.

Out: every parameter that still holds its values. On the CPU backend the repacked linear weights read back empty; the audit
says how many it could not read instead of comparing nothing in silence.

Tensors cross vLLM's IPC (engine process -> worker process) as (name, dtype, shape, bytes): its msgpack encoding hands
torch tensors back as plain lists when the caller gives no type. The worker side is mixed into vLLM's worker
(`worker_extension_cls`) and called by name through `LLM.collective_rpc`, like the routing hook.
"""

from __future__ import annotations

from crossengine.adapters.vllm_audit import AuditExtension
from crossengine.adapters.vllm_inside import CaptureExtension
from crossengine.adapters.vllm_routing import RoutingExtension


def encode(name: str, tensor) -> tuple[str, str, list[int], bytes]:
    """A torch tensor as plain values for vLLM's IPC."""
    import torch

    t = tensor.detach().cpu().contiguous()
    return name, str(t.dtype).removeprefix("torch."), list(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes()


def decode(item):
    """(name, tensor) from `encode`'s values."""
    import torch

    name, dtype, shape, data = item
    return name, torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape) if data else torch.empty(shape, dtype=getattr(torch, dtype))


class WorkerExtension(RoutingExtension, CaptureExtension, AuditExtension):
    """Everything crossengine calls inside vLLM's worker: the routing hook, module capture and full logits, the weight audit, these weight methods."""

    def crossengine_reload(self, weights: list) -> None:
        self.reload_weights(weights_iterator=(decode(w) for w in weights))

    def crossengine_parameters(self) -> list:
        return [encode(n, p) for n, p in self.model_runner.model.named_parameters()]


class VLLMWeights:
    """The vllm engine's refit methods (traits.refits)."""

    def load_weights(self, weights: list) -> None:
        self.llm.collective_rpc("crossengine_reload", args=([encode(n, t) for n, t in weights],))

    def parameters(self):
        for item in self.llm.collective_rpc("crossengine_parameters")[0]:
            yield decode(item)

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def probe_cached(self, samples: list) -> list[tuple[int, float] | None] | None:
        """The greedy next token after each whole sample, through the prefix cache as a rollout's generation reads it
        (a `prompt_logprobs` request never reads the cache: vLLM skips it for them)."""
        from vllm import SamplingParams

        if not self._run_conditions().get("enable_prefix_caching"):
            return None
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=0, detokenize=False)
        out = []
        for r in self._run(samples, params, extra_tokens=1):
            if not hasattr(r, "outputs"):
                out.append(None)
                continue
            c = r.outputs[0]
            token = int(c.token_ids[0])
            out.append((token, float(c.logprobs[0][token].logprob)))
        return out
