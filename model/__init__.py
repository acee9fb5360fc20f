"""Hybrid local/global attention MoE decoder (K-EXAONE family), exportable to transformers.

`transformer.Transformer` is the model (plain PyTorch), `config.ModelConfig` its typed config; `io` saves and
loads weights, `flops` counts parameters and FLOPs, `generate` decodes, `export` writes a transformers folder.
"""
