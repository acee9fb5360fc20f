"""Hybrid local/global attention MoE decoder (K-EXAONE family), exportable to transformers.

`Transformer(cfg)` / `ModelOutput`; `model.io` (save/load), `model.flops` (counts), `model.generate`.
"""

from model import flops, generate, io
from model.config import ModelConfig
from model.transformer import ModelOutput, Transformer

__all__ = ["ModelConfig", "ModelOutput", "Transformer", "flops", "generate", "io"]
