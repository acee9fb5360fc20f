"""The trainer's speed switches, applied to the plain-PyTorch model from outside: regional torch.compile of each
block (train.compile), activation checkpointing (train.activation_checkpointing, train.checkpointed_blocks)
and the chunked loss (train.loss). MoE load counts and the attention's tracked largest logits leave the block
in its outputs, so a checkpoint's recompute does not count them again (model/moe.py, model/transformer.py).

Full checkpointing keeps a block's input and reruns its whole forward in the backward: +1 forward (about a
third of forward + backward), expert-parallel all-to-alls included. Selective checkpointing (torchtitan's
op-level policy) keeps the outputs of the expensive ops (SAVED_OPS: matmuls, attention kernels, grouped expert
GEMMs, all-to-alls) and reruns only the cheap elementwise ops between them (norms, RoPE, SwiGLU, routing,
casts) from those: about half a block's activations for a few percent of recompute, and no collective is
repeated.

Checkpointing wraps the compiled block, not the other way round. torch.compile of a checkpointed function
traces the checkpoint as one higher-order op and needs its whole body as a single graph; the MoE layer has
graph breaks (data-dependent shapes in the loop and bmm_padded dispatch, in expert parallelism's all-to-all;
grouped_mm has none), and a break anywhere in the body makes dynamo run
the entire checkpointed block eagerly: no compile at all, plus the recompute. That is why compiled blocks
with checkpointing ran slower than either alone on the H100 (47,700 tok/s against 75,000 eager and 123,000
compiled). Outside the compiled function, the checkpoint drops what the compiled graphs saved and reruns
them (compiled) in the backward pass: compiled speed minus one forward, for the memory of block inputs only.
Selective checkpointing is the exception: its policy would see a compiled block as one opaque region and rerun
all of it, so the checkpointed block is compiled whole, the policy applied by the compiler's partitioner; a
block with graph breaks then runs eagerly (still selective) until its breaks are gone.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ondol.train.config import TrainConfig

# Ops whose outputs selective checkpointing keeps, by name (flash-attn registers its ops only when imported).
# inductor_compiled_code is a torch.compile'd region called from an eager block: there only FlexAttention's
# compiled kernel (model/attention_backends.py compiles it with wrap_inductor_compiled_regions, which makes it
# this one op; unwrapped, its kernels would be invisible to the policy and rerun in the backward).
SAVED_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_fused_attention_overrideable", "flex_attention", "inductor_compiled_code",
    "flash_attn::_flash_attn_forward", "flash_attn::_flash_attn_varlen_forward",
    "_c10d_functional::all_to_all_single",
})


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the outputs of SAVED_OPS; recompute everything else in the backward."""
    return CheckpointPolicy.MUST_SAVE if op.name() in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed_layers(n_layers: int, tr: TrainConfig) -> list[int]:
    """Indices of the main blocks that recompute their forward: none, all, or every second one (alternate)."""
    if tr.activation_checkpointing == "none":
        return []
    return list(range(0, n_layers, 2 if tr.checkpointed_blocks == "alternate" else 1))


def apply_compile_and_checkpointing(model: torch.nn.Module, tr: TrainConfig) -> None:
    """Compile each block (main layers and MTP depths) and checkpoint the chosen main layers, in place: the
    blocks keep their names, so state dicts and checkpoints are unchanged."""
    if tr.compile:
        # Blocks share one code object: each attention kind x dense/MoE x train/eval, and each graph-break
        # resume point, is one more compiled variant. Past the limit dynamo would run a block eagerly, and a
        # checkpoint whose recompute ran other code than its forward fails, so the limit grows with depth.
        limit = 8 * (len(model.layers) + len(model.mtp))
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    recomputed = set(checkpointed_layers(len(model.layers), tr))
    if tr.compile and recomputed:
        # A recompute must run the very graph its forward ran. Blocks share compiled variants, and dynamo's
        # most-recently-used ordering of them can pick another variant whose guards also pass (e.g. one with
        # dynamic shapes); first-compiled-first order keeps the choice stable (pytorch/pytorch#166926).
        torch._C._dynamo.eval_frame._set_lru_cache(False)
    blocks = [(block, i in recomputed) for i, block in enumerate(model.layers)]
    every = tr.activation_checkpointing != "none" and tr.checkpointed_blocks == "all"
    blocks += [(depth.block, every) for depth in model.mtp]
    options = {"use_reentrant": False}
    if tr.activation_checkpointing == "selective":
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, selective_policy)
    for block, recompute in blocks:
        if recompute and tr.activation_checkpointing == "selective":
            # To the policy a compiled block is one opaque region, which it would rerun whole: here the
            # checkpoint is traced into the compiled graph instead (torchtitan's order), where the partitioner
            # applies the policy.
            forward = functools.partial(checkpoint, block.forward, **options)
            block.forward = torch.compile(forward) if tr.compile else forward
            continue
        forward = torch.compile(block.forward) if tr.compile else block.forward
        if recompute:
            forward = functools.partial(checkpoint, forward, **options)
        block.forward = forward


def loss_chunk_tokens(tr: TrainConfig, device: torch.device, zero_stage: int) -> int:
    """Tokens per chunk of the loss (0: full logits). ZeRO-3 gathers the LM head's weight only while the head
    module runs, so there the loss keeps the full path."""
    if tr.loss == "chunked" and zero_stage == 3:
        raise ValueError("train.loss=chunked does not work with deepspeed.zero_stage=3 (the LM head weight is "
                         "partitioned outside its module); set train.loss=auto or full")
    on = tr.loss == "chunked" or (tr.loss == "auto" and device.type == "cuda" and zero_stage < 3)
    return tr.loss_chunk_tokens if on else 0
