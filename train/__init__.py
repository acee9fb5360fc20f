"""DeepSpeed trainer: `Trainer(cfg).fit()`; `python -m train CONFIG [overrides]` runs one rank."""

from train.trainer import NonFiniteError, Trainer

__all__ = ["NonFiniteError", "Trainer"]
