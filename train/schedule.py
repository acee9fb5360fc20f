"""Learning-rate schedules as a pure function of the step (no scheduler state to checkpoint or drift).

`lr_at(step, optim, total_steps)` is the rate used by update number `step` (0-based):
  warmup   steps 0..W-1 ramp linearly to the peak: lr * (step + 1) / W
  cosine   then lr_min + (lr - lr_min) * (1 + cos(pi * t)) / 2, t going 0 -> 1 over the remaining steps
  wsd      then the peak until the last `decay_fraction` of all steps, which decay linearly to lr_min
  constant then the peak
with lr_min = lr * min_lr_ratio.
"""

from __future__ import annotations

import math

from ondol.train.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    peak, floor = optim.lr, optim.lr * optim.min_lr_ratio
    warmup = min(optim.warmup_steps, total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if optim.schedule == "constant":
        return peak
    if optim.schedule == "cosine":
        span = max(1, total_steps - warmup - 1)
        t = min(1.0, (step - warmup) / span)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    # wsd: the decay phase covers the last round(decay_fraction * total_steps) updates, ending at lr_min
    decay_steps = max(1, round(optim.decay_fraction * total_steps))
    decay_start = max(warmup, total_steps - decay_steps)
    if step < decay_start:
        return peak
    t = min(1.0, (step - decay_start + 1) / (total_steps - decay_start))
    return peak + (floor - peak) * t
