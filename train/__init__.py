"""DeepSpeed trainer: `Trainer(cfg).fit()`; `python -m train CONFIG [overrides]` runs one rank."""

__all__ = ["NonFiniteError", "Trainer"]


def __getattr__(name: str):
    """Trainer is imported on first use, so reading configs (configs imports train.config) stays light."""
    if name in __all__:
        from train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'train' has no attribute '{name}'")
