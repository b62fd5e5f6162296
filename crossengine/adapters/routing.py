"""Mixture-of-experts routing of a torch model: which experts each layer's router chose, and replaying another engine's choice.

Routers are found by what they return, not by a family's module names: a module whose forward
returns `(router_logits [N, E] float, weights [N, k] float, expert_ids [N, k] int)`, as
transformers 5 routers do (Qwen2/3-MoE, Mixtral, OLMoE, ...). Capture hooks each of them in
forward order, per forward of one sample (N = its tokens):

    routing  int16   [T, L, k]  the k expert ids each layer chose for each input position
    margin   float32 [T, L]     router logit of the k-th choice minus the (k+1)-th: near-ties flip first

Replay (the trainer side of Rollout Routing Replay) makes each router return the given expert
ids instead of its own top-k, with weights recomputed as the router computes them from its own
logits: softmax probabilities at the given ids, normalised to sum 1 where the router's own
weights do. Replaying an engine's own routing therefore gives bitwise its own scores (tested).
A router whose weights are neither (sigmoid or grouped routing, DeepSeek-V3) is refused, not guessed.
Found here in tiny Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, GPT-OSS and GraniteMoE models.

Imported by the torch engines in their worker.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np


def _is_router_output(out) -> bool:
    import torch

    return (
        isinstance(out, tuple)
        and len(out) == 3
        and all(torch.is_tensor(x) for x in out)
        and out[0].dim() == 2
        and out[2].dim() == 2
        and not out[2].is_floating_point()
        and out[1].shape == out[2].shape
        and out[0].shape[0] == out[2].shape[0]
    )


def router_margin(logits, k: int):
    """Per row of router logits [N, E]: the k-th largest minus the (k+1)-th (inf where E == k): how near the router was to another choice."""
    import torch

    top = torch.topk(logits.float(), min(k + 1, logits.shape[1]), dim=-1).values
    return top[:, k - 1] - top[:, k] if top.shape[1] > k else torch.full_like(top[:, 0], float("inf"))


def find_routers(model, probe) -> list:
    """The router modules of `model` in forward order, found by running `probe()` (one forward) with a hook on every module."""
    found, handles = [], []
    if not hasattr(model, "modules"):  # a native factory's plain function: nothing to hook
        return found
    for module in model.modules():

        def hook(mod, args, out):
            if _is_router_output(out) and mod not in found:
                found.append(mod)

        handles.append(module.register_forward_hook(hook))
    try:
        probe()
    finally:
        for h in handles:
            h.remove()
    return found


@contextmanager
def captured(routers: list, replay: np.ndarray | None = None):
    """Within the block, each forward of the routers records (ids, margin); with `replay` ([T, L, k]) they route as it says.
    Yields a list that holds, after the block, (routing [T, L, k] int16, margin [T, L] float32) or None without a forward."""
    import torch

    rows: dict[int, tuple] = {}
    result: list = [None]

    def make_hook(layer: int):
        def hook(mod, args, out):
            logits, weights, ids = out
            margin = router_margin(logits, ids.shape[1])
            if replay is not None:
                chosen = torch.as_tensor(replay[:, layer], device=ids.device, dtype=ids.dtype)
                chosen = torch.where(chosen < 0, ids, chosen)  # -1: not recorded (a dump's last token): the router's own choice
                probs = torch.softmax(logits.float(), dim=-1)
                mine = probs.gather(-1, ids)  # the router's own choice, to see how it turns probabilities into weights
                err_normalised = (weights.float() - mine / mine.sum(-1, keepdim=True)).abs().max()
                err_plain = (weights.float() - mine).abs().max()
                if min(err_normalised, err_plain) > 1e-2:  # sigmoid or grouped routers (DeepSeek-V3): not softmax weights
                    raise ValueError("this router's weights are not the softmax of its logits (renormalised or not): replay cannot recompute them as it does")
                normalises = err_normalised <= err_plain
                new = probs.gather(-1, chosen)
                if normalises:  # the router renormalises its top-k weights to sum 1 (Mixtral; Qwen-MoE with norm_topk_prob)
                    new = new / new.sum(dim=-1, keepdim=True)
                out = (logits, new.to(weights.dtype), chosen)
                ids = chosen
            rows[layer] = (ids.detach().cpu().numpy().astype(np.int16), margin.detach().cpu().numpy().astype(np.float32))
            return out

        return hook

    handles = [r.register_forward_hook(make_hook(i)) for i, r in enumerate(routers)]
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
    if rows:
        layers = [rows[i] for i in sorted(rows)]
        result[0] = (np.stack([ids for ids, _ in layers], axis=1), np.stack([m for _, m in layers], axis=1))
