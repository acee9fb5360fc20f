"""AdamW with decay / no-decay parameter groups and an update that is skipped when gradients are not finite.

Weight decay applies to the matrices that do matmuls (attention and MLP projections, stacked expert weights,
the LM head). It does not apply to norm gains, biases, attention sinks or the input embedding: shrinking a gain
or a bias toward 0 is not regularisation but a change of the function's scale (Megatron and OLMo leave 1-D
parameters undecayed), and OLMo 2 found that decaying the embedding table shrinks rare-token rows that are
seldom updated, hurting stability, so it turned embedding decay off. torchtitan decays everything; we follow
OLMo. A tied LM head shares the embedding tensor and so is not decayed either.
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matmul weights (decayed) and everything else (not decayed), in module order. A ZeRO-3
    parameter built under zero.Init holds an empty 1-D partition; its true shape is `ds_shape`."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW that records whether an update was applied, so the trainer can count skipped steps.

    With `owns_clipping` (fp32 without ZeRO, where DeepSpeed hands the module's gradients straight to this
    optimizer) it computes the global gradient norm itself (`clip_fn(params, max_norm)`, torch's by default;
    the expert-parallel one sums expert shards over their group), clips to `clip_norm` (0: no clipping) and skips the
    whole update when the norm is not finite. ZeRO 3 (and DeepSpeed's ZeRO 1/2 step in fp32) checks the norm itself
    and never calls `step` on a non-finite one, which leaves `applied` False just the same. At ZeRO 1/2 the engine's
    optimizer sets `found_inf` (a 0-d tensor, 1.0: not finite; train/zero_step.py) before each `step`: the fused
    kernel then skips the update on the device and `applied` is a 0-d bool tensor, read by the trainer once per
    step; the foreach kernel has no such input, so there the flag is read here.
    """

    def __init__(self, params, *, owns_clipping: bool, clip_norm: float, clip_fn=None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.owns_clipping, self.clip_norm = owns_clipping, clip_norm
        self.clip_fn = clip_fn or (lambda ps, max_norm: torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=True))
        self.applied = False
        self.found_inf: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if self.owns_clipping:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            max_norm = self.clip_norm if self.clip_norm > 0 else float("inf")
            norm = self.clip_fn(params, max_norm)
            self._global_grad_norm = norm  # read by the DeepSpeed engine (get_global_grad_norm)
            if not torch.isfinite(norm):
                return None
        if self.found_inf is not None and not self.defaults["fused"]:
            if self.found_inf:
                return None
            self.found_inf = None
        loss = super().step(closure)
        self.applied = True if self.found_inf is None else self.found_inf == 0
        return loss
