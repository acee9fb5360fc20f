"""Count the host synchronisations a piece of training code makes, on CPU as on CUDA, and the aten ops it runs.

On CUDA every sync stalls the GPU's queue; on CPU nothing stalls, so there the calls that would sync on a GPU
are counted instead: reading a tensor's value on the host (`item`, `tolist`, `bool`, `int`, `float`) and the
ops whose output size depends on the data (`bincount`, `nonzero`, `unique`, `repeat_interleave` without
`output_size`, `masked_select`). Each call is recorded with the file and line of the caller. Not counted:
torch.optim's `_get_value`, which reads the optimizers' step counters; those live on the host on CUDA too
(unless capturable or fused, which never read them), so reading them does not wait for the GPU.
"""

from __future__ import annotations

import collections
import sys
import warnings
from typing import Self

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_TENSOR_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "unique", "repeat_interleave",
                   "masked_select")
_TORCH_FUNCTIONS = ("bincount", "nonzero", "unique", "repeat_interleave", "masked_select")


class HostSyncCounter:
    """`with HostSyncCounter(device) as syncs: ...`; then `syncs.count` and `syncs.sites` (caller -> calls)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sites: collections.Counter[str] = collections.Counter()
        self._undo: list = []

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            return self
        for owner, names in ((torch.Tensor, _TENSOR_METHODS), (torch, _TORCH_FUNCTIONS)):
            for name in names:
                original = getattr(owner, name)
                self._undo.append((owner, name, original))
                setattr(owner, name, self._counting(name, original))
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            self._warnings.__exit__(*exc)
            for w in self._caught:
                if "synchroniz" in str(w.message):
                    self.sites[f"{w.filename}:{w.lineno}"] += 1
            return
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)

    def _counting(self, name: str, original):
        def counted(*args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_name != "_get_value" and (name != "repeat_interleave"
                                                          or kwargs.get("output_size") is None):
                self.sites[f"{caller.f_code.co_filename}:{caller.f_lineno} {name}"] += 1
            return original(*args, **kwargs)
        return counted


class AtenOpCounter(TorchDispatchMode):
    """`with AtenOpCounter() as ops: ...`; then `ops.kernels` (caller-visible aten ops that compute: one kernel
    launch or more each on a GPU) and `ops.views` (views and detaches: metadata only, no launch), each an
    op name -> calls Counter. The host cost of an optimizer step grows with the kernels it launches."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: collections.Counter[str] = collections.Counter()
        self.views: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        (self.views if func.is_view else self.kernels)[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_training_step(trainer) -> tuple[HostSyncCounter, AtenOpCounter]:
    """A Trainer's next training step, counted: its host syncs and the aten ops of its optimizer step. A first
    step runs uncounted before it (it creates the optimizer's state)."""
    trainer.train_step()
    step, ops = trainer.engine.step, AtenOpCounter()

    def counted_step():
        with ops:
            step()

    trainer.engine.step = counted_step
    try:
        with HostSyncCounter(trainer.env.device) as syncs:
            trainer.train_step()
    finally:
        trainer.engine.step = step
    return syncs, ops
