"""Slurm: an sbatch script that starts one DeepSpeed launcher per node with srun, and its submission.

Inside the allocation the script derives the master address (first allocated node) and port (from the job
id, so jobs sharing a node do not collide), writes a DeepSpeed hostfile of the allocated nodes, and runs
`deepspeed --no_ssh --node_rank=$SLURM_NODEID` on every node: no ssh between nodes is needed. srun's
--kill-on-bad-exit stops all nodes when one launcher fails; without a container the supervisor
(ondol.launch.supervise) also watches the ranks' exit records and logs.

Preemption and time limits: Slurm signals the batch script (USR1 `launch.slurm.stop_signal_s` before the limit,
TERM on scancel); the script's trap writes the run's stop file, every rank saves at the end of its step and
exits with 75, and after a USR1 stop the script requeues its own job (`--requeue`, output appended), which
resumes from that checkpoint. Every value from the config or the environment is checked and quoted
(launch/script_values.py): `#SBATCH` lines hold one option each in Slurm's double quotes, shell lines quote with
shlex, comments carry no values; the ranks read the resolved config the pre-flight checked, never overrides.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from ondol.configs import RunConfig
from ondol.errors import LaunchError
from ondol.launch.launcher import LaunchPlan, launch_dir, log_dir, rank_args, resolved_config, run_path
from ondol.launch.preflight import Layout
from ondol.launch.script_values import sbatch_option, script_value, shell_word
from ondol.train.preemption import PREEMPTED_EXIT, stop_file

SCRIPT_NAME = "ondol.sbatch"


def _venv_setup() -> list[str]:
    """Activate the virtual environment `ondol` runs from, when it runs from one."""
    if sys.prefix != sys.base_prefix and (Path(sys.prefix) / "bin" / "activate").is_file():
        return [f"source {shell_word('the virtual environment', Path(sys.prefix) / 'bin' / 'activate')}"]
    return []


def _directive(option: str) -> str:
    """One `#SBATCH` line of a checked option; sbatch reads its argument with double quotes grouping and backslash
    escaping."""
    return "#SBATCH " + '"' + option.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sbatch_directives(cfg: RunConfig, layout: Layout) -> list[str]:
    """The `#SBATCH` options, each checked (launch/script_values.py) under the key it comes from."""
    sl = cfg.launch.slurm
    name = script_value("launch.slurm.job_name" if sl.job_name else "run_dir",
                        sl.job_name or f"ondol-{run_path(cfg).name}")
    lines = [f"--job-name={name}", f"--nodes={layout.nodes}", "--ntasks-per-node=1"]
    if sl.request_gpus:
        lines.append(f"--gpus-per-node={layout.gpus_per_node}")
    # The one task per node runs the DeepSpeed launcher and all its ranks: it needs the node's cores, not the one
    # CPU Slurm gives a task by default where the cluster sets no CPUs per GPU.
    lines.append(f"--cpus-per-task={sl.cpus_per_node}" if sl.cpus_per_node else "--exclusive")
    if sl.partition:
        lines.append(f"--partition={script_value('launch.slurm.partition', sl.partition)}")
    if sl.account:
        lines.append(f"--account={script_value('launch.slurm.account', sl.account)}")
    lines += [f"--time={script_value('launch.slurm.time', sl.time)}",
              f"--output={script_value('run_dir', log_dir(cfg) / 'slurm-%j.out')}", "--open-mode=append"]
    if sl.stop_signal_s:
        lines.append(f"--signal=B:USR1@{sl.stop_signal_s}")
    if sl.requeue:
        lines.append("--requeue")
    return [*lines, *(sbatch_option(f"launch.slurm.extra_sbatch[{i}]", option)
                      for i, option in enumerate(sl.extra_sbatch))]


def node_command(cfg: RunConfig, config_file: Path, module: str) -> str:
    """The per-node shell command srun runs (variables expand on each node)."""
    fixed = ["deepspeed", "--hostfile", '"$HOSTFILE"', "--no_ssh", '--node_rank="$SLURM_NODEID"',
             '--master_addr="$MASTER_ADDR"', '--master_port="$MASTER_PORT"']
    return " ".join(fixed + [shlex.quote(arg) for arg in rank_args(cfg, config_file, module)])


def sbatch_script(cfg: RunConfig, layout: Layout, config_file: Path, module: str) -> str:
    sl = cfg.launch.slurm
    workdir = Path.cwd().resolve()
    logs = log_dir(cfg)
    hostfile = launch_dir(cfg) / "hostfile.$SLURM_JOB_ID"
    srun = ["srun", f"--nodes={layout.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05); under --exclusive the step takes every CPU
    # the job holds on its node ($SLURM_CPUS_ON_NODE, expanded by the batch shell)
    cpus = f"--cpus-per-task={sl.cpus_per_node}" if sl.cpus_per_node else '--cpus-per-task="$SLURM_CPUS_ON_NODE"'
    container = []
    if sl.container:
        mounts = [f"{workdir}:{workdir}",
                  *(script_value(f"launch.slurm.container_mounts[{i}]", m) for i, m in enumerate(sl.container_mounts))]
        container = [f"--container-image={script_value('launch.slurm.container', sl.container)}", f"--container-mounts={','.join(mounts)}",
                     f"--container-workdir={workdir}"]
    job_line = " ".join([shlex.join(srun), cpus, *([shlex.join(container)] if container else []), "bash -c",
                         shlex.quote(node_command(cfg, config_file, module))])
    if not sl.container:  # the supervisor needs this environment on the batch host; a container has it inside
        job_line = (f"python -m ondol.launch.supervise --log-dir {shell_word('run_dir', logs)} "
                    f"--stop-file {shell_word('run_dir', stop_file(cfg.run_dir))} "
                    f"--watchdog-minutes {cfg.launch.watchdog_minutes:g} "
                    f"--failure-grace-s {cfg.launch.failure_grace_s:g} -- {job_line}")
    # launch.slurm.setup is shell code by design (module load ...): one line per entry, written as it is
    setup = [script_value(f"launch.slurm.setup[{i}]", line) for i, line in enumerate(sl.setup)]
    setup = setup or ([] if sl.container else _venv_setup())
    cpu_threads = []
    if not sl.request_gpus:  # CPU nodes: the gloo workers share the node's cores, at least one thread each
        per_worker = f"${{SLURM_CPUS_ON_NODE:-1}} / {layout.gpus_per_node}"
        cpu_threads.append(f"export OMP_NUM_THREADS=$(( {per_worker} > 0 ? {per_worker} : 1 ))")
    requeue = (f'if [ "$code" -eq {PREEMPTED_EXIT} ] && [ "$stop_signal" = USR1 ]; then\n'
               '  echo "ondol: saved before the time limit; requeueing job $SLURM_JOB_ID"\n'
               '  scontrol requeue "$SLURM_JOB_ID"\nfi') if sl.requeue else ""
    lines = [
        "#!/bin/bash",
        "# Generated by `ondol launch`: one DeepSpeed launcher per node, every rank reading the resolved config.",
        *[_directive(d) for d in sbatch_directives(cfg, layout)],
        "set -euo pipefail",
        f"cd {shell_word('the working directory', workdir)}",
        *setup,
        f"mkdir -p {shell_word('run_dir', logs)} {shell_word('run_dir', launch_dir(cfg))}",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))",
        f"export HOSTFILE={shell_word('run_dir', hostfile.parent)}/hostfile.$SLURM_JOB_ID",
        f"scontrol show hostnames \"$SLURM_JOB_NODELIST\" | sed 's/$/ slots={layout.gpus_per_node}/' > \"$HOSTFILE\"",
        ('echo "ondol: job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES node(s), master $MASTER_ADDR:$MASTER_PORT'
         ' (restart ${SLURM_RESTART_COUNT:-0})"'),
        *cpu_threads,
        "# A signal to this script asks every rank to save at the end of its step and stop (exit 75).",
        f"stop() {{ stop_signal=$1; touch {shell_word('run_dir', stop_file(cfg.run_dir))}; }}",
        'stop_signal=""',
        "trap 'stop USR1' USR1",
        "trap 'stop TERM' TERM",
        f"{job_line} &",
        "job=$!",
        "while :; do",
        '  wait "$job" && code=0 || code=$?',
        '  kill -0 "$job" 2>/dev/null || break  # wait was interrupted by a trapped signal: wait again',
        "done",
        *([requeue] if requeue else []),
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def plan_slurm(cfg: RunConfig, layout: Layout, module: str) -> LaunchPlan:
    """The sbatch script (RUN_DIR/launch/ondol.sbatch), the resolved config it runs, and the `sbatch` command."""
    script = launch_dir(cfg) / SCRIPT_NAME
    config_file, config_text = resolved_config(cfg)
    text = sbatch_script(cfg, layout, config_file, module)
    return LaunchPlan(layout, log_dir(cfg), ["sbatch", str(script)], {config_file: config_text, script: text})


class SubmitError(LaunchError):
    """sbatch is missing or refused the script; the message says what it printed."""


def submit(plan: LaunchPlan) -> str:
    """Run sbatch on the plan's script; the job id."""
    try:
        result = subprocess.run(plan.command, check=False, capture_output=True, text=True)
    except FileNotFoundError:
        raise SubmitError("sbatch not found: submit from a Slurm login node, or drop --submit and copy "
                             f"{plan.command[-1]} there") from None
    if result.returncode != 0:
        raise SubmitError(f"sbatch failed (exit {result.returncode}): {result.stderr.strip() or result.stdout}")
    match = re.search(r"(\d+)", result.stdout)
    if not match:
        raise SubmitError(f"sbatch printed no job id: {result.stdout.strip()}")
    return match.group(1)
