"""The optimizers: AdamW (optim.name=adamw) or Muon for hidden matrices with AdamW for the rest (optim.name=muon),
over parameter groups, with an update that is skipped when gradients are not finite.

Weight decay applies to the matrices that do matmuls (attention and MLP projections, stacked expert weights,
the LM head). It does not apply to norm gains, biases, attention sinks or the input embedding: shrinking a gain
or a bias toward 0 is not regularisation but a change of the function's scale (Megatron and OLMo leave 1-D
parameters undecayed), and OLMo 2 found that decaying the embedding table shrinks rare-token rows that are
seldom updated, hurting stability, so it turned embedding decay off. torchtitan decays everything; we follow
OLMo. A tied LM head shares the embedding tensor and so is not decayed either.

Muon (Keller Jordan 2024; Moonlight, Liu et al. 2025) updates a hidden matrix by its momentum orthogonalised with
a Newton-Schulz iteration: U V^T of the momentum's SVD, approximately. It applies to every matrix inside the
blocks (attention and MLP projections, shared experts, and each routed expert's matrices separately: a stacked
[E, A, B] expert tensor is E matrices, orthogonalised as one batched matmul). The input embedding, the LM head and
the router stay on AdamW (their rows are per token or per expert, not a linear map between hidden spaces), as
do norm gains and biases. The update is scaled by Moonlight's 0.2 sqrt(max(A, B)), which gives it AdamW's update
RMS (about 0.2), so AdamW's learning rate and weight decay transfer; weight decay is decoupled, as in AdamW.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

# Keller Jordan's quintic coefficients: the steepest slope at 0 for which 5 steps leave every singular value of a
# normalised matrix in about [0.7, 1.2] (not exactly 1: the direction matters, not the exact spectrum)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
MUON_RMS = 0.2  # Moonlight's update RMS match to AdamW


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Muon updates, in module order: every parameter of two or more dimensions except the input
    embedding, the LM head (tied or not) and the routers' weights."""
    from ondol.model.moe import Router

    others = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, Router))}
    others |= {id(model.lm_head.weight)} if hasattr(model, "lm_head") else set()
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and p.ndim >= 2 and id(p) not in others and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def param_groups(model: nn.Module, weight_decay: float, muon: bool = False) -> list[dict]:
    """AdamW groups: matmul weights (decayed) and everything else (not decayed), in module order; with `muon`,
    Muon's matrices (decayed) first, in their own group. A ZeRO-3 parameter built under zero.Init holds an empty
    1-D partition; its true shape is `ds_shape`. Every group carries `muon` (whether Muon updates it) and `kind`
    (what the update-RMS log calls it)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices = muon_matrices(model) if muon else []
    taken = {id(p) for p in matrices}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in taken:
            continue
        taken.add(id(p))
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 and id(p) not in embeddings else no_decay).append(p)
    for p in matrices:  # read by train/state_shards.py: its optimizer state is Muon's
        p.muon = True
    groups = [{"params": matrices, "weight_decay": weight_decay, "name": "muon", "muon": True},
              {"params": decay, "weight_decay": weight_decay, "name": "decay", "muon": False},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay", "muon": False}]
    return [{**g, "kind": g["name"]} for g in groups if g["params"]]


def state_keys(p: torch.Tensor) -> tuple[str, ...]:
    """The optimizer state tensors of parameter p: Muon's one momentum, or AdamW's two moments."""
    return ("momentum_buffer",) if getattr(p, "muon", False) else ("exp_avg", "exp_avg_sq")


def orthogonalise(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The Newton-Schulz quintic iteration on the last two dimensions of g ([..., A, B]: a batch of matrices),
    approximately U V^T of each matrix's SVD U S V^T. bf16 on a GPU (the matmuls' fast path; the iteration is
    insensitive to their rounding), fp32 on a CPU (bf16 matmuls run ~7x slower there without bf16 units)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


def muon_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """Moonlight's update scale for a matrix of `shape` (the last two dimensions)."""
    return MUON_RMS * math.sqrt(max(shape[-2], shape[-1]))


def _orthogonalised(offset: int, shape: tuple[int, ...]) -> list[tuple[int, tuple[int, int]]]:
    """The matrices (offset, [A, B]) Muon orthogonalises one by one in a parameter of `shape` stored at `offset`
    of a flat buffer: the parameter itself, or each [A, B] slice of a stacked [E, A, B] expert tensor."""
    a, b = shape[-2:]
    return [(offset + e * a * b, (a, b)) for e in range(math.prod(shape[:-2]))]


def muon_updates(momenta: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """Scaled orthogonalised updates of whole matrices or stacks of them ([A, B] or [E, A, B]); matrices of the
    same shape go through the iteration together as one batch."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(momenta):
        by_shape.setdefault(tuple(m.shape[-2:]), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(momenta)
    for shape, idx in by_shape.items():
        batch = torch.cat([momenta[i].reshape(-1, *shape) for i in idx])
        done = orthogonalise(batch, steps).mul_(muon_scale(shape)).split(
            [momenta[i].numel() // (shape[0] * shape[1]) for i in idx])
        for i, u in zip(idx, done):
            out[i] = u.reshape(momenta[i].shape)
    return out


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW that records whether an update was applied, so the trainer can count skipped steps.

    With `owns_clipping` (fp32 without ZeRO, where DeepSpeed hands the module's gradients straight to this
    optimizer) it computes the global gradient norm itself (`clip_fn(params, max_norm)`, torch's by default;
    the expert-parallel one sums expert shards over their group), clips to `clip_norm` (0: no clipping) and skips the
    whole update when the norm is not finite. ZeRO 3 (and DeepSpeed's ZeRO 1/2 step in fp32) checks the norm itself
    and never calls `step` on a non-finite one, which leaves `applied` False just the same. At ZeRO 1/2 the engine's
    optimizer sets `found_inf` (a 0-d tensor, 1.0: not finite; train/zero_step.py) before each `step`: the fused
    kernel then skips the update on the device and `applied` is a 0-d bool tensor, read by the trainer once per
    step; the foreach kernel has no such input, so there the flag is read here.
    """

    def __init__(self, params, *, owns_clipping: bool, clip_norm: float, clip_fn=None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.owns_clipping, self.clip_norm = owns_clipping, clip_norm
        self.clip_fn = clip_fn or (lambda ps, max_norm: torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=True))
        self.applied = False
        self.found_inf: torch.Tensor | None = None
        # set by the trainer for a log step: `update_rms` then reports the step's update RMS per group kind
        self.track_updates = False
        self._update_sums: dict[str, torch.Tensor] = {}
        # called after each update with the groups just stepped and found_inf (train/qk_clip.py), or None
        self.after_update = None

    @torch.no_grad()
    def step(self, closure=None):
        if self.owns_clipping:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            max_norm = self.clip_norm if self.clip_norm > 0 else float("inf")
            norm = self.clip_fn(params, max_norm)
            self._global_grad_norm = norm  # read by the DeepSpeed engine (get_global_grad_norm)
            if not torch.isfinite(norm):
                return None
        if self.found_inf is not None and not self.defaults["fused"]:
            if self.found_inf:
                return None
            self.found_inf = None
        loss = self._update(closure)
        if self.after_update is not None:
            self.after_update(self.param_groups, self.found_inf)
        self.applied = True if self.found_inf is None else self.found_inf == 0
        return loss

    def _update(self, closure):
        """torch's AdamW step over the groups Muon does not update (all of them here)."""
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g.get("muon")]
        try:
            loss = super().step(closure)
            if self.track_updates:
                for group in self.param_groups:
                    self._record(group, [self._adamw_update(p, group) for p in group["params"] if p in self.state])
        finally:
            self.param_groups = groups
        return loss

    def _adamw_update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """The update AdamW just applied to p, before the learning rate and weight decay: m_hat / (sqrt(v_hat) +
        eps), from its state (one tensor at a time; the step count stays where torch keeps it, no sync)."""
        state, (beta1, beta2) = self.state[p], group["betas"]
        step = torch.as_tensor(state["step"], dtype=torch.float32, device=p.device)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
        return state["exp_avg"] / (1 - beta1 ** step) / denom

    def _record(self, group: dict, updates: list[torch.Tensor]) -> None:
        """Add the squares and count of a group's updates (lr not included) to its kind's sums, on the device."""
        if not updates:
            return
        sq = torch.stack([u.float().square().sum() for u in updates]).sum()
        if self.found_inf is not None:  # a step skipped on the device applied nothing
            sq = torch.where(self.found_inf == 0, sq, 0.0)
        sums = torch.stack([sq, sq.new_tensor(float(sum(u.numel() for u in updates)))])
        kind = group.get("kind", "all")
        self._update_sums[kind] = self._update_sums[kind] + sums if kind in self._update_sums else sums

    def update_rms(self) -> dict[str, float]:
        """update_rms/KIND: the RMS of the updates (before the learning rate) of this rank's share of each kind of
        parameter in the tracked steps since the last call (one host sync); then forgets them."""
        out = {f"update_rms/{kind}": math.sqrt(sq / n) if n else float("nan")
               for kind, (sq, n) in ((k, v.tolist()) for k, v in self._update_sums.items())}
        self._update_sums = {}
        return out


class GuardedMuon(GuardedAdamW):
    """Muon on the groups marked `muon` (param_groups), torch's AdamW on the others, with GuardedAdamW's checks
    and skip.

    The momentum is Keller Jordan's: m = beta m + (1 - beta) g, and the Nesterov blend (1 - beta) g + beta m is
    orthogonalised. Without ZeRO a group holds the module's own matrices. At ZeRO 1/2 DeepSpeed hands each group
    to the optimizer as one flat fp32 partition of the group's concatenated parameters, so a matrix may be split
    between ranks: `use_zero_partitions` records the layout, and the elementwise momentum stays partitioned (one
    state, sharded as Adam's moments are). Each step a rank orthogonalises the matrices that overlap its
    partition (for experts, each expert's matrix), assembled whole: its own pieces, and for a matrix split with
    other ranks of the group (the data-parallel group; for experts the expert-data-parallel one) their pieces,
    exchanged in one all-to-all in which every rank sends exactly the pieces its peers lack. A rank thus holds
    its partition plus at most the two matrices that cross its ends (`ondol plan` counts them), and a matrix
    split between ranks is orthogonalised on each of them.
    """

    def __init__(self, params, *, momentum: float, ns_steps: int, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.momentum, self.ns_steps = momentum, ns_steps
        # id of a Muon group's flat fp32 partition -> its ZeRO 1/2 layout (DeepSpeed steps one group at a time,
        # handing the optimizer a one-group list, so the partition, not a group index, identifies the group)
        self.partitions: dict[int, dict] = {}

    def __setstate__(self, state: dict) -> None:
        """torch's Adam reads a `step` from every parameter's state when a state dict is loaded; Muon's state
        holds only its momentum, so the AdamW entries alone go through it."""
        everything = state["state"]
        super().__setstate__({**state, "state": defaultdict(dict, {p: s for p, s in everything.items()
                                                                   if "momentum_buffer" not in s})})
        self.state = everything

    def use_zero_partitions(self, zero_optimizer) -> None:
        """Record, for each Muon group of DeepSpeedZeroOptimizer `zero_optimizer` (ZeRO 1/2), where its
        parameters lie in the flat buffer the partitions are cut from."""
        for i, group in enumerate(self.param_groups):
            if not group["muon"]:
                continue
            pg = zero_optimizer.real_dp_process_group[i]
            world = dist.get_world_size(group=pg)
            size = zero_optimizer.bit16_groups_flat[i].numel() // world
            params = zero_optimizer.round_robin_bit16_groups[i]
            matrices = [m for p, off in zip(params, zero_optimizer.round_robin_bit16_offsets[i])
                        for m in _orthogonalised(off, tuple(p.shape))]
            self.partitions[id(zero_optimizer.single_partition_of_fp32_groups[i])] = partition_layout(
                matrices, size, world, dist.get_rank(group=pg), pg)

    def _update(self, closure):
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group, self.partitions.get(id(group["params"][0])))
        return super()._update(closure)

    def _muon_step(self, group: dict, layout: dict | None) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        keep = None if self.found_inf is None else self.found_inf == 0  # a step skipped on the device
        blends = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            new = buf.lerp(p.grad, 1 - self.momentum)
            buf.copy_(new if keep is None else torch.where(keep, new, buf))
            blends.append(p.grad.lerp(new, self.momentum))
        if layout is None:
            updates = muon_updates(blends, self.ns_steps)
        else:
            updates = [self._partition_update(blends[0], layout)]
        if self.track_updates:
            self._record(group, updates)
        lr = group["lr"]
        shrink = 1 - lr * group["weight_decay"]
        for p, u in zip(params, updates):
            if keep is None:
                p.mul_(shrink).add_(u, alpha=-lr)
            else:  # a step skipped on the device applies neither the decay nor the update
                p.mul_(torch.where(keep, shrink, 1.0)).add_(torch.where(keep, u, 0.0), alpha=-lr)

    def _partition_update(self, blend: torch.Tensor, layout: dict) -> torch.Tensor:
        """This rank's partition of the group's update, from its partition of the blended momentum."""
        start, end, mine = layout["start"], layout["start"] + layout["size"], layout["mine"]
        whole = [blend.new_empty(math.prod(shape)) for _, shape in mine]
        for w, (off, shape) in zip(whole, mine):  # this rank's own pieces
            lo, hi = max(off, start), min(off + w.numel(), end)
            w[lo - off:hi - off] = blend[lo - start:hi - start]
        if layout["split"]:  # some matrix of the group crosses a partition boundary: every rank takes part
            sent = [blend[lo - start:hi - start] for pieces in layout["send"] for _, lo, hi in pieces]
            received = blend.new_empty(sum(layout["in_sizes"]))
            dist.all_to_all_single(received, torch.cat(sent) if sent else blend.new_empty(0), layout["in_sizes"],
                                   layout["out_sizes"], group=layout["group"])
            at = 0
            for pieces in layout["receive"]:
                for i, lo, hi in pieces:
                    off = mine[i][0]
                    whole[i][lo - off:hi - off] = received[at:at + hi - lo]
                    at += hi - lo
        updates = muon_updates([w.view(shape) for w, (_, shape) in zip(whole, mine)], self.ns_steps)
        out = torch.zeros_like(blend)
        for (off, shape), u in zip(mine, updates):
            lo, hi = max(off, start), min(off + math.prod(shape), end)
            out[lo - start:hi - start] = u.reshape(-1)[lo - off:hi - off]
        return out


def partition_layout(matrices: list[tuple[int, tuple[int, int]]], size: int, world: int, rank: int,
                     group) -> dict:
    """What GuardedMuon's ZeRO 1/2 step needs of a group, derived once from where its matrices (offset, [A, B])
    lie in the flat buffer cut into `world` partitions of `size` elements: this rank's partition, the matrices
    overlapping it (`mine`), whether any matrix of the group crosses a boundary (`split`: then every rank of
    `group` takes part in the exchange) and, if so, the exchange's pieces and sizes per peer."""
    start = rank * size
    mine = [(off, shape) for off, shape in matrices if off < start + size and off + math.prod(shape) > start]
    layout = {"group": group, "world": world, "size": size, "start": start, "mine": mine,
              "split": any(off // size != (off + math.prod(shape) - 1) // size for off, shape in matrices)}
    if layout["split"]:
        send, receive = matrix_exchange(mine, size, world, rank)
        layout.update(send=send, receive=receive,
                      out_sizes=[sum(hi - lo for _, lo, hi in pieces) for pieces in send],
                      in_sizes=[sum(hi - lo for _, lo, hi in pieces) for pieces in receive])
    return layout


def matrix_exchange(mine: list[tuple[int, tuple[int, ...]]], size: int, world: int, rank: int
                    ) -> tuple[list[list[tuple[int, int, int]]], list[list[tuple[int, int, int]]]]:
    """(send, receive): for each rank q of the group, the pieces (index in `mine`, start, end in the group's flat
    buffer) this rank sends to q and receives from q, in matrix order. `mine`: the matrices (offset, shape) that
    overlap this rank's partition of `size` elements; a matrix is needed by every rank it overlaps, and each of
    them holds the piece inside its partition."""
    send: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]
    receive: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]
    for i, (off, shape) in enumerate(mine):
        end = off + math.prod(shape)
        for q in range(off // size, min((end - 1) // size, world - 1) + 1):
            if q != rank:
                send[q].append((i, max(off, rank * size), min(end, (rank + 1) * size)))
                receive[q].append((i, max(off, q * size), min(end, (q + 1) * size)))
    return send, receive
