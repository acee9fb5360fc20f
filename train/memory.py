"""Per-GPU memory of a training run, by term, before anything is launched: what `ondol plan` and `ondol launch`
print and check.

It lives in train/ because every term but the parameter counts is decided here: the precision, how DeepSpeed's
optimizers (train/engine.py) keep weights, gradients, fp32 master weights and AdamW moments at each ZeRO stage,
and how expert parallelism (train/expert_parallel.py) splits experts. Parameter counts come from the model itself,
built on the meta device (no memory, a few seconds for K-EXAONE-236B).

Terms, in bytes per rank (s: bytes of the run's precision, 2 for bf16, 4 for fp32; P: dense parameters, which
every rank holds; X: expert parameters over the expert-parallel size, this rank's experts; W: world size,
W / EP: the expert-data-parallel size over which expert optimizer state is partitioned, as DeepSpeed does):
  weights     s (P + X); ZeRO 3 (EP 1 only): s (P + X) / W plus the gathered parameters: ZeRO 3 keeps
              parameters it will reuse within stage3_max_reuse_distance (1e9) elements, up to
              stage3_max_live_parameters (1e9), so a model below 1e9 parameters stays gathered whole; a larger
              one holds at least its largest module (K-EXAONE: one layer's experts) and a prefetch
  gradients   s (P + X) at ZeRO 0; ZeRO 1-3 reduce each gradient through a bucket as the backward produces it
              and keep only their partition, s (P / W + X / (W / EP)) (DeepSpeed's contiguous_gradients default)
  optimizer   fp32 AdamW moments, 8 bytes a parameter; with optim.name=muon 4 bytes (one fp32 momentum) for the
              matrices Muon updates (every expert parameter; train/optim.py's muon_matrices) and 8 for the rest
              (embeddings, LM head, routers, norms); fp32 master weights (4) unless ZeRO 0 in fp32, where
              torch's AdamW updates the module's own weights; at ZeRO 0 nothing is partitioned (DeepSpeed's
              bf16 optimizer keeps a full fp32 copy), from ZeRO 1 on partitioned as gradients are
  step grads  the fp32 gradients the optimizer step reads, flattened (ZeRO >= 1, or bf16): 4 bytes a parameter of
              the optimizer's share; with Muon at ZeRO 1/2 also the fp32 momentum of the matrices overlapping
              the partition, assembled whole, in each group spread over more than one rank: the partition's
              share plus at most two of the group's largest matrices, those crossing its ends (GuardedMuon)
  buckets     gradient reduction buckets (DeepSpeed's reduce_bucket_size, and ZeRO 0's fixed all-reduce size:
              5e8 elements), at most the gradients they hold: during the backward from ZeRO 1 on, after it
              at ZeRO 0 (none on one rank); ZeRO 3's reduce-scatter adds an interleaved copy of its bucket
  activations what autograd keeps from the forward for the backward, per token, counted from the model's code
              (model/transformer.py, model/moe.py: RMSNorm keeps fp32 copies, flash/flex attention its inputs,
              output and log-sum-exp, experts their gathered inputs, gate/up outputs and SwiGLU product, at
              twice the mean load under EP: EP_EXPERT_LOAD), times micro_batch x seq_len. Checkpointed
              blocks (train.checkpointed_blocks: all, or every second one) keep instead, under full
              checkpointing, their input; under selective checkpointing their input and the outputs of the
              ops train/fast_paths.py's policy saves (projections, attention output and log-sum-exp, router
              logits, expert GEMMs, all-to-alls); either way plus one checkpointed block's recompute in its
              backward
  logits      the LM head's output (kept by the caller) and the loss's fp32 log-probabilities and two fp32
              gradients of the same size during its backward; with the chunked loss (train.loss, on CUDA by
              default; model/loss.py) only one chunk's fp32 logits, softmax and gradient and its cast, plus the
              hidden states' gradient and the head's fp32 weight gradient and its cast; MTP depths keep their
              fp32 log-probabilities
  all-to-all  sequence parallelism (deepspeed.sequence_parallel_size N, train/sequence_parallel.py) divides the
              tokens of activations and logits by N: a rank holds seq_len / N tokens of each row, and its
              attention kernel whole rows for n_heads / N heads (the same bytes). It adds one layer's
              exchange at a time: DeepSpeed's all-to-all makes a contiguous send copy, a receive buffer and a
              contiguous result of q, k and v (and of the output on the way back), and, where KV heads are
              replicated up to N, the kernel keeps the copies in every attention layer
The peak is what persists (weights, gradients, master weights, moments, buckets) plus the larger of the
backward's transients (activations and logits) and the step's (its fp32 gradients): they are never alive together.
Not counted: the CUDA context and allocator fragmentation (launch/plan.py's RESERVE_GIB covers them), NCCL buffers,
activations of the evaluation pass (smaller: no autograd), an expert-parallel load above twice the mean.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ondol.model.config import ModelConfig
from ondol.train.config import kv_repeat

GIB = 2**30
ADAM_BYTES = 8  # two fp32 moments a parameter
FP32 = 4
DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size and allreduce_bucket_size (elements)
DEFAULT_PREFETCH = 50_000_000  # DeepSpeed's stage3_prefetch_bucket_size (elements)
# Under expert parallelism a rank runs every token copy routed to its experts; before the router biases have
# balanced the load, the busiest rank gets up to twice the mean (measured on the plan_vs_measured model at
# initialisation: 1.4-2.0x per layer at EP 4). Without EP every rank runs exactly k copies of its own tokens.
EP_EXPERT_LOAD = 2.0
DEFAULT_LIVE = 1_000_000_000  # DeepSpeed's stage3_max_live_parameters and stage3_max_reuse_distance (elements)


@dataclass(frozen=True)
class ParamSplit:
    """Parameter counts of the built model: dense (on every rank), experts (split by EP), largest module."""

    dense: int
    experts: int
    largest_module: int  # parameters of the module with the most directly owned parameters (ZeRO 3 gathers it)
    dense_adamw: int = 0  # dense parameters AdamW keeps under optim.name=muon (embeddings, LM head, routers, norms)
    largest_dense_matrix: int = 0  # elements of the largest dense matrix Muon orthogonalises
    largest_expert_matrix: int = 0  # elements of one routed expert's largest matrix

    @property
    def total(self) -> int:
        return self.dense + self.experts


def param_split(cfg: ModelConfig) -> ParamSplit:
    """Counts from the model built on the meta device (no memory is allocated); cached per config."""
    return _param_split(tuple(sorted(cfg.to_dict().items())))


@functools.lru_cache(maxsize=8)
def _param_split(key: tuple) -> ParamSplit:
    import torch

    from ondol.model.moe import GroupedExperts
    from ondol.model.transformer import Transformer
    from ondol.train.optim import muon_matrices

    with torch.device("meta"):
        model = Transformer(ModelConfig(**dict(key)))
    experts = sum(p.numel() for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    matrices = muon_matrices(model)
    adamw = total - sum(p.numel() for p in matrices)  # experts are all Muon's
    expert_ids = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    size = lambda p: p.shape[-2] * p.shape[-1]  # one expert's slice of a stacked tensor
    return ParamSplit(dense=total - experts, experts=experts, largest_module=largest, dense_adamw=adamw,
                      largest_dense_matrix=max((size(p) for p in matrices if id(p) not in expert_ids), default=0),
                      largest_expert_matrix=max((size(p) for p in matrices if id(p) in expert_ids), default=0))


@dataclass(frozen=True)
class RunShape:
    """What decides memory besides the model: precision, ZeRO stage, parallel layout, micro-batch."""

    precision: str  # fp32 | bf16
    zero_stage: int
    world_size: int
    expert_parallel_size: int
    micro_batch_size: int
    seq_len: int
    activation_checkpointing: str = "none"  # none | full | selective
    checkpointed_blocks: str = "all"  # all | alternate (blocks 0, 2, 4, ... and no MTP block)
    sequence_parallel_size: int = 1
    loss_chunk_tokens: int = 0  # the chunked loss's tokens per chunk; 0: full logits
    bucket_elements: int = DEFAULT_BUCKET
    prefetch_elements: int = DEFAULT_PREFETCH
    live_elements: int = DEFAULT_LIVE
    optimizer: str = "adamw"  # optim.name: adamw | muon

    @property
    def bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def local_tokens(self) -> int:
        """Tokens of a micro-batch on one rank: its shard of each row under sequence parallelism."""
        return self.micro_batch_size * self.seq_len // self.sequence_parallel_size


def _norm_bytes(s: int, weighted_kept: bool = True) -> int:
    """Bytes a RMSNorm leaves saved per element: its fp32 input (the input itself in fp32), the normalised tensor
    in the run's precision (what the weight multiplies) and, when the next op keeps it, the weighted output."""
    return FP32 + s + (s if weighted_kept else 0)


def attention_bytes_per_token(cfg: ModelConfig, s: int) -> int:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    # q: its norm (fp32 input, normalised), the kernel's input (normed or rotated) and output; k alike, v instead
    # of the output. Without QK-norm only the kernel's inputs and output. RoPE's products keep only cos/sin.
    per_head_dim = FP32 + 3 * s if cfg.qk_norm else 2 * s
    return _norm_bytes(s) * cfg.d_model + per_head_dim * (q + kv) + FP32 * cfg.n_heads  # + log-sum-exp


def mlp_bytes_per_token(cfg: ModelConfig, moe: bool, s: int, expert_load: float = 1.0) -> int:
    """expert_load: the token copies this rank's experts run, over the mean (k per token)."""
    d = cfg.d_model
    if not moe:
        return _norm_bytes(s) * d + 4 * s * cfg.ffn_hidden  # gate, silu(gate), up, their product
    k = cfg.top_k
    router = (FP32 * d if s < FP32 else 0) + FP32 * cfg.n_experts + 12 * k + 4  # fp32 input, scores, top-k
    dispatch = 16 * k + s * k  # gather and unsort indices (int64), routing weights
    # on the experts' rank: gathered input, gate/up output, silu(gate), SwiGLU product; back on the token's
    # rank: expert output, unsorted output
    experts = int(expert_load * k * s * (d + 4 * cfg.expert_hidden)) + 2 * k * s * d
    shared = 4 * s * cfg.expert_hidden * cfg.n_shared_experts
    return _norm_bytes(s) * d + router + dispatch + experts + shared


def block_bytes_per_token(cfg: ModelConfig, s: int, expert_load: float = 1.0) -> list[int]:
    """Activation bytes per token of each block (MTP depths last, with their two input norms and projection)."""
    out = [attention_bytes_per_token(cfg, s) + mlp_bytes_per_token(cfg, cfg.is_moe_layer(i), s, expert_load)
           for i in range(cfg.n_layers)]
    mtp_inputs = 2 * _norm_bytes(s, weighted_kept=False) * cfg.d_model + 2 * s * cfg.d_model  # norms, concat
    out += [attention_bytes_per_token(cfg, s) + mlp_bytes_per_token(cfg, False, s) + mtp_inputs
            for _ in range(cfg.mtp_layers)]
    return out


def saved_bytes_per_token(cfg: ModelConfig, moe: bool, s: int, expert_load: float = 1.0,
                          all_to_all: bool = False) -> int:
    """Bytes per token that selective checkpointing keeps of one block: its input and the outputs of the saved
    ops (train/fast_paths.py's SAVED_OPS), counted from the block's shapes."""
    d, q, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    attention = s * (q + 2 * kv) + s * q + FP32 * cfg.n_heads + s * d  # q/k/v, kernel output and lse, o_proj
    if not moe:
        return s * d + attention + s * (2 * cfg.ffn_hidden + d)  # gate, up, down
    k, hidden = cfg.top_k, cfg.expert_hidden
    experts = int(expert_load * k * s * (2 * hidden + d))  # grouped GEMMs on the experts' rank: gate_up, down
    sent = int(expert_load * k * s * d) + k * s * d if all_to_all else 0  # rows received, rows sent back
    shared = s * (2 * hidden * cfg.n_shared_experts + d) if cfg.n_shared_experts else 0
    return s * d + attention + FP32 * cfg.n_experts + experts + sent + shared  # router logits in fp32


def activation_bytes(cfg: ModelConfig, shape: RunShape, checkpointing: str | None = None) -> int:
    """Bytes autograd keeps from the forward for the backward (see the module docstring)."""
    tokens = shape.local_tokens
    load, ep = (EP_EXPERT_LOAD if shape.expert_parallel_size > 1 else 1.0), shape.expert_parallel_size > 1
    per_block = block_bytes_per_token(cfg, shape.bytes, load)
    head = _norm_bytes(shape.bytes) * cfg.d_model * (1 + cfg.mtp_layers)  # final norms
    checkpointing = shape.activation_checkpointing if checkpointing is None else checkpointing
    if checkpointing == "none":
        return tokens * (sum(per_block) + head)
    step = 2 if shape.checkpointed_blocks == "alternate" else 1  # alternate: main blocks 0, 2, 4, ..., no MTP
    recomputed = range(0, cfg.n_layers if step == 2 else len(per_block), step)
    if checkpointing == "full":
        kept = {i: shape.bytes * cfg.d_model for i in recomputed}
    else:
        kept = {i: saved_bytes_per_token(cfg, i < cfg.n_layers and cfg.is_moe_layer(i), shape.bytes, load, ep)
                for i in recomputed}
    # a checkpointed block's backward holds its recomputed activations besides what it kept (its input aside)
    recompute = max(max(per_block[i] - kept[i] + shape.bytes * cfg.d_model, 0) for i in recomputed)
    return tokens * (sum(kept.get(i, b) for i, b in enumerate(per_block)) + recompute + head)


def logits_bytes(cfg: ModelConfig, shape: RunShape) -> int:
    tokens, V, s = shape.local_tokens, cfg.vocab_size, shape.bytes
    if shape.loss_chunk_tokens:
        chunk = min(shape.loss_chunk_tokens, tokens)
        main = chunk * V * (3 * FP32 + s) + tokens * cfg.d_model * s + V * cfg.d_model * (FP32 + s)
    else:
        main = tokens * V * (s + 3 * FP32)
    return main + cfg.mtp_layers * tokens * cfg.vocab_size * FP32  # each depth's saved log-probabilities


def all_to_all_bytes(cfg: ModelConfig, shape: RunShape) -> int:
    """Sequence parallelism's exchange buffers of one layer (send copy, receive buffer, result of q, k, v) and
    the replicated KV heads every attention layer's kernel keeps (see the module docstring)."""
    sp, s = shape.sequence_parallel_size, shape.bytes
    repeat = kv_repeat(cfg.n_kv_heads, sp)
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    exchange = 3 * s * (q + 2 * kv * repeat)
    kept = (cfg.n_layers + cfg.mtp_layers) * 2 * s * kv * (repeat - 1)
    return shape.local_tokens * (exchange + kept)


CHECKPOINTING = ("none", "selective", "full")  # train.activation_checkpointing, most memory first
BACKWARD = ("activations", "logits", "all-to-all buffers")  # alive from the forward through the backward
STEP = ("fp32 step gradients", "Muon gathered momentum (fp32)", "all-reduce bucket")  # after the backward


@dataclass
class MemoryPlan:
    shape: RunShape
    params: ParamSplit
    terms: dict[str, int] = field(default_factory=dict)  # bytes per rank
    activations_by_checkpointing: dict[str, int] = field(default_factory=dict)  # none | full | selective

    @property
    def total(self) -> int:
        """The peak: what persists, plus the larger of the backward's and the optimizer step's transients."""
        persistent = sum(v for k, v in self.terms.items() if k not in BACKWARD + STEP)
        backward, step = (sum(self.terms.get(k, 0) for k in phase) for phase in (BACKWARD, STEP))
        return persistent + max(backward, step)

    @property
    def largest(self) -> tuple[str, int]:
        return max(self.terms.items(), key=lambda item: item[1])


def plan_memory(cfg: ModelConfig, shape: RunShape) -> MemoryPlan:
    """Bytes per rank by term for a run of `cfg` shaped by `shape` (see the module docstring)."""
    params = param_split(cfg)
    s, stage, W, ep = shape.bytes, shape.zero_stage, shape.world_size, shape.expert_parallel_size
    local = params.dense + params.experts // ep  # parameters of this rank's module
    # the optimizer's share: partitioned over data-parallel groups from ZeRO 1 on (experts over W / EP ranks)
    share = local if stage == 0 else params.dense / W + params.experts / ep / (W // ep)
    terms: dict[str, int] = {}
    if stage == 3:  # partitions, plus what is gathered: up to the live limit, at least a module and a prefetch
        working = params.largest_module + min(shape.prefetch_elements, params.largest_module)
        gathered = min(local, max(shape.live_elements, working))
        terms["weights"] = int(s * (share + gathered))
    else:
        terms["weights"] = s * local
    # ZeRO 1-3 copy each gradient into a reduction bucket as it is produced and keep only their partition
    terms["gradients"] = int(s * (local if stage == 0 else share))
    master = 0 if (stage == 0 and s == FP32) else FP32
    terms["fp32 master weights"] = int(master * share)
    if shape.optimizer == "muon":
        adamw_share = params.dense_adamw if stage == 0 else params.dense_adamw / W
        terms["AdamW moments (fp32)"] = int(ADAM_BYTES * adamw_share)
        terms["Muon momentum (fp32)"] = int(FP32 * (share - adamw_share))
        if stage in (1, 2):  # the matrices overlapping each partition assembled whole, where a group spans ranks
            dense, experts = params.dense - params.dense_adamw, params.experts // ep
            gathered = (min(dense, dense / W + 2 * params.largest_dense_matrix) if W > 1 else 0) + \
                (min(experts, experts / (W // ep) + 2 * params.largest_expert_matrix) if W // ep > 1 else 0)
            terms["Muon gathered momentum (fp32)"] = int(FP32 * gathered)
    else:
        terms["AdamW moments (fp32)"] = int(ADAM_BYTES * share)
    terms["fp32 step gradients"] = int(FP32 * share) if master else 0
    bucket = s * min(shape.bucket_elements, local)
    if stage == 0:  # ZeRO 0 all-reduces flattened buckets after the backward
        terms["all-reduce bucket"] = 0 if W == 1 else bucket
    else:  # ZeRO 1-3 reduce during the backward, as gradients are produced; ZeRO 3's reduce-scatter
        terms["reduce buckets"] = bucket * (2 if stage == 3 else 1)  # works on an interleaved copy
    terms["activations"] = activation_bytes(cfg, shape)
    terms["logits"] = logits_bytes(cfg, shape)
    if shape.sequence_parallel_size > 1:
        terms["all-to-all buffers"] = all_to_all_bytes(cfg, shape)
    by_checkpointing = {mode: activation_bytes(cfg, shape, mode) for mode in CHECKPOINTING}
    return MemoryPlan(shape, params, terms, by_checkpointing)
