"""The fp32 weights (and Adam state) as per-rank safetensors shards, written by every rank for what it owns and
read back into any layout: the final weights (RUN_DIR/model), and the part of a checkpoint that lets a run resume
on another world size, expert-parallel size or ZeRO stage.

Who writes what: a layer's experts are written by the ranks of the first expert-data-parallel replica (ranks
0..ep-1: DeepSpeed's expert-parallel groups are consecutive ranks), each its own slice; every other tensor (dense
parameters, persistent buffers) by one rank, assigned greedily by size so the files come out balanced. The
values are the fp32 master weights and optimizer moments, gathered one parameter at a time from the ZeRO
partitions (a collective of that parameter's data-parallel group): no rank holds more than its own share plus
one parameter. The layout on disk is model/io.py's (`model.index.json` + `model-RRRRR-of-WWWWW.safetensors`, or
one `model.safetensors` for a single rank); the optimizer state goes to `optim.*` files of the same layout, under
the keys NAME.exp_avg and NAME.exp_avg_sq (AdamW's moments) or NAME.momentum_buffer (Muon's one state).

Resharding (`load`) reads each rank's own rows of every tensor, sets the module's weights, DeepSpeed's fp32
partitions (`safe_set_full_fp32_param`) and optimizer state (`safe_set_full_optimizer_state`), and the Adam step
count. It is our own rather than DeepSpeed's universal checkpoint because the experts are not in DeepSpeed's
files (see train/expert_parallel.py) and because these shards are needed anyway for the final weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from ondol.files import atomic_path
from ondol.model.io import INDEX, WEIGHTS, TensorInfo, read_tensor, shard_name, tensor_index, write_index
from ondol.train.expert_parallel import expert_parallel_layers
from ondol.train.optim import state_keys

OPTIM_INDEX, OPTIM_SINGLE = "optim.index.json", "optim.safetensors"


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is a parameter) for the parameters and persistent buffers, in module order."""
    persistent = set(module.state_dict(keep_vars=True))  # router biases yes, load counters no
    out = [(n, p, True) for n, p in module.named_parameters()]
    return out + [(n, b, False) for n, b in module.named_buffers() if n in persistent]


def _expert_slices(module: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Expert parameter name -> (first expert here, experts here, experts in the layer)."""
    return {f"{prefix}.{name}": (layer.expert_start, layer.n_local, layer.num_experts)
            for prefix, layer in expert_parallel_layers(module).items() for name in ("gate_up_proj", "down_proj")}


def _owners(entries: list[tuple[str, torch.Tensor, bool]], slices: dict, world: int) -> dict[str, int]:
    """Writer rank of each whole tensor: the least-loaded rank so far, in module order (the same on every rank)."""
    load, owner = [0] * world, {}
    for name, t, _ in entries:
        if name not in slices:
            owner[name] = min(range(world), key=load.__getitem__)
            load[owner[name]] += getattr(t, "ds_numel", t.numel())
    return owner


def _full_shape(t: torch.Tensor) -> list[int]:
    return list(getattr(t, "ds_shape", t.shape))


def _value(p: torch.Tensor, is_param: bool, optimizer, key: str | None) -> torch.Tensor:
    """fp32 master weight (key None) or Adam moment of one whole parameter (this rank's expert slice); a
    collective over the parameter's data-parallel group under ZeRO or the bf16 optimizer."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if not is_param:
        return p.detach()
    try:
        got = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    except ValueError:  # DeepSpeed's optimizer has applied no update yet (every step so far was skipped)
        return torch.zeros(_full_shape(p), dtype=torch.float32, device=p.device)
    if got is not None:
        return got.float()
    if key is None:
        return p.detach().float()
    state = optimizer.state.get(p, {})  # fp32 without ZeRO: the client optimizer holds the state itself
    return state[key] if key in state else torch.zeros_like(p, dtype=torch.float32)


def save(engine, optimizer, folder: Path, rank: int, world: int, with_optimizer: bool) -> None:
    """Collective: every rank writes its own shard of the weights (and with_optimizer, of the Adam moments) to
    `folder`; rank 0 then writes the indexes. The caller fsyncs and marks completion."""
    from deepspeed.utils import groups

    module = engine.module
    entries, slices = _tensors(module), _expert_slices(module)
    owner = _owners(entries, slices, world)
    writes_experts = not slices or groups._get_expert_data_parallel_rank(
        next(iter(expert_parallel_layers(module).values())).expert_group_name) == 0
    if with_optimizer and engine.optimizer is not optimizer:
        _link_moments(engine)
    single = world == 1
    model_file = WEIGHTS if single else shard_name("model", rank, world)
    optim_file = OPTIM_SINGLE if single else shard_name("optim", rank, world)
    mine, moments = {}, {}
    for name, t, is_param in entries:
        keep = writes_experts if name in slices else owner[name] == rank
        value = _value(t, is_param, optimizer, None)
        if keep:
            mine[name] = value.detach().contiguous().cpu()
        for key in state_keys(t) if with_optimizer and is_param else ():
            value = _value(t, is_param, optimizer, key)
            if keep:
                moments[f"{name}.{key}"] = value.detach().contiguous().cpu()
        del value
    folder.mkdir(parents=True, exist_ok=True)
    for tensors, file in ((mine, model_file), (moments, optim_file)):
        if tensors:
            with atomic_path(folder / file) as tmp:
                save_file(tensors, str(tmp), metadata={"format": "pt"})
    del mine, moments
    if dist.is_initialized():
        dist.barrier()
    if rank == 0 and not single:
        write_index(folder, _index(entries, slices, owner, world, "model"))
        if with_optimizer:
            params = {name: t for name, t, is_param in entries if is_param}
            write_index(folder, {f"{name}.{key}": info for name, info in
                                 _index([e for e in entries if e[2]], slices, owner, world, "optim").items()
                                 for key in state_keys(params[name])}, OPTIM_INDEX)


def _index(entries, slices: dict, owner: dict[str, int], world: int, prefix: str) -> dict[str, TensorInfo]:
    """Where every tensor's pieces are, computed from the ownership rules (no file is read)."""
    out = {}
    for name, t, _ in entries:
        if name in slices:
            _, n, total = slices[name]
            out[name] = TensorInfo([total, *_full_shape(t)[1:]],
                                   [(shard_name(prefix, r, world), r * n) for r in range(total // n)])
        else:
            out[name] = TensorInfo(_full_shape(t), [(shard_name(prefix, owner[name], world), 0)])
    return out


def _link_moments(engine) -> None:
    """Point every parameter's fragment at its Adam moments (ZeRO 1/2, bf16 optimizer). DeepSpeed links them
    once, right after the first parameter group's first step, when the later groups have no state yet, so those
    would stay unlinked and `safe_get_full_optimizer_state` would fail for them. (ZeRO 3 looks moments up
    itself.)"""
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def has_shards(folder: Path) -> bool:
    return (folder / INDEX).is_file() or (folder / WEIGHTS).is_file()


def adam_step_state(p: torch.Tensor, steps: int, fused: bool, capturable: bool) -> torch.Tensor:
    """AdamW's `step` entry for parameter p after `steps` updates, where and as torch's AdamW creates it: on p's
    device for the fused and capturable kernels (which read it there; CUDA's fused kernel rejects a host
    tensor), on the host otherwise (torch reads it there without waiting for the device)."""
    from torch.optim.optimizer import _get_scalar_dtype

    return torch.tensor(float(steps), dtype=_get_scalar_dtype(is_fused=fused),
                        device=p.device if fused or capturable else "cpu")


@torch.no_grad()
def load(engine, optimizer, folder: Path, adam_steps: int | None) -> None:
    """Set this rank's weights, fp32 master partitions and optimizer state (Adam's moments and `adam_steps`
    applied updates, or Muon's momentum) from shards written at any world size, expert-parallel size and ZeRO
    stage; with adam_steps None the weights only, the optimizer left as new (train.init_from). No collective,
    except at ZeRO 3: one broadcast per parameter, whose module partition is re-split from the whole value."""
    from deepspeed import zero
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    module = engine.module
    weights = tensor_index(folder)
    with_optimizer = adam_steps is not None
    moments = tensor_index(folder, OPTIM_INDEX, OPTIM_SINGLE) if with_optimizer else {}
    partitioned = engine.optimizer is not optimizer  # ZeRO 1-3 or bf16: DeepSpeed's fp32 partitions
    # Adam state as after `adam_steps` updates, moments set below; ZeRO 3 keeps it on its flat fp32 partitions
    # (Muon, at ZeRO 0-2 only, has just its momentum)
    zero3_flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    fused, capturable = bool(optimizer.defaults.get("fused")), bool(optimizer.defaults.get("capturable"))
    if with_optimizer:
        for muon, p in ([(False, p) for p in zero3_flat or []] or
                        [(group.get("muon", False), p) for group in optimizer.param_groups for p in group["params"]]):
            optimizer.state[p] = ({"momentum_buffer": torch.zeros_like(p)} if muon else
                                  {"step": adam_step_state(p, adam_steps, fused, capturable),
                                   "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)})
        if partitioned:
            _link_moments(engine)
    slices = _expert_slices(module)
    for name, t, is_param in _tensors(module):
        rows = (slices[name][0], slices[name][0] + slices[name][1]) if name in slices else None
        value = read_tensor(folder, weights[name], name, rows)
        with zero.GatheredParameters([t], modifier_rank=0, enabled=hasattr(t, "ds_id")):
            t.data.copy_(value.to(t.dtype))
        if not is_param:
            continue
        safe_set_full_fp32_param(t, value)
        if not with_optimizer:
            continue
        for key in state_keys(t):
            moment = read_tensor(folder, moments[f"{name}.{key}"], f"{name}.{key}", rows)
            if partitioned:
                safe_set_full_optimizer_state(t, moment, key)
            else:
                optimizer.state[t][key].copy_(moment)
