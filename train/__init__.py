"""DeepSpeed trainer: `trainer.Trainer(cfg).fit()`; `python -m ondol.train CONFIG [overrides]` runs one rank."""
