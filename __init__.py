"""Ondol: Korean-first foundation-model training.

One package per stage, data flowing tokenizer -> data -> model -> train, with `launch` starting jobs:
`ondol.tokenizer`, `ondol.data`, `ondol.model`, `ondol.train`, `ondol.launch`, and `ondol.configs`, which
composes each stage's typed config into the run config.
"""
