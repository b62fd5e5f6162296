"""The weight audit of the vllm engine: every parameter vLLM holds after loading against the checkpoint as vLLM's own
loader maps it, and its rotary cos/sin cache against what transformers computes.

Expected values come from the model's own `load_weights` (stacked q/k/v and gate/up, tied embeddings, dtype casts):
each parameter's storage is swapped for a NaN-filled one of its logical shape, the checkpoint is loaded through it, and
the original storage is put back. NaN left behind = never written by the loader. Actual values are the parameters as
they are; where vLLM's CPU kernels repacked a linear weight and left an empty parameter, the weight is read back
through the layer's own kernel (its output for the identity matrix, bias held at 0: exact, every output one product).
Runs inside vLLM's worker (`AuditExtension`, called by name through `collective_rpc`), rows in buffers.parquet's shape.
"""

from __future__ import annotations

import importlib
from pathlib import Path

ROTARY_POSITIONS = 4096  # positions of the cos/sin cache compared with transformers'


def _checkpoint(path: str):
    """(name, tensor) of every .safetensors file of a local folder or a hub id already in the local cache."""
    from safetensors import safe_open

    root = Path(path)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"], local_files_only=True))
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {root}")
    for f in files:
        with safe_open(str(f), "pt") as h:
            for key in h.keys():
                yield key, h.get_tensor(key)


def _read_back(module, param):
    """A linear layer's [out, in] weight as its kernel applies it, or None where the module is not such a layer."""
    import torch

    size_in, size_out = getattr(module, "input_size_per_partition", None), getattr(module, "output_size_per_partition", None)
    if module is None or size_in is None or size_out is None:
        return None
    bias = getattr(module, "bias", None)
    kept = bias.data.clone() if isinstance(bias, torch.nn.Parameter) and bias.numel() else None
    try:
        if kept is not None:
            bias.data.zero_()
        out = module(torch.eye(size_in, dtype=getattr(module, "params_dtype", torch.float32), device=param.device))
    finally:
        if kept is not None:
            bias.data.copy_(kept)
    out = out[0] if isinstance(out, tuple) else out
    return out.detach().T.contiguous() if tuple(out.shape) == (size_in, size_out) else None


def _stand_in(module, blank):
    """A weight parameter as the linear layer created it (its loader and dims), over `blank`: the CPU backend replaced
    the original with an empty one that has neither."""
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED
    from vllm.model_executor.parameter import ModelWeightParameter

    v2 = type(getattr(module, "quant_method", None)).__name__ in WEIGHT_LOADER_V2_SUPPORTED and hasattr(module, "weight_loader_v2")
    return ModelWeightParameter(data=blank, input_dim=1, output_dim=0, weight_loader=module.weight_loader_v2 if v2 else module.weight_loader)


def _row(name: str, shape, diff, issues: list[str], against: str, kind: str = "parameter") -> dict:
    return {
        "buffer": name,
        "kind": kind,
        "module": name.rpartition(".")[0],
        "persistent": kind == "parameter",
        "shape": [int(x) for x in shape],
        "max_abs_diff_vs_fresh": diff,
        "issues": issues,
        "ok": not issues,
        "against": against,
    }


class AuditExtension:
    """Added to vLLM's worker (`self.model_runner`)."""

    def crossengine_audit(self, checkpoint: str) -> list[dict]:
        import torch

        with torch.inference_mode(False), torch.no_grad():
            return self._ce_parameters(checkpoint) + self._ce_rotary()

    def _ce_parameters(self, checkpoint: str) -> list[dict]:
        import torch

        model = self.model_runner.get_model()
        params, modules = dict(model.named_parameters()), dict(model.named_modules())
        actual = {n: p.detach().clone() if p.numel() else _read_back(modules.get(n.rpartition(".")[0]), p) for n, p in params.items()}
        against = f"{checkpoint} through vLLM's loader"
        saved, standing = {}, {}
        try:
            for n, p in params.items():
                if actual[n] is None:
                    continue
                blank = torch.full(actual[n].shape, float("nan"), dtype=actual[n].dtype, device=actual[n].device)
                if p.numel():
                    saved[n], p.data = p.data, blank
                else:  # a repacked weight: the layer's own loader writes into a stand-in of its logical shape
                    module, leaf = modules[n.rpartition(".")[0]], n.rpartition(".")[2]
                    standing[n] = (module, leaf, p)
                    module._parameters[leaf] = _stand_in(module, blank)
            model.load_weights(_checkpoint(checkpoint))
            expected = {n: params[n].data for n in saved} | {n: m._parameters[leaf].data for n, (m, leaf, _) in standing.items()}
        except Exception as exc:  # noqa: BLE001 - one finding naming the checkpoint, not a failed run
            return [_row("(all parameters)", [], None, [f"the checkpoint could not be loaded through vLLM's loader: {type(exc).__name__}: {exc}"], against)]
        finally:
            for n, data in saved.items():
                params[n].data = data
            for module, leaf, p in standing.values():
                module._parameters[leaf] = p
        rows = []
        for n, p in params.items():
            if actual[n] is None:
                rows.append(_row(n, p.shape, None, ["its values cannot be read back on this backend (repacked by its kernels): not compared"], against))
                continue
            want, got = expected[n].float(), actual[n].float()
            issues, unset = [], int(torch.isnan(want).sum())
            if unset:
                issues.append(f"never written by vLLM's loader: {unset} of {want.numel()} values")
            both = ~torch.isnan(want)
            diff = float((got[both] - want[both]).abs().max()) if both.any() else None
            if diff is not None and diff > 0:
                issues.append(f"differs from the checkpoint (max |Δ| {diff:.3g})")
            rows.append(_row(n, got.shape, diff, issues, against))
        return rows

    def _ce_rotary(self) -> list[dict]:
        """vLLM's cos/sin cache (cat(cos, sin) of the half-rotation) against transformers' rotary embedding of this config."""
        import torch

        model = self.model_runner.get_model()
        name, cache = next(((n, b) for n, b in model.named_buffers() if n.endswith("cos_sin_cache")), (None, None))
        if cache is None:
            return []
        config = self.model_runner.model_config.hf_text_config
        against = "transformers' rotary embedding"
        try:
            module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
            cls = next(getattr(module, a) for a in dir(module) if a.endswith("RotaryEmbedding") and isinstance(getattr(module, a), type))
            n = min(ROTARY_POSITIONS, cache.shape[0])
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            with torch.device("cpu"):
                cos, sin = cls(config=config)(torch.zeros(1, n, head_dim), torch.arange(n)[None])
        except Exception as exc:  # noqa: BLE001 - a model transformers does not know: said, not compared
            return [_row(name, cache.shape, None, [], f"not compared: no transformers rotary embedding for it ({type(exc).__name__})", kind="buffer")]
        half = cache.shape[1] // 2
        ours, cast = cache[:n].float().cpu(), lambda t: t[0, :, :half].to(cache.dtype).float()  # noqa: E731 - both at the cache's precision
        diff = max(float((ours[:, :half] - cast(cos)).abs().max()), float((ours[:, half:] - cast(sin)).abs().max()))
        issues = [f"differs from {against} (max |Δ| {diff:.3g} over {n} positions)"] if diff > 1e-5 else []
        return [_row(name, cache.shape, diff, issues, against, kind="buffer")]


class VLLMAudit:
    """The vllm engine's `audit` (traits.audits_buffers)."""

    def audit(self, against: str | None = None) -> list[dict]:
        """Its parameters against `against` (the reference's checkpoint: the weights the comparison assumes), else its own."""
        return self.llm.collective_rpc("crossengine_audit", args=(against or self.model_path,))[0]
