"""Parameter counts and training FLOPs per token, from the config alone (no model is built).

total:  every parameter (tied embeddings counted once), MTP depths included ("mtp" says how many are theirs).
active: parameters that take part in computing one token: all but the unchosen routed experts and the input
        embedding table (a row lookup, no arithmetic; when tied, the table is the LM head and counts).
Training FLOPs per token = 6 x active matmul parameters + attention score/value FLOPs, where attention counts
only the causal (and, on local layers, windowed) key range actually computed: 12 x heads x head_dim x the mean
number of keys a query sees over the sequence. Each MTP depth runs the shared LM head once more.
"""

from __future__ import annotations

from ondol.model.config import ModelConfig


def _attention_params(cfg: ModelConfig) -> int:
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    params = cfg.d_model * (2 * q_out + 2 * kv_out)
    if cfg.qk_norm:
        params += 2 * cfg.head_dim
    if cfg.attn_sinks:
        params += cfg.n_heads
    return params


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    d, E = cfg.d_model, cfg.n_experts
    expert = 3 * d * cfg.expert_hidden
    dense_mlp = 3 * d * cfg.ffn_hidden
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    n_dense = cfg.n_layers - n_moe
    per_layer = _attention_params(cfg) + 2 * d  # attention + two block norms
    moe_always = d * E + cfg.n_shared_experts * expert  # router + shared experts
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    mtp = cfg.mtp_layers * (per_layer + dense_mlp + 2 * d * d + 3 * d)  # block, eh_proj, enorm/hnorm/norm
    total = (cfg.n_layers * per_layer + n_dense * dense_mlp + n_moe * (moe_always + E * expert)
             + embed + head + d + mtp)
    inactive = n_moe * (E - cfg.top_k) * expert + (0 if cfg.tie_embeddings else embed)
    return {"total": total, "active": total - inactive, "embedding": embed, "mtp": mtp}


def mean_keys_per_query(seq_len: int, window: int | None) -> float:
    """Average over query positions 0..T-1 of the number of keys it attends to (causal, optional window)."""
    T = seq_len
    if window is None or window >= T:
        return (T + 1) / 2
    W = window
    return (W * (W + 1) / 2 + (T - W) * W) / T


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token (matmuls; norms and activations are ignored)."""
    counts = param_counts(cfg)
    blocks = cfg.n_layers + cfg.mtp_layers
    norms = blocks * (2 * cfg.d_model + (2 * cfg.head_dim if cfg.qk_norm else 0)) + cfg.d_model
    norms += cfg.mtp_layers * 3 * cfg.d_model
    matmul_params = counts["active"] - norms - (blocks * cfg.n_heads if cfg.attn_sinks else 0)
    matmul_params += cfg.mtp_layers * cfg.vocab_size * cfg.d_model  # the shared LM head, once per depth
    attn = sum(12 * cfg.n_heads * cfg.head_dim * mean_keys_per_query(seq_len, cfg.window if k == "L" else None)
               for k in cfg.layer_kinds + cfg.mtp_kinds)
    return 6.0 * matmul_params + attn
