"""Typed configuration of the hybrid-attention MoE decoder (K-EXAONE family)."""

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

ATTN_BACKENDS = ("auto", "sdpa", "flex", "flash")
ROUTER_SCORES = ("sigmoid", "softmax")
NORM_PLACEMENTS = ("pre", "post")


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: taken from the tokenizer
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    attn_pattern: str = "LLLG"  # repeated over layers; L = sliding window, G = global; last layer forced G
    window: int = 128  # keys a local query sees, itself included (transformers' sliding_window convention)
    rope_theta: float = 10_000.0
    rope_on_global: bool = False  # K-EXAONE: global layers use no positional encoding (NoPE)
    # RoPE frequencies for a context past the one trained: none | yarn (transformers' rope_parameters with
    # rope_type yarn, factor and original_max_position_embeddings; its defaults beta_fast 32, beta_slow 1)
    rope_scaling: str = "none"
    rope_factor: float = 1.0  # yarn: how many times the original context
    rope_original_max_seq_len: int = 0  # yarn: the context the RoPE layers were trained at
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
    norm_placement: str = "pre"  # pre: K-EXAONE (ExaoneMoe); post: EXAONE 4.0 (norm on attention/MLP outputs)
    doc_positions: bool = False  # RoPE positions restart at 0 at each packed document (needs doc_ids)
    moe_dispatch: str = "auto"  # auto | grouped_mm | loop | bmm_padded: how experts run their sorted tokens
    mtp_layers: int = 0  # multi-token-prediction depths (DeepSeek-V3 style); 0: off
    mtp_loss_weight: float = 0.3  # weight of the mean MTP loss over depths (DeepSeek-V3: 0.3, later 0.1)

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.vocab_size >= 0, "model.vocab_size must be >= 0 (0 takes the tokenizer's)")
        for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "window", "max_seq_len"):
            need(getattr(self, key) > 0, f"model.{key} must be positive")
        need(self.n_heads % self.n_kv_heads == 0, "model.n_heads must be divisible by model.n_kv_heads")
        need(self.head_dim % 2 == 0, "model.head_dim must be even (RoPE rotates pairs)")
        need(bool(self.attn_pattern) and set(self.attn_pattern) <= {"L", "G"},
             f"model.attn_pattern must be a string of L and G, got '{self.attn_pattern}'")
        need(self.attn_backend in ATTN_BACKENDS, f"model.attn_backend must be one of {ATTN_BACKENDS}")
        need(self.rope_scaling in ("none", "yarn"), f"model.rope_scaling must be none or yarn, not "
             f"'{self.rope_scaling}'")
        if self.rope_scaling == "yarn":
            need(self.rope_factor > 1, f"model.rope_factor must be > 1 with model.rope_scaling=yarn, not "
                 f"{self.rope_factor}")
            need(self.rope_original_max_seq_len > 0, "model.rope_original_max_seq_len must be set (> 0) with "
                 "model.rope_scaling=yarn: the context the model was trained at")
        need(not (self.attn_sinks and self.attn_backend == "flash"),
             "model.attn_sinks=true does not train correctly with model.attn_backend=flash (flash-attn returns "
             "the log-sum-exp without its gradient, so the q/k gradients would be wrong): use attn_backend auto")
        need(self.router_score in ROUTER_SCORES, f"model.router_score must be one of {ROUTER_SCORES}")
        need(self.norm_placement in NORM_PLACEMENTS, f"model.norm_placement must be one of {NORM_PLACEMENTS}")
        need(self.moe_dispatch in ("auto", "grouped_mm", "loop", "bmm_padded"),
             "model.moe_dispatch must be one of auto, grouped_mm, loop, bmm_padded")
        need(self.n_experts >= 0, "model.n_experts must be >= 0 (0: dense model)")
        need(self.ffn_hidden > 0, "model.ffn_hidden must be positive")
        if self.n_experts:
            need(0 < self.top_k <= self.n_experts, "model.top_k must be in 1..model.n_experts")
            need(self.expert_hidden > 0, "model.expert_hidden must be positive")
            need(self.n_shared_experts >= 0, "model.n_shared_experts must be >= 0")
            need(0 <= self.first_k_dense <= self.n_layers, "model.first_k_dense must be in 0..model.n_layers")
        for key in ("bias_update_rate", "aux_loss_coef", "z_loss_coef", "mtp_layers", "mtp_loss_weight"):
            need(getattr(self, key) >= 0, f"model.{key} must be >= 0")

    @property
    def layer_kinds(self) -> list[str]:
        """'L' (sliding window) or 'G' (global) for each layer: the pattern repeated, the last layer global."""
        kinds = [self.attn_pattern[i % len(self.attn_pattern)] for i in range(self.n_layers)]
        kinds[-1] = "G"
        return kinds

    @property
    def mtp_kinds(self) -> list[str]:
        """Attention kind of each MTP depth's block: the layer pattern continued past the last layer."""
        return [self.attn_pattern[(self.n_layers + i) % len(self.attn_pattern)] for i in range(self.mtp_layers)]

    def is_moe_layer(self, i: int) -> bool:
        return self.n_experts > 0 and i >= self.first_k_dense

    def uses_rope(self, kind: str) -> bool:
        return kind == "L" or self.rope_on_global

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


def load_preset(name_or_path: str, **overrides: Any) -> ModelConfig:
    """A model preset (`tiny`, `moe-1b`, `k-exaone-236b` or a YAML path) as a ModelConfig, with overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown model keys {unknown}")
    return ModelConfig(**{**raw, **overrides})
