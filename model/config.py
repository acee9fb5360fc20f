"""Typed configuration of the hybrid-attention MoE decoder (K-EXAONE family)."""

from dataclasses import dataclass


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: taken from the tokenizer
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    attn_pattern: str = "LLLG"  # repeated over layers; L = sliding window, G = global; last layer forced G
    window: int = 128
    rope_theta: float = 10_000.0
    rope_on_global: bool = False  # K-EXAONE: global layers use no positional encoding (NoPE)
    qk_norm: bool = True
    attn_sinks: bool = False
    attn_backend: str = "auto"  # auto | sdpa | flex | flash
    document_masking: bool = True
    ffn_hidden: int = 768  # dense MLP hidden size (dense layers and dense models)
    n_experts: int = 8  # 0: dense model
    top_k: int = 2
    n_shared_experts: int = 1
    expert_hidden: int = 256
    first_k_dense: int = 1
    router_score: str = "sigmoid"  # sigmoid | softmax
    routed_scaling: float = 1.0
    norm_topk: bool = True
    bias_update_rate: float = 1e-3  # aux-loss-free balancing; 0 disables
    aux_loss_coef: float = 0.0  # sequence-level balance loss
    z_loss_coef: float = 0.0  # router z-loss
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    max_seq_len: int = 4096
