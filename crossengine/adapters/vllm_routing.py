"""Routing capture inside vLLM's own worker process, for the vllm engine's `routing: true`.

vLLM 0.32's official routed-experts output (`enable_return_routed_experts`) needs Model Runner V2
and Triton, i.e. GPU builds; on the CPU it refuses to start. So this reads the routing the way
the model's router computes it: a forward hook on each MoE layer's gate (found by what it is: a
leaf linear layer with num_experts outputs, whose output is [tokens, num_experts] router logits), then the top-k of the softmax, as Qwen-MoE and Mixtral route.

vLLM runs the model in a worker process of its own; this class is mixed into that worker
(`worker_extension_cls`, set by the adapter), and the adapter calls its methods by name through
`LLM.collective_rpc`: no function is pickled across vLLM's IPC. The gate's rows are the tokens
vLLM computed in each step; the adapter scores one prompt per call with routing on, so the rows
are that prompt's tokens in order (prompt_logprobs requests compute every prompt token).
"""

from __future__ import annotations

from crossengine.adapters.routing import router_margin


class RoutingExtension:
    """Methods added to vLLM's worker; `self.model_runner.model` is the loaded model."""

    def crossengine_routing_install(self, num_experts: int, top_k: int) -> list[str]:
        """Hook every gate; returns their names in forward order (empty: the model has no router this can read)."""
        self._crossengine_rows: dict[int, list] = {}
        self._crossengine_top_k = top_k
        names = []
        for name, mod in self.model_runner.model.named_modules():
            size = getattr(mod, "output_size", getattr(mod, "out_features", None))  # vLLM's linear layers say it (the CPU backend may repack the weight)
            if next(mod.children(), None) is not None or size != num_experts:
                continue
            layer = len(names)

            def hook(module, args, out, layer=layer):
                logits = out[0] if isinstance(out, tuple) else out
                self._crossengine_rows.setdefault(layer, []).append(logits.detach().float().cpu())

            mod.register_forward_hook(hook)
            names.append(name)
        return names

    def crossengine_routing_take(self) -> list[tuple[list, list]]:
        """Per layer, (expert ids [N][k], margin [N]) of every token since the last take, as plain lists: vLLM's IPC
        hands numpy arrays back as raw (dtype, shape, data) triples when the caller gives no type."""
        import torch

        out = []
        k = self._crossengine_top_k
        for layer in sorted(self._crossengine_rows):
            logits = torch.cat(self._crossengine_rows[layer])
            ids = torch.topk(torch.softmax(logits, -1), k, dim=-1).indices  # as the router picks: top-k of the softmax
            out.append((ids.tolist(), router_margin(logits, k).tolist()))
        self._crossengine_rows = {}
        return out
