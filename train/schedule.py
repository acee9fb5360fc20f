"""Learning-rate schedules as a pure function of the step (no scheduler state to checkpoint or drift).

`lr_at(step, optim, total_steps)` is the rate used by update number `step` (0-based):
  warmup   steps 0..W-1 ramp linearly to the peak: lr * (step + 1) / W
  cosine   then lr_min + (lr - lr_min) * (1 + cos(pi * t)) / 2, t going 0 -> 1 over the remaining steps
  wsd      then the peak until the last `decay_fraction` of all steps, which decay linearly to lr_min
  constant then the peak
with lr_min = lr * min_lr_ratio.

`phase_lr_at(step, plan, optim, total_steps)` is the rate of a run in phases (train/phases.py): each phase
either follows `lr_at` (lr_schedule run) or is its own segment: warmup over its first steps, then constant,
linear (as wsd's decay) or cosine from its starting rate down to lr_min at its last step.
"""

from __future__ import annotations

import math

from ondol.train.config import OptimConfig


def segment_lr(k: int, n: int, warmup: int, start: float, floor: float, shape: str) -> float:
    """The rate of step k of an n-step segment: a linear warmup to `start` over its first `warmup` steps, then
    constant at `start`, or a cosine or linear decay from `start` reaching `floor` at step n - 1."""
    if k < warmup:
        return start * (k + 1) / warmup
    if shape == "constant":
        return start
    if shape == "cosine":
        span = max(1, n - warmup - 1)
        t = min(1.0, (k - warmup) / span)
        return floor + (start - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    t = min(1.0, (k - warmup + 1) / (n - warmup))  # linear: the first decayed step is already below start
    return start + (floor - start) * t


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    peak, floor = optim.lr, optim.lr * optim.min_lr_ratio
    warmup = min(optim.warmup_steps, total_steps)
    if optim.schedule != "wsd" or step < warmup:
        return segment_lr(step, total_steps, warmup, peak, floor, optim.schedule)
    # wsd: the decay phase covers the last round(decay_fraction * total_steps) updates, ending at lr_min
    decay_steps = max(1, round(optim.decay_fraction * total_steps))
    decay_start = max(warmup, total_steps - decay_steps)
    if step < decay_start:
        return peak
    return segment_lr(step - decay_start, total_steps - decay_start, 0, peak, floor, "linear")


def phase_lr_at(step: int, plan: list, optim: OptimConfig, total_steps: int) -> float:
    """The rate of update `step` in a run of phases (train.phases.Phase: start, steps, lr_schedule, lr,
    warmup_steps). A phase with lr 0 starts from the rate its predecessor used at its last step; the first
    phase's warmup covers optim.warmup_steps too."""
    index = max(i for i, p in enumerate(plan) if p.start <= step or i == 0)
    phase = plan[index]
    if phase.lr_schedule == "run":
        return lr_at(step, optim, total_steps)
    if phase.lr:
        start = phase.lr
    elif index == 0:
        start = optim.lr
    else:
        start = phase_lr_at(phase.start - 1, plan[:index], optim, total_steps)
    warmup = phase.warmup_steps if index else max(phase.warmup_steps, min(optim.warmup_steps, phase.steps - 1))
    return segment_lr(step - phase.start, phase.steps, warmup, start, optim.lr * optim.min_lr_ratio,
                      phase.lr_schedule)
