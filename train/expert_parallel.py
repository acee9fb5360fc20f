"""Expert parallelism on DeepSpeed's process groups, applied from outside the plain-PyTorch model.

`apply_expert_parallel(model, ep_size, zero_stage)` replaces each MoE layer's `experts` (a `GroupedExperts`
holding all E experts) with an `ExpertParallelExperts` holding E / ep_size of them. The MoE layer still routes,
sorts token copies by expert and calls `experts(x_sorted, counts)`; the replacement exchanges counts, sends each
rank's rows to the ranks owning their experts with a variable-split all-to-all (dropless), runs its local experts
and sends the results back (autograd runs the reverse all-to-alls). Router, shared experts, attention and
embeddings stay data-parallel.

Ranks are grouped as DeepSpeed does (`deepspeed.utils.groups`, group name `ep_size_N`): expert-parallel groups
of consecutive ranks [0..N-1], [N..2N-1], ...; expert-data-parallel groups of ranks holding the same experts.
Expert parameters carry `allreduce=False` and `group_name`, so DeepSpeed reduces (ZeRO 0) or reduces and
partitions (ZeRO 1/2) them within their expert-data-parallel group and averages by the full data-parallel size.
ZeRO 3 is refused: DeepSpeed partitions every parameter over the whole data-parallel group there.
Gradient clipping: ZeRO 1/2 compute the global norm over all partitions, expert shards included; at ZeRO 0
DeepSpeed averages per-rank norms instead, so there the optimizer clips with `clip_grad_norm_` here.

Expert weights are not in DeepSpeed's model file (it drops the keys of its MoE layers); `save_expert_shards`
writes one safetensors file per expert-parallel rank in the model's standard layout, and
`full_state_dict_from_checkpoint` / `checkpoint_load_fn` rebuild or re-slice them for any EP size.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ondol.model.moe import GroupedExperts

SUPPORTED_ZERO_STAGES = (0, 1, 2)
SHARD_GLOB = "expert_shard_*.safetensors"
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel / expert-data-parallel groups of size ep_size."""
    return f"ep_size_{ep_size}"


def check_expert_parallel(ep_size: int, n_experts: int, world_size: int, zero_stage: int) -> None:
    """Refuse expert-parallel layouts that cannot work, with the config key to change."""
    if ep_size < 1:
        raise ValueError(f"deepspeed.expert_parallel_size must be >= 1, got {ep_size}")
    if ep_size == 1:
        return
    if n_experts == 0:
        raise ValueError(f"deepspeed.expert_parallel_size={ep_size} needs an MoE model (model.n_experts is 0): "
                         "set deepspeed.expert_parallel_size=1")
    if n_experts % ep_size:
        raise ValueError(f"deepspeed.expert_parallel_size={ep_size} must divide model.n_experts={n_experts} "
                         "(every rank of an expert-parallel group holds the same number of experts)")
    if world_size % ep_size:
        raise ValueError(f"deepspeed.expert_parallel_size={ep_size} must divide the world size {world_size} "
                         "(ranks form whole expert-parallel groups)")
    if zero_stage not in SUPPORTED_ZERO_STAGES:
        raise ValueError(f"deepspeed.zero_stage={zero_stage} is not supported with deepspeed.expert_parallel_size="
                         f"{ep_size}: use ZeRO stage 0, 1 or 2 (ZeRO 3 partitions every parameter over the whole "
                         "data-parallel group, not the expert-data-parallel group)")


@dataclass
class CommStats:
    """Per-layer all-to-all counters, accumulated until `expert_parallel_metrics` reads and resets them."""
    tokens_sent: int = 0  # token copies sent to other ranks (forward)
    tokens_received: int = 0  # token copies received from other ranks (forward)
    host_s: float = 0.0  # time inside host (gloo) all-to-alls, which return when their work is done
    cuda_events: list = field(default_factory=list)  # (start, end) around each CUDA all-to-all on its stream

    @contextlib.contextmanager
    def timed(self, device: torch.device):
        """Time what runs inside. On CUDA an all-to-all returns before its work is done, so the time is taken
        between events on the compute stream, which waits for the collective: no host sync here; `seconds`
        reads them when the metrics are logged."""
        if device.type != "cuda":
            t0 = time.perf_counter()
            yield
            self.host_s += time.perf_counter() - t0
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.cuda_events.append((start, end))

    def seconds(self) -> float:
        """Wall time inside all-to-alls, forward and backward (waits for the last recorded one to finish)."""
        if self.cuda_events:
            self.cuda_events[-1][1].synchronize()
        return self.host_s + sum(start.elapsed_time(end) for start, end in self.cuda_events) / 1e3


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """all_to_all_single as a functional collective: its output is a new tensor made by one op, which
    selective checkpointing keeps (train/fast_paths.py) instead of running the collective again in the
    backward."""
    collectives = torch.ops._c10d_functional
    out = collectives.all_to_all_single(x.contiguous(), out_splits, in_splits, group.group_name)
    return collectives.wait_tensor(out)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, stats: CommStats
                ) -> torch.Tensor:
    with stats.timed(x.device):
        out = _exchange(x, out_splits, in_splits, group)
    return out


class AllToAll(torch.autograd.Function):
    """Variable-split all-to-all whose backward sends the gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, stats):
        ctx.route = (out_splits, in_splits, group, stats)
        return _all_to_all(x, out_splits, in_splits, group, stats)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits, group, stats = ctx.route
        return _all_to_all(grad, in_splits, out_splits, group, stats), None, None, None, None


class ExpertParallelExperts(DeepSpeedMoE, GroupedExperts):
    """This rank's E / ep_size experts of one MoE layer, fed by all-to-all from its expert-parallel group.

    A GroupedExperts with the expert dimension sliced: parameter names, and so state-dict keys, are the
    unsharded model's. Also a DeepSpeed MoE, only so that the engine recognises an MoE model and switches on
    its expert-data-parallel gradient reduction; none of DeepSpeed's MoE machinery (gate, capacity, experts)
    is used, and its constructor is skipped.
    """

    def __init__(self, experts: GroupedExperts, ep_group_name: str) -> None:
        group = groups._get_expert_parallel_group(ep_group_name)
        ep_size, ep_rank = dist.get_world_size(group), dist.get_rank(group)
        n_experts, two_hidden, dim = experts.gate_up_proj.shape
        self.n_local = n_experts // ep_size
        self.expert_start = ep_rank * self.n_local
        source = experts.gate_up_proj.device
        with torch.device(source):  # a meta build stays on meta: the trainer materialises only this slice
            GroupedExperts.__init__(self, self.n_local, dim, two_hidden // 2, experts.dispatch, self.expert_start)
        self.group, self.ep_size, self.ep_rank = group, ep_size, ep_rank
        owned = slice(self.expert_start, self.expert_start + self.n_local)
        if source.type != "meta":
            with torch.no_grad():
                for name in EXPERT_PARAMS:
                    getattr(self, name).copy_(getattr(experts, name)[owned])
        for name in EXPERT_PARAMS:
            p = getattr(self, name)
            p.allreduce = False  # DeepSpeed: reduce within the expert-data-parallel group named below
            p.group_name = ep_group_name
        # Attributes DeepSpeed's engine reads from its MoE layers. num_local_experts = 0 tells its checkpoint
        # code there are no per-expert files of its own format to write or read (its parser would look for
        # "expert" in our relative keys, which are gate_up_proj / down_proj); save_expert_shards writes ours.
        self.num_experts = n_experts
        self.expert_group_name = ep_group_name
        self.num_local_experts = 0
        self.stats = CommStats()

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine; the groups already exist (apply_expert_parallel made them)."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [n, D]: this rank's token copies sorted by expert, counts [E] -> expert outputs in the same order."""
        ep, L = self.ep_size, self.n_local
        send_counts = counts.view(ep, L)
        recv_counts = _exchange(send_counts, [1] * ep, [1] * ep, self.group)  # [i, l]: rank i -> my expert l
        # The layer's one host sync: all_to_all_single takes its split sizes as Python ints. A fixed-size
        # exchange would need none, but a dropless one must then pad every split to the worst case (all of a
        # rank's copies to one rank: ep_size times the traffic), and a capacity limit drops tokens.
        in_splits, out_splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        # evaluation traffic is not training's, nor is an activation-checkpoint recompute's (which only full
        # checkpointing sends; selective keeps the forward's all-to-alls)
        counted = self.training and torch._C._current_graph_task_id() == -1
        stats = self.stats if counted else CommStats()
        stats.tokens_sent += sum(in_splits) - in_splits[self.ep_rank]
        stats.tokens_received += sum(out_splits) - out_splits[self.ep_rank]

        received = AllToAll.apply(x, out_splits, in_splits, self.group, stats)
        # Received rows are grouped by source rank, then by local expert; the experts want them by expert.
        expert_of = torch.arange(L, device=x.device).repeat(ep).repeat_interleave(recv_counts.flatten(),
                                                                                  output_size=sum(out_splits))
        order = torch.argsort(expert_of, stable=True)
        y_local = GroupedExperts.forward(self, received[order], recv_counts.sum(0))
        y_received = torch.empty_like(y_local).index_copy(0, order, y_local)
        return AllToAll.apply(y_received, in_splits, out_splits, self.group, stats)


def apply_expert_parallel(model: nn.Module, ep_size: int, zero_stage: int) -> str | None:
    """Shard the experts of every `model.moe_layers()` layer over expert-parallel groups of ep_size ranks.

    Call after deepspeed.init_distributed and before deepspeed.initialize, either on a model built on the meta
    device (the slices stay on meta, to be materialised and initialised by the caller: the trainer) or on one
    built identically on every rank (same seed), so each rank keeps its slice of the same initial experts.
    Returns the DeepSpeed group name (None for ep_size 1, which leaves the model untouched).
    """
    layers = model.moe_layers()
    n_experts = layers[0].cfg.n_experts if layers else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_expert_parallel(ep_size, n_experts, world, zero_stage)
    if ep_size == 1:
        return None
    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    for moe in layers:
        moe.experts = ExpertParallelExperts(moe.experts, name)
    return name


def expert_parallel_layers(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


def optimizer_param_groups(param_groups: list[dict]) -> list[dict]:
    """Split expert parameters into their own groups (`moe: True`, named by DeepSpeed group) as DeepSpeed's ZeRO
    optimizers require; each group keeps its other settings (lr, weight_decay). Pass the result to the client
    optimizer given to deepspeed.initialize."""
    named = [{**g, "name": g.get("name", f"group{i}")} for i, g in enumerate(param_groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)


# ----- metrics and gradient clipping ----------------------------------------------------------------------

def expert_parallel_metrics(model: nn.Module, seconds: float, steps: float) -> dict[str, float]:
    """All-to-all traffic and time since the last call (summed over layers), per optimizer step, mean and max
    over ranks, then reset. Collective over the world when distributed; empty without expert parallelism."""
    layers = list(expert_parallel_layers(model).values())
    if not layers:
        return {}
    device = layers[0].gate_up_proj.device  # nccl reduces GPU tensors only
    stats = [layer.stats for layer in layers]
    for layer in layers:
        layer.stats = CommStats()
    local = torch.tensor([sum(s.tokens_sent for s in stats), sum(s.tokens_received for s in stats),
                          sum(s.seconds() for s in stats)], dtype=torch.float64, device=device)
    local /= torch.tensor([steps, steps, seconds], dtype=torch.float64, device=device).clamp_min(1e-9)
    total, peak = local.clone(), local.clone()
    if dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        total /= dist.get_world_size()
    out = {}
    for i, key in enumerate(("tokens_sent_per_step", "tokens_received_per_step", "all_to_all_share")):
        out[f"ep/{key}"], out[f"ep/{key}_max"] = float(total[i]), float(peak[i])
    return out


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip to the global gradient norm of the whole (sharded) model; returns that norm, the same on every
    rank. After DeepSpeed's reduction dense gradients are identical on every rank and each expert gradient is
    identical within its expert-data-parallel group, so the expert part of the squared norm is summed over
    the expert-parallel group. Without expert parameters this is torch's clip_grad_norm_."""
    params = [p for p in params if p.grad is not None]
    experts = [p for p in params if getattr(p, "allreduce", True) is False]
    dense = [p for p in params if getattr(p, "allreduce", True) is not False]
    if not experts:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def sq_norm(ps: list[torch.Tensor]) -> torch.Tensor:
        if not ps:
            return torch.zeros((), device=experts[0].grad.device)
        return torch.nn.utils.get_total_norm([p.grad for p in ps], foreach=True).float().square()

    expert_sq = sq_norm(experts)
    dist.all_reduce(expert_sq, group=groups._get_expert_parallel_group(experts[0].group_name))
    norm = (sq_norm(dense) + expert_sq).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


# ----- checkpoints: expert shards in the model's standard layout -------------------------------------------

def save_expert_shards(model: nn.Module, ckpt_dir: str | Path) -> None:
    """Write this expert-parallel rank's experts (one writer per expert-data-parallel group) to
    ckpt_dir/expert_shard_RR_of_NN.safetensors, keys in the standard layout. Collective: call on every rank
    after engine.save_checkpoint (ckpt_dir = save_dir/tag)."""
    layers = expert_parallel_layers(model)
    if not layers:
        return
    first = next(iter(layers.values()))
    if groups._get_expert_data_parallel_rank(first.expert_group_name) == 0:
        tensors = {f"{prefix}.{name}": getattr(layer, name).detach().contiguous().cpu()
                   for prefix, layer in layers.items() for name in EXPERT_PARAMS}
        meta = {"expert_start": first.expert_start, "n_local": first.n_local, "n_experts": first.num_experts,
                "ep_size": first.ep_size}
        path = Path(ckpt_dir) / f"expert_shard_{first.ep_rank:02d}_of_{first.ep_size:02d}.safetensors"
        save_file(tensors, str(path), metadata={"ondol_expert_shard": json.dumps(meta)})
    dist.barrier()


def read_expert_shards(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full expert weights [E, ...] of every MoE layer, concatenated from a checkpoint's shard files.
    Empty if the checkpoint has none (written at EP 1: the experts are in DeepSpeed's model file)."""
    paths = sorted(Path(ckpt_dir).glob(SHARD_GLOB))
    if not paths:
        return {}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    sizes = set()
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["ondol_expert_shard"])
            sizes.add((meta["ep_size"], meta["n_experts"]))
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                pieces.setdefault(key, []).append((meta["expert_start"], f.get_tensor(key)))
    (ep_size, n_experts), = sizes if len(sizes) == 1 else [(None, None)]
    if ep_size is None or len(paths) != ep_size:
        raise ValueError(f"{ckpt_dir}: expert shard files disagree or are missing ({[p.name for p in paths]}); "
                         "expected one expert_shard_RR_of_NN file per expert-parallel rank of one save")
    full = {key: torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])]) for key, parts in pieces.items()}
    bad = [k for k, v in full.items() if v.shape[0] != n_experts]
    if bad:
        raise ValueError(f"{ckpt_dir}: expert shards of {bad[:3]} do not cover {n_experts} experts")
    return full


def full_state_dict_from_checkpoint(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The standard (unsharded) state dict of a DeepSpeed checkpoint folder save_dir/tag written at any EP size
    with ZeRO 0-2: DeepSpeed's model file plus the expert shards. For export and evaluation at EP 1."""
    model_file = Path(ckpt_dir) / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} not found: point at a checkpoint tag folder (save_dir/tag)")
    module = torch.load(model_file, map_location="cpu", weights_only=True)["module"]
    return {**module, **read_expert_shards(ckpt_dir)}


def to_local_layout(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A standard state dict with each expert tensor sliced to the experts `model`'s rank owns."""
    out = dict(full)
    for prefix, layer in expert_parallel_layers(model).items():
        owned = slice(layer.expert_start, layer.expert_start + layer.n_local)
        for name in EXPERT_PARAMS:
            out[f"{prefix}.{name}"] = out[f"{prefix}.{name}"][owned]
    return out


def checkpoint_load_fn(ckpt_dir: str | Path):
    """`custom_load_fn` for engine.load_checkpoint(save_dir, tag, custom_load_fn=...): loads DeepSpeed's model
    state plus this rank's slice of the expert shards (any EP size at save time), strictly."""
    experts = read_expert_shards(ckpt_dir)

    def load(src: dict[str, torch.Tensor], dst: nn.Module) -> None:
        dst.load_state_dict(to_local_layout(dst, {**src, **experts}), strict=True)

    return load


@torch.no_grad()
def full_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`state` (default: the model's state dict; or e.g. the trainer's fp32 master weights under the same
    names) in the standard layout, every layer's experts gathered from its expert-parallel group. Collective
    over the group; for model.io.save_pretrained(state_dict=...) and export."""
    sd = dict(model.state_dict() if state is None else state)
    for prefix, layer in expert_parallel_layers(model).items():
        for name in EXPERT_PARAMS:
            local = sd[f"{prefix}.{name}"]
            comm_device = getattr(layer, name).device  # nccl gathers on the GPU even if `state` is on CPU
            parts = [torch.empty_like(local, device=comm_device) for _ in range(layer.ep_size)]
            dist.all_gather(parts, local.to(comm_device).contiguous(), group=layer.group)
            sd[f"{prefix}.{name}"] = torch.cat(parts).to(local.device)
    return sd
