"""Per-GPU memory of a run laid out on a cluster, whether it fits, and what would make it fit: the tables of
`ondol plan` (launch/plan_cli.py) and the memory check of `ondol launch`'s pre-flight.

The memory model is train/memory.py; this module lays it out for a cluster: the table, and a search over nodes,
ZeRO stage, expert-parallel size, sequence-parallel size, activation checkpointing and micro-batch for the
smallest layout that fits when the configured one does not.
"""

from __future__ import annotations

import dataclasses

from ondol.configs import RunConfig
from ondol.model.config import ModelConfig
from ondol.train.config import sequence_parallel_ok
from ondol.train.memory import CHECKPOINTING, DEFAULT_LIVE, GIB, MemoryPlan, RunShape, plan_memory

# Not in the model: the CUDA context, NCCL's buffers and the caching allocator's fragmentation.
RESERVE_GIB = 2.0
MAX_NODES = 1024  # the search for a layout that fits stops here


def model_config(cfg: RunConfig) -> ModelConfig:
    """The model as the trainer will build it: vocabulary 0 means the tokenizer's."""
    if cfg.model.vocab_size:
        return cfg.model
    return dataclasses.replace(cfg.model, vocab_size=cfg.tokenizer.vocab_size)


def run_shape(cfg: RunConfig, world: int) -> RunShape:
    zero = (cfg.deepspeed.extra.get("zero_optimization") or {})
    bucket = zero.get("reduce_bucket_size") if cfg.deepspeed.zero_stage else None  # ZeRO 0's is fixed (5e8)
    prefetch = zero.get("stage3_prefetch_bucket_size")
    live = min(int(zero.get("stage3_max_live_parameters", DEFAULT_LIVE)),
               int(zero.get("stage3_max_reuse_distance", DEFAULT_LIVE)))
    import torch

    from ondol.train.fast_paths import loss_chunk_tokens

    chunk = loss_chunk_tokens(cfg.train, torch.device("cuda"), cfg.deepspeed.zero_stage)  # a GPU cluster's
    return RunShape(cfg.deepspeed.precision, cfg.deepspeed.zero_stage, world, cfg.deepspeed.expert_parallel_size,
                    cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.activation_checkpointing,
                    cfg.train.checkpointed_blocks, cfg.deepspeed.sequence_parallel_size, chunk,
                    **({"bucket_elements": int(bucket)} if bucket else {}),
                    **({"prefetch_elements": int(prefetch)} if prefetch else {}), live_elements=live,
                    optimizer=cfg.optim.name)


def plan_for_config(cfg: RunConfig, nodes: int, gpus_per_node: int) -> MemoryPlan:
    return plan_memory(model_config(cfg), run_shape(cfg, nodes * gpus_per_node))


def fits(plan: MemoryPlan, gpu_gib: float) -> bool:
    return plan.total + RESERVE_GIB * GIB <= gpu_gib * GIB


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f}" if n >= GIB / 10 or n == 0 else f"{n / GIB:.3f}"


def _billions(n: float) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e8 else f"{n / 1e6:,.1f}M"


def describe_shape(shape: RunShape) -> str:
    blocks = ", every second block" if shape.checkpointed_blocks == "alternate" else ""
    mode = shape.activation_checkpointing
    checkpointing = "off" if mode == "none" else mode + blocks
    return (f"{shape.precision}, ZeRO {shape.zero_stage}, expert-parallel {shape.expert_parallel_size}, "
            f"sequence-parallel {shape.sequence_parallel_size}, micro-batch {shape.micro_batch_size} x {shape.seq_len} tokens, activation checkpointing "
            f"{checkpointing}")


def table(plan: MemoryPlan, gpu_gib: float | None) -> list[str]:
    """The plan as lines: the run, each term in GiB and share, the total against the GPU, the largest term."""
    shape, params = plan.shape, plan.params
    ep = shape.expert_parallel_size
    lines = [(f"model: {_billions(params.total)} parameters: {_billions(params.dense)} dense on every rank, "
              f"{_billions(params.experts)} in experts ({_billions(params.experts / ep)} per rank at EP {ep})"),
             f"run: {describe_shape(shape)}",
             f"{'term':<34}{'GiB per GPU':>12}{'share':>8}"]
    labels = {"weights": f"weights ({shape.precision})", "gradients": f"gradients ({shape.precision})",
              "activations": "activations" if shape.activation_checkpointing == "none" else
              f"activations ({shape.activation_checkpointing} ckpt)"}
    for name, value in plan.terms.items():
        lines.append(f"{labels.get(name, name):<34}{_gib(value):>12}{value / plan.total:>8.0%}")
    by_mode = ", ".join(f"{mode} {_gib(v)}" for mode, v in plan.activations_by_checkpointing.items())
    lines.append(f"  (activations by train.activation_checkpointing: {by_mode} GiB; the peak counts "
                 f"activations + logits or the step's buffers, whichever is larger: they are not alive together)")
    name, value = plan.largest
    if gpu_gib is None:
        lines.append(f"{'total':<34}{_gib(plan.total):>12}   (GPU memory unknown: not checked)")
    else:
        need = plan.total + RESERVE_GIB * GIB
        verdict = (f"fits, {_gib(gpu_gib * GIB - need)} GiB to spare" if fits(plan, gpu_gib)
                   else f"DOES NOT FIT by {_gib(need - gpu_gib * GIB)} GiB")
        lines.append(f"{'total':<34}{_gib(plan.total):>12}   + {RESERVE_GIB:g} GiB reserve (CUDA context, NCCL, "
                     f"fragmentation) of {gpu_gib:g} GiB: {verdict}")
    lines.append(f"largest term: {name} ({_gib(value)} GiB, {value / plan.total:.0%})")
    return lines


@dataclasses.dataclass(frozen=True)
class Candidate:
    nodes: int
    zero_stage: int
    expert_parallel_size: int
    activation_checkpointing: str  # none | selective | full
    micro_batch_size: int
    sequence_parallel_size: int = 1

    def overrides(self, cfg: RunConfig) -> list[str]:
        """The config keys that differ from cfg (grad_accum raised to keep the global batch: a smaller
        micro-batch, or a larger sequence-parallel size, which leaves fewer data-parallel ranks)."""
        out = []
        if self.nodes != cfg.launch.nodes:
            out.append(f"launch.nodes={self.nodes}")
        if self.zero_stage != cfg.deepspeed.zero_stage:
            out.append(f"deepspeed.zero_stage={self.zero_stage}")
        if self.expert_parallel_size != cfg.deepspeed.expert_parallel_size:
            out.append(f"deepspeed.expert_parallel_size={self.expert_parallel_size}")
        sp = cfg.deepspeed.sequence_parallel_size
        if self.sequence_parallel_size != sp:
            out.append(f"deepspeed.sequence_parallel_size={self.sequence_parallel_size}")
        if self.activation_checkpointing != cfg.train.activation_checkpointing:
            out.append(f"train.activation_checkpointing={self.activation_checkpointing}")
        if self.micro_batch_size != cfg.train.micro_batch_size:
            out.append(f"train.micro_batch_size={self.micro_batch_size}")
        accum = max(1, cfg.train.grad_accum * cfg.train.micro_batch_size * self.sequence_parallel_size
                    // (self.micro_batch_size * sp))
        if accum != cfg.train.grad_accum:
            out.append(f"train.grad_accum={accum}")
        return out


def _plan(cfg: RunConfig, model: ModelConfig, c: Candidate, gpus_per_node: int) -> MemoryPlan:
    shape = dataclasses.replace(run_shape(cfg, c.nodes * gpus_per_node), zero_stage=c.zero_stage,
                                expert_parallel_size=c.expert_parallel_size,
                                activation_checkpointing=c.activation_checkpointing,
                                micro_batch_size=c.micro_batch_size, sequence_parallel_size=c.sequence_parallel_size)
    return plan_memory(model, shape)


def candidates(cfg: RunConfig, nodes: list[int], gpus_per_node: int) -> list[Candidate]:
    """Every layout DeepSpeed can run on these node counts: EP divides the experts and the world size, ZeRO 3
    only at EP 1 (train/expert_parallel.py), sequence-parallel sizes the model, seq_len and world size allow,
    micro-batches that divide the configured one."""
    n_experts, micro = cfg.model.n_experts, cfg.train.micro_batch_size
    micros = [m for m in range(micro, 0, -1) if micro % m == 0]
    out = []
    for n in nodes:
        world = n * gpus_per_node
        eps = [e for e in range(1, (n_experts or 1) + 1) if (n_experts or 1) % e == 0 and world % e == 0]
        for stage in range(4):
            for ep in eps if stage < 3 else [1]:
                for sp in sequence_parallel_sizes(cfg, world):
                    for ckpt in CHECKPOINTING:
                        out += [Candidate(n, stage, ep, ckpt, m, sp) for m in micros]
    return out


def sequence_parallel_sizes(cfg: RunConfig, world: int) -> list[int]:
    """The sequence-parallel sizes that divide the world size and that train/config.py allows for this model
    and seq_len (at most model.n_heads)."""
    return [n for n in range(1, min(world, cfg.model.n_heads) + 1)
            if world % n == 0 and sequence_parallel_ok(n, model_config(cfg), cfg.data.seq_len)]


def single_changes(cfg: RunConfig, gpus_per_node: int, gpu_gib: float) -> list[str]:
    """One-key changes of the configured layout that make it fit, cheapest first."""
    model, lc, ds, tr = model_config(cfg), cfg.launch, cfg.deepspeed, cfg.train
    base = Candidate(lc.nodes, ds.zero_stage, ds.expert_parallel_size, tr.activation_checkpointing,
                     tr.micro_batch_size, ds.sequence_parallel_size)
    more = CHECKPOINTING[CHECKPOINTING.index(tr.activation_checkpointing) + 1:]  # less memory, more recompute
    options = [dataclasses.replace(base, activation_checkpointing=mode) for mode in more]
    options += [dataclasses.replace(base, zero_stage=s) for s in range(ds.zero_stage + 1, 4)
                if s < 3 or ds.expert_parallel_size == 1]
    options += [c for c in candidates(cfg, [lc.nodes], gpus_per_node)
                if c.expert_parallel_size > base.expert_parallel_size
                and dataclasses.replace(c, expert_parallel_size=base.expert_parallel_size) == base]
    options += [dataclasses.replace(base, micro_batch_size=m) for m in range(tr.micro_batch_size - 1, 0, -1)
                if tr.micro_batch_size % m == 0]
    options += [dataclasses.replace(base, sequence_parallel_size=n)
                for n in sequence_parallel_sizes(cfg, lc.nodes * gpus_per_node) if n > ds.sequence_parallel_size]
    n = lc.nodes * 2
    while n <= MAX_NODES:
        options.append(dataclasses.replace(base, nodes=n))
        n *= 2
    found = []
    for option in options:
        if option != base and fits(_plan(cfg, model, option, gpus_per_node), gpu_gib):
            key = option.overrides(cfg)[0].split("=")[0]
            if not any(f.startswith(key) for f in found):  # the smallest change of each key
                found.append(" ".join(option.overrides(cfg)))
    return found


def smallest_layout(cfg: RunConfig, gpus_per_node: int, gpu_gib: float) -> tuple[Candidate | None, MemoryPlan]:
    """The fewest nodes (powers of two up to MAX_NODES) on which some layout fits, preferring the smallest
    sequence-parallel size (its all-to-alls cost more than recomputing), then the least checkpointing (none,
    selective, full), the larger micro-batch, the lower ZeRO stage, the smaller EP; else (None, the plan with
    the least memory)."""
    model, best = model_config(cfg), None
    n = 1
    while n <= MAX_NODES:
        plans = [(c, _plan(cfg, model, c, gpus_per_node)) for c in candidates(cfg, [n], gpus_per_node)]
        fitting = [(c, p) for c, p in plans if fits(p, gpu_gib)]
        if fitting:
            return min(fitting, key=lambda cp: (cp[0].sequence_parallel_size,
                                                CHECKPOINTING.index(cp[0].activation_checkpointing),
                                                -cp[0].micro_batch_size, cp[0].zero_stage,
                                                cp[0].expert_parallel_size))
        least = min(plans, key=lambda cp: cp[1].total)
        best = least if best is None or least[1].total < best[1].total else best
        n *= 2
    return None, best[1]


def verdict(cfg: RunConfig, plan: MemoryPlan, gpus_per_node: int, gpu_gib: float) -> list[str]:
    """Nothing when the plan fits; else a line of one-key fixes and a line with the smallest layout that fits,
    or a plain statement that no layout fits without tensor parallelism."""
    if fits(plan, gpu_gib):
        return []
    lines = []
    changes = single_changes(cfg, gpus_per_node, gpu_gib)
    if changes:
        lines.append("fits with any one of: " + " | ".join(changes))
    found, smallest = smallest_layout(cfg, gpus_per_node, gpu_gib)
    if found is None:
        name, value = smallest.largest
        lines.append(f"no DeepSpeed layout fits {gpu_gib:g} GiB GPUs without tensor parallelism (which Ondol does "
                     f"not have): the least memory, {_gib(smallest.total)} GiB per GPU, is at "
                     f"{smallest.shape.world_size // gpus_per_node} nodes with {describe_shape(smallest.shape)}; "
                     f"its largest term, {name} ({_gib(value)} GiB), does not shrink with more GPUs")
    else:
        world = found.nodes * gpus_per_node
        lines.append(f"smallest layout that fits: {found.nodes} node(s) x {gpus_per_node} = {world} GPUs: "
                     f"{' '.join(found.overrides(cfg)) or 'as configured'}")
    return lines


def refusal(cfg: RunConfig, plan: MemoryPlan, gpus_per_node: int, gpu_gib: float) -> str:
    """One line for a launch that cannot fit: the total, the largest term, and what would make it fit."""
    name, value = plan.largest
    changes = single_changes(cfg, gpus_per_node, gpu_gib)
    fix = (f"fits with {' or '.join(changes[:3])}" if changes else
           f"see `ondol plan CONFIG --nodes N --gpus-per-node {gpus_per_node}` for a layout that fits")
    return (f"memory: {_gib(plan.total)} GiB per GPU + {RESERVE_GIB:g} GiB reserve exceeds {gpu_gib:g} GiB "
            f"(largest term: {name}, {_gib(value)} GiB): {fix}")
