"""`ondol plan CONFIG [overrides] --nodes N --gpus-per-node G [--gpu-memory-gib 80]`: per-GPU memory of a run by
term before anything starts (launch/plan.py), after the launch's own layout checks (experts and world size
divisible by the expert-parallel size, the global batch)."""

from __future__ import annotations

import argparse
import copy

from ondol.configs import ConfigError, add_config_command, load_config
from ondol.errors import LaunchError
from ondol.launch.plan import fits, plan_for_config, table, verdict
from ondol.launch.preflight import Layout, check_global_batch, check_parallel_layout


def plan_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    nodes = args.nodes or cfg.launch.nodes
    gpus = args.gpus_per_node or cfg.launch.gpus_per_node
    if nodes < 1 or gpus < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    cfg = copy.copy(cfg)  # the layout to plan, whatever launcher the config names
    cfg.launch = copy.copy(cfg.launch)
    cfg.launch.nodes, cfg.launch.gpus_per_node = nodes, gpus
    layout = Layout(nodes, gpus)
    check_parallel_layout(cfg, layout)  # a layout that cannot run: PreflightError, one line
    check_global_batch(cfg, layout)
    plan = plan_for_config(cfg, nodes, gpus)
    print(f"plan: {args.config} on {nodes} node(s) x {gpus} GPUs = {nodes * gpus} ranks, "
          f"{args.gpu_memory_gib:g} GiB each")
    for line in table(plan, args.gpu_memory_gib) + verdict(cfg, plan, gpus, args.gpu_memory_gib):
        print(line)
    return 0 if fits(plan, args.gpu_memory_gib) else LaunchError.exit_code


def register(sub: argparse._SubParsersAction) -> None:
    p = add_config_command(
        sub, "plan", plan_command,
        help="per-GPU memory of a run by term for a cluster layout, and what would make it fit",
        description="Predict each GPU's memory for CONFIG on --nodes x --gpus-per-node GPUs before launching: "
        "weights, gradients, fp32 master weights and AdamW moments by ZeRO stage and expert-parallel split, "
        "activations per micro-batch (without, selective and full activation checkpointing), logits, "
        "buffers; the total against the GPU and the largest term. When it does not fit: the one-key changes "
        "that would make it fit and the smallest layout (nodes, ZeRO stage, expert-parallel size, "
        "checkpointing, micro-batch) that does. Exit code 0: fits; 7: does not fit, or the layout cannot run "
        "(one line, as `ondol launch` refuses it).",
    )
    p.add_argument("--nodes", type=int, default=0, help="nodes (default: launch.nodes)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default: launch.gpus_per_node)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
