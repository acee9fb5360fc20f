"""Sequence parallelism (DeepSpeed-Ulysses), applied from outside the plain-PyTorch model.

With deepspeed.sequence_parallel_size=N, groups of N consecutive ranks (DeepSpeed's layout:
deepspeed.runtime.sequence_parallel.parallel_state_sp) share each micro-batch: every rank of a group loads the
same rows and keeps one contiguous 1/N of each row's tokens, positions, document ids and labels (`shard`).
Everything outside attention (embeddings, norms, MLP / MoE, LM head, loss) runs on the local shard. Attention
runs through DeepSpeed's `DistributedAttention`: one all-to-all scatters the heads and gathers the sequence, so
each rank attends over the whole row with H/N query heads and the model's own backend (sdpa, flex, flash) and
mask (document masking, sliding window, global NoPE or RoPE layers: RoPE is applied per token before the
exchange, with the row's positions), and one all-to-all sends the outputs back. KV heads fewer than N are
replicated up to N first (N a multiple of model.n_kv_heads), so each rank's query heads find their KV head.

Gradients. DeepSpeed is not told about the groups: it sees world_size data-parallel ranks and averages every
gradient over all of them (ZeRO 1/2 partition over all of them too). Each rank's loss is therefore its share
of the row's mean, scaled by N (`loss`): N * (sum of its tokens' losses) / (valid tokens of the whole row), so
the world average is the mean over data-parallel groups of each row's full-sequence mean, exactly the gradient
DeepSpeed's own sequence-parallel reduction gives (sum over the SP group, mean over data parallelism), and the
logged loss (summed over ranks, divided by world_size) is that mean too. The checkpoint layout is the one of
world_size plain data-parallel ranks, so a run resumes on another sequence-parallel size.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ondol.errors import ConfigError
from ondol.model.attention_backends import MaskSpec
from ondol.model.loss import IGNORE
from ondol.model.transformer import mtp_targets
from ondol.train.config import kv_repeat


class UlyssesBackend:
    """An attention backend for a sequence shard: `prepare` builds the inner backend's mask for the whole row
    (document ids all-gathered from the group), `attend` runs the inner backend on whole rows for this rank's
    heads between DeepSpeed-Ulysses all-to-alls. Takes and returns q [B, H, T/N, D], k, v [B, Hkv, T/N, D]."""

    def __init__(self, inner, group, kv_repeat: int) -> None:
        from deepspeed.sequence.layer import DistributedAttention

        self.inner, self.group, self.kv_repeat = inner, group, kv_repeat
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.name = f"ulysses+{inner.name}"
        # [B, T, H, D] layout (batch_dim_idx 0): scatter dim 2 (heads), gather dim 1 (sequence)
        self.exchange = DistributedAttention(self._local_attention, group, scatter_idx=2, gather_idx=1)

    def prepare(self, spec: MaskSpec, device: torch.device):
        docs = None if spec.doc_ids is None else gather_sequence(spec.doc_ids, self.group)
        return self.inner.prepare(MaskSpec(spec.seq_len * self.size, spec.window, docs), device)

    def attend(self, q, k, v, mask, sinks: torch.Tensor | None, want_max: bool = False) -> torch.Tensor:
        if self.kv_repeat > 1:
            k, v = k.repeat_interleave(self.kv_repeat, 1), v.repeat_interleave(self.kv_repeat, 1)
        local_sinks = None if sinks is None else sinks.view(self.size, -1)[self.rank]  # heads go in rank order
        out = self.exchange(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, mask, local_sinks,
                            want_max)
        return out.transpose(1, 2)

    def attend_and_max(self, q, k, v, mask, sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`attend`, and the largest logit of each of the H query heads: the inner backend's for this rank's H/N,
        -inf for the others (the trainer's maximum over ranks fills them in: train/qk_clip.py)."""
        out = self.attend(q, k, v, mask, sinks, want_max=True)
        heads = torch.full((self.size, q.shape[1] // self.size), float("-inf"), device=q.device)
        heads[self.rank] = self.local_max
        return out, heads.view(-1)

    def _local_attention(self, q, k, v, mask, sinks, want_max: bool):
        """Whole rows [B, T, H/N, D] -> the inner backend's attention in the same layout; with `want_max` the
        inner backend's largest logit per local head is left in `local_max` (DistributedAttention passes one
        tensor back)."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if want_max:
            out, self.local_max = self.inner.attend_and_max(q, k, v, mask, sinks)
        else:
            out = self.inner.attend(q, k, v, mask, sinks)
        return out.transpose(1, 2)


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """The whole rows [B, T] from every rank's shard [B, T/N] (no gradient: document ids)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class SequenceParallel:
    """The trainer's side: this rank's group, the shard of a batch, the loss share; `sharded()` marks the
    forwards whose inputs are shards (other forwards, e.g. bits per byte on whole documents, run unsharded)."""

    def __init__(self, model: nn.Module, size: int, group) -> None:
        self.model, self.size, self.group = model, size, group
        self.rank = dist.get_rank(group)
        self.active = False

    @contextlib.contextmanager
    def sharded(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's contiguous 1/N of every row: input_ids, labels, doc_ids, the RoPE positions of the whole
        row (so within-document positions continue across shards) and, with MTP, next_ids and next_labels:
        the model.mtp_layers tokens and labels after the shard (0 and -100 past the row)."""
        ids, docs, labels = batch["input_ids"], batch["doc_ids"], batch["labels"]
        T = ids.shape[1]
        positions = self.model.token_positions(docs, T, ids.device)
        n = T // self.size
        start, end = self.rank * n, (self.rank + 1) * n
        out = {"input_ids": ids[:, start:end], "labels": labels[:, start:end], "doc_ids": docs[:, start:end],
               "positions": positions[:, start:end]}
        m = self.model.cfg.mtp_layers
        if m:
            tokens = torch.cat([ids, labels[:, -1:].clamp_min(0)], dim=1)  # the row's tokens 0..T
            after, after_ids = labels[:, end:end + m], tokens[:, end:end + m]
            out["next_labels"] = torch.cat([after, after.new_full((after.shape[0], m - after.shape[1]), IGNORE)], 1)
            out["next_ids"] = torch.cat([after_ids, after_ids.new_zeros((ids.shape[0], m - after_ids.shape[1]))], 1)
        return out

    def losses(self, out, shard: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """N x this shard's share of the rows' mean LM loss (local mean x N x local valid / group valid) and of
        the MTP loss (the same share per depth, then model.mtp_loss_weight x their mean; 0 without MTP)."""
        labels, cfg = shard["labels"], self.model.cfg
        targets = [labels] + [mtp_targets(shard["input_ids"], labels, shard["next_ids"], shard["next_labels"], k)[1]
                              for k in range(1, cfg.mtp_layers + 1)]
        valid = torch.stack([(t != IGNORE).sum() for t in targets])
        total = valid.clone()
        dist.all_reduce(total, group=self.group)
        share = self.size * valid / total
        loss = out.loss * share[0].to(out.loss.dtype)
        if out.mtp_depth_losses is None:
            return loss, out.mtp_loss
        depths = out.mtp_depth_losses * share[1:].to(out.mtp_depth_losses.dtype)
        return loss, cfg.mtp_loss_weight * depths.mean()


def apply_sequence_parallel(model: nn.Module, sp_size: int) -> SequenceParallel | None:
    """Create the sequence-parallel groups (DeepSpeed's) and route the model's attention through Ulysses while
    `sharded()`; None for size 1, which leaves the model untouched. Call after deepspeed.init_distributed, on
    every rank, before the first forward."""
    if sp_size == 1:
        return None
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % sp_size:
        raise ConfigError(f"deepspeed.sequence_parallel_size={sp_size} must divide the world size {world} (ranks "
                          "form whole sequence-parallel groups): launch a multiple of it, or change the size")
    group = sequence_parallel_group(sp_size)
    sp = SequenceParallel(model, sp_size, group)
    plain, wrapped = model.backend, {}
    repeat = kv_repeat(model.cfg.n_kv_heads, sp_size)

    def backend(device: torch.device, dtype: torch.dtype):
        inner = plain(device, dtype)
        if not sp.active:
            return inner
        if id(inner) not in wrapped:
            wrapped[id(inner)] = UlyssesBackend(inner, group, repeat)
        return wrapped[id(inner)]

    model.backend = backend
    return sp


def sequence_parallel_group(sp_size: int):
    """This rank's group of sp_size consecutive ranks, made by DeepSpeed's sequence-parallel state on first use
    (one size per process)."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as state

    if state._SEQUENCE_PARALLEL_GROUP is None:
        state.initialize_sequence_parallel(sp_size)
    group = state.get_sequence_parallel_group()
    if dist.get_world_size(group) != sp_size:
        raise RuntimeError(f"this process already has sequence-parallel groups of {dist.get_world_size(group)}")
    return group


def data_parallel(rank: int, world_size: int, sp_size: int) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size): the ranks of a sequence-parallel group share one rank's rows."""
    return rank // sp_size, world_size // sp_size

