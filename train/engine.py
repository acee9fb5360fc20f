"""The distributed environment and the DeepSpeed engine: the same code on CPU (gloo) and GPU (nccl).

A process started without a launcher gets the single-rank environment variables here, so DeepSpeed never
falls back to MPI discovery (mpi4py).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from ondol.configs import RunConfig
from ondol.train.deepspeed_log import build_output_to
from ondol.train.optim import GuardedAdamW, GuardedMuon, param_groups
from ondol.train.zero_step import move_zero_checks_to_device


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: RunConfig) -> DistEnv:
    """Join (or, alone, create) the process group; one device per rank."""
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    cuda = torch.cuda.is_available()
    backend = cfg.deepspeed.backend if cfg.deepspeed.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise RuntimeError("deepspeed.backend=nccl needs a GPU; set deepspeed.backend=gloo (or auto) on CPU")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # DeepSpeed's op-probe output goes to RUN_DIR/logs, not the console
        with build_output_to(Path(cfg.run_dir) / "logs" / f"deepspeed-rank{os.environ['RANK']}.log"):
            if not cuda:
                skip_shared_memory_op()
            deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=cfg.deepspeed.timeout_minutes))
    return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), device, backend)


def cpu_threads(setting: int, resumed: int | None = None) -> tuple[int, str]:
    """The intra-op threads of a CPU rank for train.cpu_threads, and where the number comes from. Auto: the
    launcher's OMP_NUM_THREADS, else the count the resumed checkpoint's run used (a resume repeats its sums
    exactly), else the cores of this process's affinity mask that no other process keeps busy, at least one."""
    if setting:
        return setting, "train.cpu_threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), "auto: OMP_NUM_THREADS"
    if resumed:
        return resumed, "auto: the resumed checkpoint's"
    cores = len(os.sched_getaffinity(0))
    free = max(1, min(cores, round(cores - busy_cores())))
    return free, f"auto: {free} of {cores} cores free at start"


def busy_cores(window_s: float = 0.3) -> float:
    """How many cores the machine's other processes keep busy, measured over `window_s` while this one waits
    (/proc/stat; 0 where it cannot be read)."""
    def jiffies() -> tuple[int, int]:  # (busy, total) over all CPUs
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)  # idle and iowait are not busy
    try:
        busy0, total0 = jiffies()
        time.sleep(window_s)
        busy1, total1 = jiffies()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


def skip_shared_memory_op() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory all-reduce op at init_distributed. It serves only
    DeepSpeed's inference engine (inference_all_reduce), never training, and its build runs under a file lock in
    ~/.cache/torch_extensions: ~30 s on a machine's first run, again whenever the compile flags differ (a Slurm
    task's CPU set), and a rank killed while building leaves the lock behind, so every later run on that machine
    waits on it forever. DeepSpeed keeps one compatibility dict for the process and reads it before building."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """DeepSpeed's JSON config from the typed one; `deepspeed.extra` is merged last (it wins)."""
    ds, tr = cfg.deepspeed, cfg.train
    stage = deepspeed_zero_stage(ds)
    clip_in_deepspeed = stage != 0  # else GuardedAdamW clips
    config = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum,
        "train_batch_size": tr.micro_batch_size * tr.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip if clip_in_deepspeed else 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # GuardedAdamW is torch's AdamW plus a skip flag
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if ds.precision == "bf16":  # at ZeRO 1/2 train/zero_step.py's device-side flag replaces the overflow check
        config["bf16"] = {"enabled": True, "check_grad_overflow": not checks_on_device(cfg)}
    if stage == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    return _merge(config, ds.extra)


def deepspeed_zero_stage(ds) -> int:
    """The ZeRO stage DeepSpeed runs: deepspeed.zero_stage, except that bf16 at stage 0 runs stage 1. DeepSpeed
    gives bf16 without ZeRO to FP16_UnfusedOptimizer (engine.py `_do_optimizer_sanity_check` -> DDP_BFLOAT16 ->
    `_configure_fp16_optimizer`: an fp32 master copy, a norm and a host sync per parameter tensor); its stage 1
    keeps the same fp32 master weights in one flat partition per group, which on one rank is the whole model,
    and takes train/zero_step.py's step. On several ranks the optimizer state is sharded as well."""
    return 1 if ds.zero_stage == 0 and ds.precision == "bf16" else ds.zero_stage


def checks_on_device(cfg: RunConfig) -> bool:
    """Whether the ZeRO 1/2 optimizer step takes its norm, clipping and non-finite check from
    train/zero_step.py (deepspeed.zero_checks=device)."""
    return deepspeed_zero_stage(cfg.deepspeed) in (1, 2) and cfg.deepspeed.zero_checks == "device"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_model(cfg: RunConfig, env: DistEnv):
    """The model with only what this rank owns materialised, in fp32 on env.device.

    Built on the meta device (no memory), experts sharded over their expert-parallel group while still on
    meta, then this rank's tensors allocated and initialised: its E / expert_parallel_size experts per MoE layer
    and the dense parameters. At ZeRO 3 the model is built under DeepSpeed's zero.Init instead (see
    `_build_partitioned`), so no rank ever holds more than its partition plus one gathered tensor. The initial
    values are the same for every layout (Transformer.init_parameter seeds each tensor, and each expert, from
    cfg.seed and its name), so expert-parallel sizes and ZeRO stages all start from the same weights."""
    from ondol.model.transformer import Transformer
    from ondol.train import expert_parallel

    ds = cfg.deepspeed
    if ds.zero_stage == 3:
        return _build_partitioned(cfg, env)
    with torch.device("meta"):
        model = Transformer(cfg.model, seed=cfg.seed)
    expert_parallel.apply_expert_parallel(model, ds.expert_parallel_size, ds.zero_stage)
    _materialize(model, env.device)
    model.reset_parameters(cfg.seed)
    return model


def _build_partitioned(cfg: RunConfig, env: DistEnv):
    """ZeRO 3: every parameter partitioned over the ranks as soon as its module exists (deepspeed.zero.Init),
    then initialised one gathered parameter at a time, drawn in fp32 on rank 0 exactly as a whole build draws it
    and cast to the partition's dtype. zero.Init creates floating buffers in that dtype too (bf16 under
    deepspeed.precision=bf16) where DeepSpeed leaves every other layout's in fp32 (it casts parameters only), so
    they are made fp32 again and recomputed."""
    import deepspeed

    from ondol.model.transformer import Transformer
    from ondol.train import expert_parallel

    ds = cfg.deepspeed
    expert_parallel.check_expert_parallel(ds.expert_parallel_size, cfg.model.n_experts, env.world_size, 3)
    # dtype from the DeepSpeed config: zero.Init's own dtype argument falls back to bf16 on CPU
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, env.world_size)):
        model = Transformer(cfg.model, seed=cfg.seed)  # its own init sees empty partitions: the loop below draws
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            if env.rank == 0:
                full = torch.empty(p.shape, dtype=torch.float32, device=p.device)
                model.init_parameter(name, full, cfg.seed)
                p.copy_(full)
    for module in model.modules():
        for key, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                module._buffers[key] = b.float()
    model.reset_buffers()
    return model


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate (uninitialised) every meta parameter and buffer on `device`. Unlike Module.to_empty, parameters
    keep their attributes (expert parallelism's `allreduce`, `group_name`) and tied parameters stay tied."""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in done:
                    new = torch.empty_like(t, device=device)
                    if isinstance(t, torch.nn.Parameter):
                        new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                        new.__dict__.update(t.__dict__)
                    done[id(t)] = new
                table[key] = done[id(t)]


def build_engine(model: torch.nn.Module, cfg: RunConfig, env: DistEnv):
    """(engine, optimizer): the model (from `build_model`) wrapped by DeepSpeed with GuardedAdamW over
    decay/no-decay groups, or with optim.name=muon GuardedMuon (Muon's matrices, then those groups).

    Muon is train/optim.py's rather than DeepSpeed 0.19.8's MuonWithAuxAdam: DeepSpeed's ZeRO 1/2 orthogonalises
    while it partitions gradients, before the gradient norm, so clipping and the non-finite skip (zero_step.py)
    would act on the orthogonalised update and a skipped step would still move the momentum; its bf16 path
    takes dense 2-D matrices only; its shape scaling, sqrt(max(1, A / B)), needs its own learning rate where
    Moonlight's lets AdamW's transfer; and its momentum lives outside the optimizer state that checkpoints and
    train/state_shards.py reshard."""
    import deepspeed

    from ondol.train import expert_parallel

    o, ds = cfg.optim, cfg.deepspeed
    muon = o.name == "muon"
    groups = param_groups(model, o.weight_decay, muon=muon)
    if expert_parallel.expert_parallel_layers(model):
        groups = expert_parallel.optimizer_param_groups(groups)
        for group in groups:
            group["kind"] += "/experts" if group.get("moe") else ""
    owns_clipping = deepspeed_zero_stage(ds) == 0
    fused = fused_adamw(o.adamw, env.device)
    kwargs = {"owns_clipping": owns_clipping, "clip_norm": o.grad_clip, "clip_fn": expert_parallel.clip_grad_norm_,
              "lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "foreach": None if fused else True,
              "fused": fused}
    optimizer = (GuardedMuon(groups, momentum=o.muon_momentum, ns_steps=o.muon_ns_steps, **kwargs) if muon
                 else GuardedAdamW(groups, **kwargs))
    engine, _, _, _ = deepspeed.initialize(model=model.to(env.device), optimizer=optimizer,
                                           config=deepspeed_config(cfg, env.world_size), dist_init_required=False)
    if muon and engine.optimizer is not optimizer:  # ZeRO 1/2: DeepSpeed's flat partitions
        optimizer.use_zero_partitions(engine.optimizer)
    if checks_on_device(cfg):
        move_zero_checks_to_device(engine.optimizer, optimizer)
    if env.world_size == 1 and deepspeed_zero_stage(ds) == 0:
        engine.enable_backward_allreduce = False  # one rank: nothing to average, skip flattening every gradient
    if ds.precision == "bf16":
        _keep_fp32_buffers(engine.module)
    return engine, optimizer


def fused_adamw(setting: str, device: torch.device) -> bool:
    """optim.adamw: torch's fused AdamW kernel (one launch for all tensors, ~2.7x faster than foreach over 1.09B
    fp32 parameters on an H100) by default on CUDA. DeepSpeed hands it the fp32 master weights or partitions
    of every ZeRO stage and precision, so the same kernel serves all of them; CPU keeps foreach unless asked."""
    return setting == "fused" or (setting == "auto" and device.type == "cuda")


def _keep_fp32_buffers(model: torch.nn.Module) -> None:
    """DeepSpeed casts every float tensor of the module to bf16; load counts, router biases and the tracked
    maximum logits must stay fp32 (bf16 counts stop being exact above 256, 1e-3 bias steps vanish, and QK-clip's
    factor would carry bf16's 3 significant digits)."""
    for moe in model.moe_layers() if hasattr(model, "moe_layers") else []:
        moe.expert_bias.data = moe.expert_bias.data.float()
        moe.tokens_per_expert.data = moe.tokens_per_expert.data.float()
    for attn in model.attention_layers() if hasattr(model, "attention_layers") else []:
        attn.max_logit.data = attn.max_logit.data.float()
