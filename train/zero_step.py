"""DeepSpeed's ZeRO 1/2 optimizer step with its gradient norm, clipping and non-finite check on the device.

DeepSpeedZeroOptimizer (DeepSpeed 0.19.8, runtime/zero/stage_1_and_2.py) launches a norm with an fp32 cast and,
with `check_grad_overflow`, an inf/nan test per gradient tensor (`get_grad_norm_direct`,
`has_overflow_partitioned_grads_serial`: ~15 kernels a tensor), and waits for the GPU four times a step on one
rank: the overflow flag (`has_overflow`, `.item()`), the norm's validity (`step`, `is_invalid_grad_norm`) and
again per parameter group before clipping (`unscale_and_clip_grads`). No DeepSpeed setting turns these into device work: its
`compute_grad_norm=false` drops clipping too, and `check_grad_overflow=false` drops the skip of a non-finite
step. So two methods of the engine's optimizer instance are replaced here, keeping DeepSpeed's partitioning,
reductions and arithmetic:

- `get_grad_norm_direct`: one `torch._foreach_norm` in fp32 over a group's gradient partitions instead of a
  norm per tensor; the same all-reduces over the data-parallel group and the same -1 mark for a non-finite norm.
- `unscale_and_clip_grads`: DeepSpeed's clip factor, computed and applied without reading the norm on the host,
  and the step's non-finite flag handed to GuardedAdamW, whose fused AdamW kernel skips the update on the device
  (torch AdamW's `found_inf`, as under torch.amp.GradScaler).

With bf16 the overflow check is then left off (`check_grad_overflow: false`): the flag above replaces it. The
step's one host sync is the trainer reading whether the update was applied.
"""

from __future__ import annotations

from functools import partial
from types import MethodType

import torch
import torch.distributed as dist


def move_zero_checks_to_device(zero_optimizer, guarded) -> None:
    """Replace the per-tensor norm and the host-side checks of `zero_optimizer` (a DeepSpeedZeroOptimizer
    wrapping `guarded`, a GuardedAdamW)."""
    zero_optimizer.get_grad_norm_direct = MethodType(_grad_norm_direct, zero_optimizer)
    zero_optimizer.unscale_and_clip_grads = MethodType(partial(_clip_on_device, guarded=guarded), zero_optimizer)


def _grad_norm_direct(self, gradients, params, norm_type=2):
    """L2 norm of one group's gradient partitions, summed over the data-parallel ranks; -1 if not finite."""
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace

    assert norm_type == 2, "only the L2 norm is computed on the device"
    grads = [g for g, p in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params)
             if is_model_parallel_parameter(p) or self.model_parallel_rank == 0]
    if grads:
        total = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()
    else:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.sqrt()
    mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


def _clip_on_device(self, grad_groups_flat, total_norm, *, guarded):
    """DeepSpeed's unscale-and-clip (the same factor: max(1, (norm / scale + 1e-6) / clip) x scale), with the
    non-finite flag for the optimizer instead of a host-side test of the norm."""
    invalid = ~torch.isfinite(total_norm) | (total_norm < 0)
    guarded.found_inf = invalid.float()
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        clip_norm = torch.where(invalid, 0.0, total_norm)  # a skipped step's gradients are never applied
        combined_scale = torch.clamp((clip_norm / self.loss_scale + 1e-6) / self.clip_grad, min=1.0) * self.loss_scale
    torch._foreach_mul_(grad_groups_flat, 1.0 / combined_scale)
