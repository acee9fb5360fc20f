"""QK-clip (optim.qk_clip, MuonClip's clip: Kimi K2, Team Kimi 2025, section 2.1) and the max-logit log.

Muon lets attention logits grow until training diverges; Kimi K2 bounds them by rescaling, after each update, the
query and key weights of every head whose largest logit S in this step's forwards exceeded the threshold tau, by
gamma = tau / S, so that on those inputs it would have been tau. The logit of head h is linear in its query and
in its key, so:

- with QK-norm (model.qk_norm, K-EXAONE), q and k are RMS-normalised before the logit and scaling their
  projections changes nothing: the norm gains carry the scale. They are shared by a layer's heads, so the layer's
  most-exceeding head sets gamma and both gains are multiplied by sqrt(gamma) (every head of the layer shrinks by
  it; a head below tau is never scaled up).
- without it, head h's query rows get gamma_h / sqrt(gamma_g) and its KV group g's key rows sqrt(gamma_g), with
  gamma_g the smallest gamma of the group: every head's logit scales by exactly its own gamma_h, and a group's
  most-exceeding head splits it evenly between query and key as Kimi's MHA does.

The clip acts on the weights the optimizer steps (fp32: the module's own tensors at ZeRO 0; at ZeRO 1/2 this
rank's fragment of DeepSpeed's flat fp32 partitions, found through the `_hp_mapping` DeepSpeed links to each
parameter), inside the optimizer's step after the update (GuardedAdamW.after_update), so DeepSpeed's copy of the
partitions to the model's (bf16) weights carries it and a checkpoint holds it. The logits come from the forwards'
attention (model/transformer.py `track_max_logit`), as a maximum over micro-batches and ranks taken before the
last micro-batch's step: one all-reduce of [layers, heads] per step. Without optim.qk_clip the same maximum is
measured at log steps only (`attn/max_logit`). ZeRO 3 holds no fp32 fragment of a parameter on most ranks, and
flash-attn returns no maximum, so both are refused with optim.qk_clip.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ondol.model.layers import RMSNorm


class QKClip:
    """The max-logit measurement and, with `threshold` > 0, the clip, for `model`'s attention layers (main blocks,
    then MTP blocks). `zero_optimizer`: DeepSpeed's ZeRO 1/2 optimizer holding the fp32 partitions, or None when
    the optimizer steps the module's own tensors."""

    def __init__(self, model: nn.Module, threshold: float, zero_optimizer=None) -> None:
        self.layers = model.attention_layers()
        self.threshold = threshold
        self.zero = zero_optimizer
        # this step's clip: (fp32 fragment, its offset in the parameter, factor per row block, block length, id of
        # the tensor the optimizer's group holds), set by `measure`, applied group by group by `after_update`
        self.scalings: list[tuple[torch.Tensor, int, torch.Tensor, int, int]] = []

    def track(self, on: bool) -> None:
        """Whether the next training forwards measure their largest logits."""
        for attn in self.layers:
            attn.track_max_logit = on

    @torch.no_grad()
    def measure(self, world_size: int) -> dict[str, torch.Tensor]:
        """The largest logits [layers, heads] since the last call, over micro-batches and (world_size > 1) all
        ranks; resets them, and with a threshold sets this step's factors. Returns the logged metrics (device
        tensors): attn/max_logit, and qk_clip/clipped_heads (heads over tau) with a threshold."""
        logits = torch.stack([attn.max_logit for attn in self.layers])
        if world_size > 1:
            dist.all_reduce(logits, op=dist.ReduceOp.MAX)
        for attn in self.layers:
            attn.max_logit.fill_(float("-inf"))
        metrics = {"attn/max_logit": logits.max()}
        if self.threshold > 0:
            over = torch.isfinite(logits) & (logits > self.threshold)
            factors = torch.where(over, self.threshold / logits, 1.0)
            metrics["qk_clip/clipped_heads"] = over.sum()
            self.scalings = [(fragment, start, per_row, row_len, id(owner))
                             for attn, gamma in zip(self.layers, factors)
                             for param, per_row, row_len in _scalings(attn, gamma)
                             for fragment, start, owner in self._fragments(param)]
        return metrics

    @torch.no_grad()
    def after_update(self, param_groups: list[dict], found_inf: torch.Tensor | None) -> None:
        """Scale the query and key weights that `param_groups` (the groups the optimizer just stepped) hold by this
        step's factors; a step skipped on the device (found_inf 1) scales nothing."""
        owners = {id(p) for group in param_groups for p in group["params"]}
        for fragment, start, per_row, row_len, owner in self.scalings:
            if owner in owners:
                if found_inf is not None:
                    per_row = torch.where(found_inf == 0, per_row, 1.0)
                scale_rows(fragment, start, per_row, row_len)

    def _fragments(self, param: torch.Tensor):
        """(flat fp32 tensor the optimizer steps, its offset in param's flattened elements, the tensor the
        optimizer's group holds) for this rank's share of `param`."""
        if self.zero is None:
            yield param.data.view(-1), 0, param
            return
        mapping = getattr(param, "_hp_mapping", None)  # None: no element of param in this rank's partition
        if mapping is not None:
            owner = self.zero.single_partition_of_fp32_groups[mapping.param_group_index]
            yield mapping.hp_fragment.data, mapping.lp_fragment_address.start, owner


def _scalings(attn: nn.Module, gamma: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(parameter, factor per row block, elements per block) for an attention layer with per-head factors gamma
    [H] (module docstring)."""
    if isinstance(attn.q_norm, RMSNorm):
        both = gamma.min().sqrt().view(1)
        return [(attn.q_norm.weight, both, attn.q_norm.weight.numel()),
                (attn.k_norm.weight, both, attn.k_norm.weight.numel())]
    head_rows = attn.head_dim * attn.q_proj.in_features
    groups = gamma.view(attn.k_proj.out_features // attn.head_dim, -1)  # [KV heads, query heads per KV head]
    key = groups.amin(dim=1).sqrt()
    query = (groups / key[:, None]).reshape(-1)
    return [(attn.q_proj.weight, query, head_rows), (attn.k_proj.weight, key, head_rows)]


def scale_rows(flat: torch.Tensor, start: int, per_row: torch.Tensor, row_len: int) -> None:
    """Multiply `flat`, elements start.. of a tensor cut in blocks of row_len elements, by its blocks' factors
    `per_row` (in place)."""
    if per_row.numel() == 1:
        flat.mul_(per_row.to(flat.dtype))
        return
    rows = torch.arange(start, start + flat.numel(), device=flat.device) // row_len
    flat.mul_(per_row.to(flat.dtype)[rows])
