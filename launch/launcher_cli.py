"""`ondol launch CONFIG [overrides] [--dry-run] [--submit]`: start training on every rank through DeepSpeed's
launcher (one machine, a hostfile cluster, or a Slurm allocation), after pre-flight checks."""

from __future__ import annotations

import argparse

from ondol.configs import ConfigError, RunConfig, add_config_command, load_config
from ondol.launch.launcher import DEFAULT_MODULE, LaunchPlan, plan_launch, run_plan, write_files
from ondol.launch.preflight import run_preflight

EXAMPLES = """examples:
  ondol launch configs/tiny-ko.yaml launch.gpus_per_node=2            # 2 workers here (gloo on CPU)
  ondol launch CONFIG launch.launcher=pdsh launch.hostfile=hosts launch.nodes=2 launch.gpus_per_node=8
  ondol launch CONFIG launch.launcher=slurm launch.nodes=4 launch.gpus_per_node=8 \\
      launch.slurm.partition=gpu launch.slurm.account=proj --submit
  ondol launch CONFIG ... --dry-run                                    # show checks, files, commands only
"""


def build_plan(cfg: RunConfig, module: str = DEFAULT_MODULE, *, check_hosts: bool = False,
               dry_run: bool = False) -> tuple[LaunchPlan, list[str]]:
    """Pre-flight checks, then the launch plan for the configured launcher; (plan, report lines)."""
    from ondol.launch.slurm import plan_slurm

    layout, report = run_preflight(cfg, check_inputs=module == DEFAULT_MODULE, check_hosts=check_hosts,
                                   dry_run=dry_run)
    plan_for = plan_slurm if cfg.launch.launcher == "slurm" else plan_launch
    return plan_for(cfg, layout, module), report


def launch_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    slurm = cfg.launch.launcher == "slurm"
    if args.submit and not slurm:
        raise ConfigError("--submit is for launch.launcher=slurm (other launchers start right away)")
    plan, report = build_plan(cfg, args.module, check_hosts=not args.dry_run and not args.no_host_check,
                              dry_run=args.dry_run)
    for line in report:
        print(f"preflight: {line}")
    if args.dry_run:
        print(plan.describe())
        return 0
    if not slurm:
        return run_plan(cfg, plan)
    write_files(plan)
    plan.log_dir.mkdir(parents=True, exist_ok=True)  # Slurm opens --output before the script's first line runs
    script = next(path for path in plan.files if path.suffix == ".sbatch")
    if not args.submit:
        print(f"wrote {script}\nsubmit it with: sbatch {script}  (or add --submit)")
        return 0
    from ondol.launch.slurm import submit

    job = submit(plan)
    print(f"submitted Slurm job {job}: {script}; output in {plan.log_dir}/slurm-{job}.out, ranks in "
          f"{plan.log_dir}/rank*.log")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_config_command(
        sub, "launch", launch_command,
        help="train on many processes/GPUs/nodes through DeepSpeed's launcher (local, hostfile, Slurm)",
        description="Start `python -m ondol.train CONFIG` on every rank through DeepSpeed's launcher, CONFIG being "
        "the checked config with its overrides, written to RUN_DIR/launch/config.<hash>.yaml. "
        "launch.launcher=local runs launch.gpus_per_node ranks here (gloo workers on CPU); pdsh/openmpi/mvapich "
        "use launch.hostfile ('HOST slots=N' lines) and the first launch.nodes hosts; slurm writes "
        "RUN_DIR/launch/ondol.sbatch (srun starts one launcher per node). Pre-flight checks the hostfile, the "
        "parallel layout, launch.global_batch_size and the prepared inputs first. Rank logs go to "
        "RUN_DIR/logs/rank*.log; a failed rank stops the job and its error is printed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dry-run", action="store_true",
                   help="print the checks, every generated file and command, and run nothing")
    p.add_argument("--submit", action="store_true", help="slurm: submit the generated script with sbatch")
    p.add_argument("--no-host-check", action="store_true",
                   help="skip the passwordless-ssh check of the hostfile's hosts")
    p.add_argument("--module", default=DEFAULT_MODULE,
                   help="module each rank runs as `python -m MODULE CONFIG` (default: ondol.train)")
