"""A run's phase plan (train.phases resolved): each phase's first step, steps, whole mixture, sequence length
and learning-rate segment, with every inherited value filled in; what a checkpoint records of it; and the check a
resume makes: the phases already begun must be what they were (the past), the ones still ahead may change.

No train.phases: one phase, the whole run on data.sources' weights at data.seq_len, lr_schedule run (optim.*),
which is exactly the run without phases.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    name: str
    start: int  # first step (0-based update number)
    steps: int
    weights: dict[str, float]  # the whole mixture (weights > 0 only)
    seq_len: int
    lr_schedule: str = "run"
    lr: float = 0.0
    warmup_steps: int = 0

    @property
    def end(self) -> int:
        return self.start + self.steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def lr_text(self) -> str:
        """'linear', 'cosine from 0.0004, warmup 4': the rate segment as logs and tables show it."""
        return (self.lr_schedule + (f" from {self.lr:g}" if self.lr else "")
                + (f", warmup {self.warmup_steps}" if self.warmup_steps else ""))


def resolve(cfg, base_weights: dict[str, float]) -> list[Phase]:
    """The plan of RunConfig `cfg`; `base_weights`: the mixture of the first phase unless it gives its own
    (data.sources' weights, or the prepared data's when the config lists no sources)."""
    tr = cfg.train
    if not tr.phases:
        return [Phase("run", 0, tr.steps, _positive(base_weights), cfg.data.seq_len)]
    plan, start, weights, seq_len = [], 0, base_weights, cfg.data.seq_len
    for i, p in enumerate(tr.phases):
        weights = dict(p.weights) if p.weights else weights
        seq_len = p.seq_len or seq_len
        plan.append(Phase(p.name or f"phase{i + 1}", start, p.steps, _positive(weights), seq_len, p.lr_schedule,
                          p.lr, p.warmup_steps))
        start += p.steps
    return plan


def final_seq_len(cfg) -> int:
    """The sequence length the run trains at last (its model's context: what evaluation scores with)."""
    return next((p.seq_len for p in reversed(cfg.train.phases) if p.seq_len), cfg.data.seq_len)


def _positive(weights: dict[str, float]) -> dict[str, float]:
    return {name: float(w) for name, w in weights.items() if w > 0}


def phase_index(plan: list[Phase], step: int) -> int:
    """The phase that update `step` belongs to (the last phase for steps past the plan)."""
    return max(i for i, p in enumerate(plan) if p.start <= step or i == 0)


def from_meta(saved: dict, plan: list[Phase]) -> list[Phase]:
    """The plan a checkpoint's meta.json recorded. Checkpoints from before phases: one phase of their weights
    (before weights were recorded: `plan`'s first, what they trained with) and seq_len over every step."""
    if "phases" in saved:
        return [Phase(**p) for p in saved["phases"]]
    weights = _positive(saved["weights"]) if "weights" in saved else plan[0].weights
    return [Phase("run", 0, 2**62, weights, saved.get("seq_len", plan[0].seq_len))]


def _change(key: str, old, new) -> str:
    return f"{key}: {old!r} -> {new!r}"


def past_changes(saved: list[Phase], plan: list[Phase], step: int, phases_declared: bool
                 ) -> tuple[list[str], list[str]]:
    """(changes of seq_len, every other change) that `plan` makes to the phases of the checkpoint's `saved`
    plan begun before `step`, each 'KEY: old -> new' as the config spells the key. A phase begun must keep its
    start, mixture, sequence length and rate; one that ended before `step` its steps too (the phase that ends
    at `step` may be lengthened or shortened: nothing after it ran)."""
    seq_len_changes, other = [], []
    for i, old in enumerate(p for p in saved if p.start < step):
        key = f"train.phases[{i}]" if phases_declared else "data"
        if i >= len(plan):
            other.append(f"train.phases[{i}] ({old.name}, steps {old.start}-{old.end}) already ran but is gone")
            continue
        new = plan[i]
        if new.start != old.start:
            other.append(_change(f"train.phases[{i}] first step", old.start, new.start))
        if old.end < step and new.steps != old.steps:
            other.append(_change(f"train.phases[{i}].steps", old.steps, new.steps))
        for name in sorted(set(old.weights) | set(new.weights)):
            if old.weights.get(name, 0) != new.weights.get(name, 0):
                where = f"train.phases[{i}].weights.{name}" if phases_declared else f"data.sources[{name}].weight"
                other.append(_change(where, old.weights.get(name, 0), new.weights.get(name, 0)))
        if new.seq_len != old.seq_len:
            seq_len_changes.append(_change(f"{key}.seq_len", old.seq_len, new.seq_len))
        for field in ("lr_schedule", "lr", "warmup_steps"):
            if getattr(new, field) != getattr(old, field):
                other.append(_change(f"train.phases[{i}].{field}", getattr(old, field), getattr(new, field)))
    return seq_len_changes, other


def future_change(saved: list[Phase], plan: list[Phase], step: int) -> str | None:
    """The phases still ahead at `step` as `plan` has them, when they differ from the checkpoint's plan (a
    deliberate change, allowed and recorded); None when they are the same."""
    def ahead(phases: list[Phase]) -> list[Phase]:
        return [dataclasses.replace(p, start=max(p.start, step), steps=p.end - max(p.start, step))
                for p in phases if p.end > step]

    if ahead(saved) == ahead(plan):
        return None
    return f"from step {step}: " + ("; ".join(describe(p) for p in ahead(plan)) or "nothing left")


def describe(p: Phase) -> str:
    """'NAME: steps A-B, seq_len T, lr SCHEDULE, mix a 60%, b 40%'."""
    total = sum(p.weights.values())
    mix = ", ".join(f"{n} {w / total:.1%}" for n, w in p.weights.items())
    return f"{p.name}: steps {p.start}-{p.end}, seq_len {p.seq_len}, lr {p.lr_text}, mix {mix}"
