"""The decoder: embeddings -> blocks (hybrid local/global attention, dense or MoE MLP) -> norm -> LM head.

Plain PyTorch; parallelism, checkpointing and compilation are applied from outside. Module names follow
transformers' EXAONE models (q_proj, gate, experts.gate_up_proj, ...) so that export is a rename of norms only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ondol.model.attention_backends import MaskSpec, SDPABackend, select_backend
from ondol.model.config import ModelConfig
from ondol.model.kv_cache import KVCache, LayerCache, StaticKVCache
from ondol.model.layers import (
    RMSNorm,
    SwiGLU,
    apply_rope,
    document_positions,
    rope_cos_sin,
    rope_inv_freq,
    yarn_inv_freq,
)
from ondol.model.loss import lm_loss
from ondol.model.moe import GroupedExperts, MoE


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # None when the loss was computed in chunks without them
    loss: torch.Tensor | None
    aux_loss: torch.Tensor  # weighted sum of MoE balance and z losses (0-dim)
    mtp_loss: torch.Tensor  # model.mtp_loss_weight x mean MTP loss over depths (0-dim; 0 without MTP)
    mtp_depth_losses: torch.Tensor | None = None  # each depth's mean cross-entropy [mtp_layers] (with labels)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached
    hidden: torch.Tensor | None = None  # last layer's output before the final norm [B, T, D] (feeds MTP)


class Attention(nn.Module):
    """Grouped-query attention with optional QK-norm, RoPE (or none: NoPE global layers) and sinks. With
    `track_max_logit` set (train/qk_clip.py sets it) a training forward also returns each head's largest logit,
    which the transformer keeps in `max_logit` (the running maximum since the last reset)."""

    def __init__(self, cfg: ModelConfig, kind: str) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.use_rope = cfg.uses_rope(kind)
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attn_sinks else None
        self.track_max_logit = False
        self.register_buffer("max_logit", torch.full((cfg.n_heads,), float("-inf")), persistent=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask, backend,
                cache: LayerCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, each head's largest logit [H] when tracked, else None)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2))
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2))
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # earlier positions' keys from the cache, with an explicit mask: SDPA
            k, v, mask = cache.update(k, v)
            backend = SDPA
        max_logit = None
        if self.track_max_logit and self.training and cache is None:
            out, max_logit = backend.attend_and_max(q, k, v, mask, self.sinks)
        else:
            out = backend.attend(q, k, v, mask, self.sinks)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), max_logit

    @torch.no_grad()
    def note_max_logit(self, max_logit: torch.Tensor) -> None:
        """Fold a forward's largest logits (its returned ones) into `max_logit`. Called outside the block, as
        MoE.count_load is: a checkpoint's recompute returns nothing, so each forward counts once."""
        torch.maximum(self.max_logit, max_logit.float(), out=self.max_logit)


class Block(nn.Module):
    """Pre-norm (K-EXAONE: x + f(norm(x))) or post-norm (EXAONE 4.0: x + norm(f(x))) residual block."""

    def __init__(self, cfg: ModelConfig, kind: str, moe: bool) -> None:
        super().__init__()
        self.kind = kind
        self.pre_norm = cfg.norm_placement == "pre"
        self.self_attn = Attention(cfg, self.kind)
        self.mlp = MoE(cfg) if moe else SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x, rope, masks, backend, cache: LayerCache | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(output, stats): the MoE layer's (aux_loss, load, ...) and, when tracked, the attention's
        "max_logit"; empty for a dense block that tracks nothing."""
        mask = masks[self.kind]
        if self.pre_norm:
            a, max_logit = self.self_attn(self.attn_norm(x), rope, mask, backend, cache)
            x = x + a
            h, stats = self._mlp(self.mlp_norm(x))
        else:
            a, max_logit = self.self_attn(x, rope, mask, backend, cache)
            x = x + self.attn_norm(a)
            h, stats = self._mlp(x)
            h = self.mlp_norm(h)
        if max_logit is not None:
            stats["max_logit"] = max_logit
        return x + h, stats

    def _mlp(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.mlp(x) if isinstance(self.mlp, MoE) else (self.mlp(x), {})

    def note_stats(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold a forward's tracked maximum logits and MoE loads into the block's buffers; the rest of the MoE
        stats (aux_loss first), or an empty dict for a dense block."""
        if "max_logit" in stats:
            self.self_attn.note_max_logit(stats.pop("max_logit"))
        if "load" in stats:
            self.mlp.count_load(stats.pop("load"))
        return stats


class MTPDepth(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3, section 2.2). At position t it takes the previous depth's
    hidden state (the main model's for depth 1) and the embedding of token t+k, RMS-normalises each, projects
    their concatenation back to d_model (embedding first, the layout of released MTP checkpoints), runs one
    block and a final norm; the shared LM head then predicts token t+k+1. The block's MLP is dense, as in
    K-EXAONE (Megatron-Bridge's EXAONE-MoE spec keeps MTP layers dense); its attention kind continues the
    layer pattern (model.mtp_kinds)."""

    def __init__(self, cfg: ModelConfig, kind: str) -> None:
        super().__init__()
        self.enorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg, kind, moe=False)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, hidden, embedded, rope, masks, backend, cache: LayerCache | None = None) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1))
        x, stats = self.block(x, rope, masks, backend, cache)
        self.block.note_stats(stats)
        return x


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator for one tensor, seeded by a hash of (seed, name) (63 bits)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


SDPA = SDPABackend()
CACHED_MASKS = {"L": None, "G": None}  # cached attention builds its mask from the cache's positions


def shift_left(x: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    """x [B, T] moved n positions to the left along T, the last n filled with `fill`."""
    return torch.cat([x[:, n:], x.new_full((x.shape[0], min(n, x.shape[1])), fill)], dim=1)


def mtp_targets(input_ids: torch.Tensor, labels: torch.Tensor, next_ids: torch.Tensor | None,
                next_labels: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(seen, targets) [B, T] of MTP depth k: at position t the token t+k (a row's tokens are its input_ids and
    then its last label) and the label it predicts (labels[t + k]; -100 past the row). A sequence-parallel shard
    is continued by `next_ids` and `next_labels` [B, m], the tokens and labels after it. Seen tokens come from
    the inputs, not the labels, so a masked label (-100, as in supervised fine-tuning) hides only its own target."""
    T = labels.shape[1]
    if next_labels is None:
        tokens, row = torch.cat([input_ids, labels[:, -1:].clamp_min(0)], dim=1), labels
    else:
        tokens, row = torch.cat([input_ids, next_ids], dim=1), torch.cat([labels, next_labels], dim=1)
    return shift_left(tokens, k, 0)[:, :T], shift_left(row, k, -100)[:, :T]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int | None = None) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (> 0) before building the model; the trainer fills it "
                             "from the tokenizer when it is 0")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, kind, cfg.is_moe_layer(i)) for i, kind in enumerate(cfg.layer_kinds))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPDepth(cfg, kind) for kind in cfg.mtp_kinds)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq, self.rope_scale = self.rope_frequencies()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._backends: dict = {}
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialise every parameter that is not on the meta device (see `init_parameter`); `seed` None draws
        one from torch's global generator. A model built on the meta device and materialised in pieces (only a
        rank's experts, one ZeRO-3 partition at a time) gets, piece by piece, the values of a whole build."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), device="cpu"))
        for name, p in self.named_parameters():
            if not p.is_meta:
                self.init_parameter(name, p, seed)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The rotary frequencies (in fp32, cast to the buffer's dtype), the MoE biases and load counts (0) and
        the attention's tracked maximum logits (-inf)."""
        if not self.inv_freq.is_meta:  # buffers too: materialising a meta build leaves them uninitialised
            self.inv_freq.copy_(self.rope_frequencies()[0])
        for moe in self.moe_layers():
            if not moe.expert_bias.is_meta:
                moe.expert_bias.zero_()
                moe.tokens_per_expert.zero_()
        for attn in self.attention_layers():
            if not attn.max_logit.is_meta:
                attn.max_logit.fill_(float("-inf"))

    @torch.no_grad()
    def init_parameter(self, name: str, p: torch.Tensor, seed: int) -> None:
        """Normal(0, init_std) weights, residual output projections scaled by 1/sqrt(2 * n_layers); norm gains 1,
        sinks 0. Each tensor draws from its own generator seeded by (seed, name), and each routed expert's slice
        by (seed, name, expert id), so the values depend on neither build order nor which experts a rank holds
        (they do depend on the device type: CPU and CUDA generators differ)."""
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
            return
        if name.endswith("sinks"):
            nn.init.zeros_(p)
            return
        out = name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj"))
        std = self.cfg.init_std / ((2 * self.cfg.n_layers) ** 0.5 if out else 1.0)
        owner = self.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, GroupedExperts):
            for e, piece in enumerate(p, start=owner.first_expert):
                piece.normal_(0.0, std, generator=_generator(seed, f"{name}[{e}]", p.device))
        else:
            p.normal_(0.0, std, generator=_generator(seed, name, p.device))

    def rope_frequencies(self) -> tuple[torch.Tensor, float]:
        """(inverse frequencies in fp32, cos/sin scale) of the RoPE layers under model.rope_scaling."""
        cfg = self.cfg
        if cfg.rope_scaling == "yarn":
            return yarn_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_seq_len)
        return rope_inv_freq(cfg.head_dim, cfg.rope_theta), 1.0

    def attention_layers(self) -> list[Attention]:
        """Every attention module: the main layers', then the MTP blocks'."""
        return [m for m in self.modules() if isinstance(m, Attention)]

    def moe_layers(self) -> list[MoE]:
        return [block.mlp for block in self.layers if isinstance(block.mlp, MoE)]

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Move each MoE layer's expert bias toward balanced load, then reset the load accumulators.
        Call after all-reducing `tokens_per_expert` across data-parallel ranks."""
        for moe in self.moe_layers():
            moe.update_bias()

    def backend(self, device: torch.device, dtype: torch.dtype):
        key = (device.type, dtype)
        if key not in self._backends:
            self._backends[key] = select_backend(self.cfg.attn_backend, device, dtype)
        return self._backends[key]

    def _windows(self, kinds: list[str]) -> list[int | None]:
        """Each layer's attention window: cfg.window for a sliding-window layer ("L"), None for a global one."""
        return [self.cfg.window if kind == "L" else None for kind in kinds]

    def new_cache(self, slack: int = 0) -> tuple[KVCache, KVCache]:
        """Empty KV caches for the main layers and the MTP blocks (see model/kv_cache.py for `slack`)."""
        return KVCache(self._windows(self.cfg.layer_kinds), slack), KVCache(self._windows(self.cfg.mtp_kinds), slack)

    def new_static_cache(self, dtype: torch.dtype = torch.float32) -> StaticKVCache:
        """An empty fixed-shape KV cache of the main layers for up to model.max_seq_len positions (batch 1)."""
        return StaticKVCache(self._windows(self.cfg.layer_kinds), self.cfg.max_seq_len,
                             (1, self.cfg.n_kv_heads, self.cfg.head_dim), dtype, self.inv_freq.device)

    def token_positions(self, doc_ids: torch.Tensor | None, seq_len: int, device: torch.device) -> torch.Tensor:
        """RoPE positions [B or 1, T] of a row: within each packed document under model.doc_positions (with
        doc_ids), else 0..T-1."""
        if self.cfg.doc_positions and doc_ids is not None:
            return document_positions(doc_ids)
        return torch.arange(seq_len, device=device)[None]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, cache: KVCache | StaticKVCache | None = None, loss_chunk: int = 0,
                compile_loss: bool = False, positions: torch.Tensor | None = None,
                next_ids: torch.Tensor | None = None, next_labels: torch.Tensor | None = None) -> ModelOutput:
        """Logits and losses for input_ids [B, T]. With `cache` (KVCache or StaticKVCache), input_ids continue the
        positions the cache holds (generation: no labels, no document ids) and the cache is extended by them. With labels and
        `loss_chunk` > 0 the loss runs over that many tokens at a time and logits is None (model/loss.py);
        `compile_loss` compiles the loss (train.compile). `positions` [B or 1, T] overrides `token_positions`:
        a sequence-parallel shard passes its slice of the whole row's, and as `next_ids` and `next_labels`
        [B, mtp_layers] the tokens and labels that follow it (MTP inputs and targets past the shard)."""
        cfg = self.cfg
        T = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        backend = self.backend(x.device, x.dtype)
        docs = doc_ids if cfg.document_masking else None
        if cache is not None:
            masks, positions = CACHED_MASKS, cache.positions(T, x.device)[None]
        else:
            masks = {kind: backend.prepare(MaskSpec(T, cfg.window if kind == "L" else None, docs), x.device)
                     for kind in set(cfg.layer_kinds + cfg.mtp_kinds)}
            if positions is None:
                positions = self.token_positions(doc_ids, T, x.device)
        rope = rope_cos_sin(positions, self.inv_freq, x.dtype, self.rope_scale)

        aux_loss = x.new_zeros((), dtype=torch.float32)
        moe_stats: list[dict[str, torch.Tensor]] = []
        for i, block in enumerate(self.layers):
            x, stats = block(x, rope, masks, backend, None if cache is None else cache.layers[i])
            stats = block.note_stats(stats)
            if stats:
                aux_loss = aux_loss + stats.pop("aux_loss")
                moe_stats.append(stats)
        if cache is not None:
            cache.advance(T)
        loss, logits = lm_loss(self.norm(x), self.lm_head, labels, loss_chunk, compile_loss)
        metrics = {f"moe/{k}": torch.stack([s[k] for s in moe_stats]).mean() for k in (moe_stats[0] if moe_stats
                                                                                          else {})}
        metrics["moe/aux_loss"] = aux_loss.detach()
        mtp_loss, depth_losses = aux_loss.new_zeros(()), None
        if self.mtp and labels is not None:
            depth_losses = self.mtp_losses(x, input_ids, labels, next_ids, next_labels, rope, masks, backend,
                                           metrics)
            mtp_loss = self.cfg.mtp_loss_weight * depth_losses.mean()
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, mtp_loss=mtp_loss, metrics=metrics,
                           hidden=x, mtp_depth_losses=depth_losses)

    def mtp_losses(self, hidden, input_ids, labels, next_ids, next_labels, rope, masks, backend,
                   metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each depth's mean cross-entropy [mtp_layers]: depth k at position t sees token t+k and predicts token
        t+k+1 (labels[t + k]); targets past the row or ignored (-100) are ignored (`mtp_targets`). Logs mtp/loss
        (mean) and mtp/acc (depth 1)."""
        V, losses = self.cfg.vocab_size, []
        for k, depth in enumerate(self.mtp, start=1):
            seen, targets = mtp_targets(input_ids, labels, next_ids, next_labels, k)
            hidden = depth(hidden, self.embed_tokens(seen), rope, masks, backend)
            logits = self.lm_head(depth.norm(hidden))
            losses.append(F.cross_entropy(logits.float().view(-1, V), targets.reshape(-1), ignore_index=-100))
            if k == 1:
                valid = targets != -100
                hits = (logits.detach().argmax(-1) == targets) & valid
                metrics["mtp/acc"] = hits.sum() / valid.sum().clamp_min(1)
        losses = torch.stack(losses)
        metrics["mtp/loss"] = losses.mean().detach()
        return losses

    @torch.no_grad()
    def mtp_draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Depth-1 MTP logits [B, V] at the last of T positions that continue `cache` (the MTP blocks' cache):
        `hidden` [B, T, D] is the main model's output there and `next_ids` [B, T] the token after each."""
        positions = torch.arange(cache.length, cache.length + hidden.shape[1], device=hidden.device)[None]
        rope = rope_cos_sin(positions, self.inv_freq, hidden.dtype, self.rope_scale)
        depth = self.mtp[0]
        h = depth(hidden, self.embed_tokens(next_ids), rope, CACHED_MASKS, SDPA, cache.layers[0])
        cache.length += hidden.shape[1]
        return self.lm_head(depth.norm(h[:, -1]))
