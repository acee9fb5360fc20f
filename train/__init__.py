"""DeepSpeed trainer: `Trainer(cfg).fit()`; `python -m train CONFIG [overrides]` runs one rank."""

__all__ = ["NonFiniteError", "Trainer"]


def __getattr__(name: str):
    """The trainer is imported on first use: `configs` imports train.config, which must not import torch or
    deepspeed (nor `configs` back, which would be circular)."""
    if name in __all__:
        from train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'train' has no attribute '{name}'")
