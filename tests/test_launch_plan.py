"""`ondol launch` without starting ranks: dry-run command lines and generated files (local, hostfile, Slurm),
every pre-flight error with its message, sbatch submission, and the supervisor's stop rules."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ondol.configs import load_config
from ondol.launch.cli import main as ondol
from ondol.launch.launcher import SPEC_PREFIX, decode_spec
from ondol.launch.launcher_cli import build_plan
from ondol.launch.preflight import (
    LOCAL_FILESYSTEMS,
    PreflightError,
    check_global_batch,
    check_parallel_layout,
    filesystem_of,
    network_env_report,
    parse_hostfile,
    resolve_layout,
    run_preflight,
    storage_warning,
)
from ondol.launch.rank import torch_rank_env
from ondol.launch.supervise import supervise

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny-ko.yaml")


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(TINY, [f"run_dir={tmp_path / 'run'}", *overrides])


def _hostfile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hostfile"
    path.write_text(text)
    return path


def _commands(out: str) -> list[list[str]]:
    """The command lines of a dry run (lines that are neither report, export nor file content)."""
    return [shlex.split(line) for line in out.splitlines() if line.split(" ", 1)[0].endswith(("deepspeed", "sbatch"))]


def _after(tokens: list[str], flag: str) -> str:
    return tokens[tokens.index(flag) + 1]


def _rank_spec(tokens: list[str]) -> dict:
    """The spec every rank gets: the last word, after `ondol.launch.rank` (nothing else follows it)."""
    rank = tokens[tokens.index("ondol.launch.rank"):]
    assert len(rank) == 2 and rank[1].startswith(SPEC_PREFIX), rank
    return decode_spec(rank[1].removeprefix(SPEC_PREFIX))


def _resolved(out: str, spec: dict) -> dict:
    """The resolved config a dry run printed for the ranks (the file the spec names), as plain values."""
    (path,) = spec["args"]
    return yaml.safe_load(_file(out, Path(path)))


def _file(out: str, path: Path) -> str:
    start = out.index(f"# file {path}\n") + len(f"# file {path}\n")
    return out[start:out.index(f"# end of {path}")]


def _stand_ins(tmp_path: Path, monkeypatch, **scripts: str) -> None:
    """Put executables (name -> shell script) first on PATH, in place of cluster tools this machine lacks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _cli_error(capsys, *args: str, code: int = 7) -> str:
    """stderr of an `ondol launch` that must stop with `code` (7: a launch error such as a pre-flight check)."""
    assert ondol(["launch", TINY, *args]) == code
    return capsys.readouterr().err


# ---------------------------------------------------------------- dry runs

def test_dry_run_single_node_prints_deepspeed_command_and_runs_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    code = ondol(["launch", TINY, f"run_dir={run}", "launch.gpus_per_node=2", "train.steps=7", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    (cmd,) = _commands(out)
    assert Path(cmd[0]).name == "deepspeed"
    assert _after(cmd, "--num_gpus") == "2"
    assert _after(cmd, "--master_port") == "29500"
    assert "--module" in cmd and "--no_local_rank" in cmd and "--hostfile" not in cmd
    spec = _rank_spec(cmd)  # each rank: python -m ondol.train RUN_DIR/launch/config.<hash>.yaml
    assert spec == {"log_dir": str(run.resolve() / "logs"), "module": "ondol.train", "env_file": None,
                    "args": [spec["args"][0]]}
    assert Path(spec["args"][0]).parent == run.resolve() / "launch"
    resolved = _resolved(out, spec)  # the overrides travel inside the file, never as command words
    assert (resolved["train"]["steps"], resolved["launch"]["gpus_per_node"], resolved["run_dir"]) == (7, 2, str(run))
    assert f"export OMP_NUM_THREADS={max(1, (os.cpu_count() or 1) // 2)}" in out.splitlines()  # CPU: 2 workers
    assert "preflight: layout: 2 ranks = 1 node(s) x 2 gloo workers (CPU)" in out
    assert "preflight: global batch: train.micro_batch_size (8) x train.grad_accum (1) x data-parallel size (2) " \
           "= 16 sequences" in out
    assert "preflight: timeouts: collectives 10 min (deepspeed.timeout_minutes), watchdog 30 min without rank " \
           "output (launch.watchdog_minutes), 15 s after a rank fails (launch.failure_grace_s)" in out
    assert f"warning: no tokenizer in {run / 'tokenizer'}" in out  # inputs missing: reported, not fatal in a dry run
    assert not run.exists()  # nothing written


def test_dry_run_hostfile_writes_trimmed_hostfile_and_pdsh_command(tmp_path, capsys):
    hostfile = _hostfile(tmp_path, "# cluster\nnode-a slots=8\n\nnode-b slots=8   # second\nnode-c slots=8\n")
    run = tmp_path / "run"
    code = ondol(["launch", TINY, f"run_dir={run}", "launch.launcher=pdsh", f"launch.hostfile={hostfile}",
                  "launch.nodes=2", "launch.gpus_per_node=4", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    generated = run.resolve() / "launch" / "hostfile"
    assert f"# file {generated}\nnode-a slots=4\nnode-b slots=4\n# end of {generated}" in out
    (cmd,) = _commands(out)
    assert _after(cmd, "--hostfile") == str(generated)
    assert _after(cmd, "--launcher") == "pdsh"
    assert _after(cmd, "--master_addr") == "node-a"  # 127.0.0.1 in the config means: the first host
    assert _after(cmd, "--master_port") == "29500"
    assert "--force_multi" in cmd and "--num_gpus" not in cmd
    assert "--master-addr" not in cmd  # deepspeed.launch sets MASTER_* for pdsh ranks
    assert _resolved(out, _rank_spec(cmd))["launch"]["nodes"] == 2
    assert f"preflight: hosts: node-a, node-b (from {hostfile})" in out
    assert "preflight: network env: DeepSpeed forwards NCCL_*, UCX_*, PYTHON* and MV2_* to the other nodes" in out
    fstype, _ = filesystem_of(run)
    if fstype in LOCAL_FILESYSTEMS:  # the usual /tmp: the multi-node warning must be there
        assert f"preflight: warning: run_dir {run} is on a node-local filesystem ({fstype}" in out
    assert "preflight: layout: 8 ranks = 2 node(s) x 4 GPUs" in out
    assert not generated.exists()


def test_dry_run_openmpi_passes_master_to_ranks(tmp_path, capsys):
    hostfile = _hostfile(tmp_path, "n1 slots=2\nn2 slots=2\n")
    code = ondol(["launch", TINY, f"run_dir={tmp_path / 'run'}", "launch.launcher=openmpi",
                  f"launch.hostfile={hostfile}", "launch.nodes=2", "launch.gpus_per_node=2",
                  "launch.master_port=31000", "launch.launcher_args=--mca btl_tcp_if_include ib0", "--dry-run"])
    (cmd,) = _commands(capsys.readouterr().out)
    assert code == 0
    assert _after(cmd, "--launcher") == "openmpi"
    spec = _rank_spec(cmd)
    assert (spec["master_addr"], spec["master_port"]) == ("n1", 31000)  # mpirun sets neither
    assert _after(cmd, "--launcher_args") == "--mca btl_tcp_if_include ib0"


def _sbatch(out: str, script: Path) -> str:
    return _file(out, script)


def _srun_line(text: str) -> list[str]:
    (line,) = [x for x in text.splitlines() if " srun " in f" {x}"]
    return shlex.split(line)


def test_dry_run_slurm_script_field_by_field(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [f"run_dir={run}", "train.grad_accum=2", "launch.launcher=slurm", "launch.nodes=4",
                 "launch.gpus_per_node=8", "launch.slurm.partition=gpu", "launch.slurm.account=proj42",
                 "launch.slurm.time=02:30:00", "launch.slurm.cpus_per_node=64",
                 "launch.slurm.setup=[module load cuda/12.4,source /opt/venv/bin/activate]",
                 "launch.slurm.extra_sbatch=[--exclusive]"]
    code = ondol(["launch", TINY, *overrides, "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    script = run.resolve() / "launch" / "ondol.sbatch"
    text = _sbatch(out, script)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [x.split(" ", 1)[1] for x in lines if x.startswith("#SBATCH ")]
    assert directives == [f'"{d}"' for d in (
        "--job-name=ondol-run", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64",
        "--partition=gpu", "--account=proj42", "--time=02:30:00", f"--output={run.resolve() / 'logs' / 'slurm-%j.out'}",
        "--open-mode=append", "--signal=B:USR1@300", "--requeue", "--exclusive")]
    body = lines[len(directives) + 2:]
    assert body[:4] == ["set -euo pipefail", f"cd {Path.cwd().resolve()}", "module load cuda/12.4",
                        "source /opt/venv/bin/activate"]
    assert 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"' in lines
    assert "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))" in lines
    assert "scontrol show hostnames \"$SLURM_JOB_NODELIST\" | sed 's/$/ slots=8/' > \"$HOSTFILE\"" in lines
    srun = _srun_line(text)
    assert srun[:3] == ["python", "-m", "ondol.launch.supervise"] and srun[-1] == "&"
    assert _after(srun, "--log-dir") == str(run.resolve() / "logs")
    assert _after(srun, "--stop-file") == str(run.resolve() / "launch" / "stop")
    assert _after(srun, "--watchdog-minutes") == "30"
    srun = srun[srun.index("srun"):]
    assert srun[:7] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=64",
                        "bash", "-c"]
    node = shlex.split(srun[7])  # the per-node command, variables expanded by each node's shell
    assert node[:6] == ["deepspeed", "--hostfile", "$HOSTFILE", "--no_ssh", "--node_rank=$SLURM_NODEID",
                        "--master_addr=$MASTER_ADDR"]
    resolved = _resolved(out, _rank_spec(node))
    assert (resolved["launch"]["slurm"]["partition"], resolved["train"]["grad_accum"]) == ("gpu", 2)
    assert not [line for line in lines if "02:30:00" in line and not line.startswith("#SBATCH")]
    assert _commands(out)[-1] == ["sbatch", str(script)]
    assert "preflight: global batch: train.micro_batch_size (8) x train.grad_accum (2) x data-parallel size (32) " \
           "= 512 sequences" in out
    check = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True, check=False)
    assert check.returncode == 0, check.stderr


def test_slurm_container_runs_srun_with_pyxis_options(tmp_path):
    cfg = _cfg(tmp_path, "launch.launcher=slurm", "launch.nodes=2", "launch.gpus_per_node=4",
               "launch.slurm.container=nvcr.io/nvidia/pytorch:25.01-py3", "launch.slurm.container_mounts=[/data:/data]")
    plan, _ = build_plan(cfg, dry_run=True)
    text = plan.files[plan.log_dir.parent / "launch" / "ondol.sbatch"]
    srun = _srun_line(text)
    workdir = Path.cwd().resolve()
    assert srun[0] == "srun"  # no supervisor on the batch host: the environment lives in the container
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in srun
    assert f"--container-mounts={workdir}:{workdir},/data:/data" in srun
    assert f"--container-workdir={workdir}" in srun
    assert '#SBATCH "--gpus-per-node=4"' in text.splitlines()


def test_slurm_cpu_nodes_request_no_gpus_and_split_cores_between_workers(tmp_path):
    cfg = _cfg(tmp_path, "launch.launcher=slurm", "launch.nodes=2", "launch.gpus_per_node=4",
               "launch.slurm.request_gpus=false")
    plan, _ = build_plan(cfg, dry_run=True)
    text = plan.files[plan.log_dir.parent / "launch" / "ondol.sbatch"]
    assert not [x for x in text.splitlines() if "gpus" in x]
    (threads,) = [x for x in text.splitlines() if "OMP_NUM_THREADS" in x]
    for cpus, expected in (("10", "2"), ("3", "1"), (None, "1")):  # floor(cores / 4 workers), at least 1
        env = {"PATH": os.environ["PATH"], **({"SLURM_CPUS_ON_NODE": cpus} if cpus else {})}
        shell = subprocess.run(["bash", "-c", f"{threads}; echo $OMP_NUM_THREADS"], env=env, capture_output=True,
                               text=True, check=True)
        assert shell.stdout.strip() == expected
    gpu_plan, _ = build_plan(_cfg(tmp_path, "launch.launcher=slurm"), dry_run=True)
    assert "OMP_NUM_THREADS" not in gpu_plan.files[gpu_plan.log_dir.parent / "launch" / "ondol.sbatch"]


def test_submit_runs_sbatch_and_reports_the_job(tmp_path, capsys, monkeypatch):
    calls = tmp_path / "sbatch-calls"
    _stand_ins(tmp_path, monkeypatch, sbatch=f"#!/bin/sh\necho \"$@\" >> {calls}\necho 'Submitted batch job 4242'\n")
    run = tmp_path / "run"
    for name in ("tokenizer/meta.json", "data/manifest.json"):  # pre-flight wants prepared inputs for a submit
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("{}")
    code = ondol(["launch", TINY, f"run_dir={run}", "launch.launcher=slurm", "launch.nodes=2", "--submit"])
    out = capsys.readouterr().out
    script = run.resolve() / "launch" / "ondol.sbatch"
    assert code == 0
    assert calls.read_text().split() == [str(script)]
    assert f"submitted Slurm job 4242: {script}" in out
    lines = script.read_text().splitlines()
    assert "#SBATCH \"--nodes=2\"" in lines
    assert (run / "logs").is_dir()  # Slurm opens --output=RUN_DIR/logs/slurm-%j.out before the script runs
    if sys.prefix != sys.base_prefix:  # no setup lines: the script activates the venv ondol runs from
        assert f"source {Path(sys.prefix) / 'bin' / 'activate'}" in lines


def test_sbatch_refusal_is_reported(tmp_path, capsys, monkeypatch):
    _stand_ins(tmp_path, monkeypatch,
               sbatch="#!/bin/sh\necho 'sbatch: error: invalid partition specified: gpux' >&2\nexit 1\n")
    code = ondol(["launch", TINY, f"run_dir={tmp_path}", "launch.launcher=slurm", "launch.slurm.partition=gpux",
                  "--submit", "--module", "some_module"])  # another module: no prepared inputs needed
    assert code == 7
    assert capsys.readouterr().err == ("ondol: launch error: sbatch failed (exit 1): sbatch: error: invalid partition "
                                       "specified: gpux\n")


def test_submit_is_refused_for_a_non_slurm_launcher(tmp_path, capsys):
    assert "--submit is for launch.launcher=slurm" in _cli_error(capsys, f"run_dir={tmp_path}", "--submit", code=2)


# ---------------------------------------------------------------- pre-flight errors

@pytest.mark.parametrize("text, message", [
    ("node1 slots=4\nnode2 slot=4\n", "{path}:2: expected 'HOST slots=N', got 'node2 slot=4'"),
    ("node1 slots=4\n# spare\nnode2 slots=four\n", "{path}:3: slots must be a positive integer, got 'four'"),
    ("node1 slots=0\n", "{path}:1: slots must be a positive integer, got '0'"),
    ("node1 slots=4\nnode2 slots=4 extra\n", "{path}:2: expected 'HOST slots=N', got 'node2 slots=4 extra'"),
    ("node1 slots=4\n\nnode1 slots=4\n", "{path}:3: host 'node1' is already listed on line 1"),
    ("# nothing\n\n", "{path}: no hosts listed"),
])
def test_bad_hostfile_names_file_and_line(tmp_path, text, message):
    path = _hostfile(tmp_path, text)
    with pytest.raises(PreflightError) as err:
        parse_hostfile(path)
    assert str(err.value).startswith("hostfile " + message.format(path=path))


def test_bad_hostfile_through_the_cli_is_one_line_and_exit_2(tmp_path, capsys):
    path = _hostfile(tmp_path, "node1 slots=4\nnode2 slots=4 slots=8\n")
    err = _cli_error(capsys, f"run_dir={tmp_path / 'run'}", "launch.launcher=pdsh", f"launch.hostfile={path}",
                     "launch.nodes=2", "--dry-run")
    assert err == f"ondol: pre-flight: hostfile {path}:2: expected 'HOST slots=N', got " \
                  "'node2 slots=4 slots=8'\n"


def test_hostfile_with_too_few_hosts_or_slots(tmp_path):
    path = _hostfile(tmp_path, "a slots=8\nb slots=4\n")
    with pytest.raises(PreflightError, match=r"launch.nodes=3 but hostfile .* lists 2 hosts"):
        resolve_layout(_cfg(tmp_path, "launch.launcher=pdsh", f"launch.hostfile={path}", "launch.nodes=3"))
    with pytest.raises(PreflightError) as err:
        resolve_layout(_cfg(tmp_path, "launch.launcher=pdsh", f"launch.hostfile={path}", "launch.nodes=2",
                            "launch.gpus_per_node=8"))
    assert str(err.value) == f"hostfile {path}:2: host 'b' has slots=4 but launch.gpus_per_node=8: lower " \
                             "launch.gpus_per_node"
    with pytest.raises(PreflightError, match="hostfile .* not found"):
        resolve_layout(_cfg(tmp_path, "launch.launcher=pdsh", f"launch.hostfile={tmp_path / 'missing'}"))


def test_more_local_gpus_than_the_machine_has(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a 2-GPU machine, as CUDA would report it
    with pytest.raises(PreflightError) as err:
        resolve_layout(_cfg(tmp_path, "launch.gpus_per_node=4"))
    assert str(err.value) == "launch.gpus_per_node=4 but this machine has 2 GPUs: set launch.gpus_per_node=2 or fewer"
    layout = resolve_layout(_cfg(tmp_path, "launch.gpus_per_node=2"))
    assert (layout.world_size, layout.cpu) == (2, False)


def test_world_size_not_divisible_by_expert_parallel_size(tmp_path):
    cfg = _cfg(tmp_path, "launch.gpus_per_node=4")
    cfg.deepspeed.expert_parallel_size = 3  # train.config refuses EP > 1 today; the launcher checks it anyway
    layout = resolve_layout(cfg)
    with pytest.raises(PreflightError) as err:
        check_parallel_layout(cfg, layout)
    assert str(err.value).startswith("world size 4 (1 node(s) x 4 per node) is not divisible by "
                                     "deepspeed.expert_parallel_size=3")
    cfg = _cfg(tmp_path, "launch.gpus_per_node=6")
    cfg.deepspeed.expert_parallel_size = 3
    with pytest.raises(PreflightError, match=r"model.n_experts=8 is not divisible by deepspeed.expert_parallel_size=3"):
        check_parallel_layout(cfg, resolve_layout(cfg))
    cfg.deepspeed.expert_parallel_size = 2
    assert check_parallel_layout(cfg, resolve_layout(cfg))[0].startswith("layout: 6 ranks")


def test_world_size_not_divisible_by_zero_shard_groups(tmp_path, capsys):
    err = _cli_error(capsys, f"run_dir={tmp_path}", "launch.gpus_per_node=4", "deepspeed.zero_stage=3",
                     "deepspeed.extra={zero_optimization: {mics_shard_size: 3}}", "--dry-run")
    assert err == ("ondol: pre-flight: world size 4 (1 node(s) x 4 per node) is not divisible by "
                   "deepspeed.extra.zero_optimization.mics_shard_size=3: pick a shard size that divides it\n")
    cfg = _cfg(tmp_path, "launch.gpus_per_node=4", "deepspeed.extra={zero_optimization: {zero_hpz_partition_size: 8}}")
    with pytest.raises(PreflightError, match="zero_hpz_partition_size=8 must divide the GPUs per node"):
        check_parallel_layout(cfg, resolve_layout(cfg))


def test_inconsistent_global_batch(tmp_path, capsys):
    err = _cli_error(capsys, f"run_dir={tmp_path}", "launch.gpus_per_node=2", "train.micro_batch_size=4",
                     "launch.global_batch_size=32", "--dry-run")
    assert err == ("ondol: pre-flight: launch.global_batch_size=32 but train.micro_batch_size (4) x "
                   "train.grad_accum (1) x data-parallel size (2) = 8 sequences: set train.grad_accum=4\n")
    cfg = _cfg(tmp_path, "launch.gpus_per_node=2", "train.micro_batch_size=4", "launch.global_batch_size=12")
    with pytest.raises(PreflightError, match=r"= 8 sequences: it is not a multiple of micro x data-parallel \(8\)"):
        check_global_batch(cfg, resolve_layout(cfg))
    cfg = _cfg(tmp_path, "launch.gpus_per_node=2", "train.micro_batch_size=4", "train.grad_accum=4",
               "launch.global_batch_size=32")
    assert check_global_batch(cfg, resolve_layout(cfg))[0].endswith("= 32 sequences")


def test_missing_inputs_stop_a_real_launch(tmp_path, capsys):
    err = _cli_error(capsys, f"run_dir={tmp_path / 'run'}", "launch.gpus_per_node=2")
    assert err == (f"ondol: pre-flight: no tokenizer in {tmp_path / 'run' / 'tokenizer'}: run "
                   "`ondol tokenizer train CONFIG` (or `ondol run`) first\n")


def test_unreachable_hosts_are_named(tmp_path, capsys, monkeypatch):
    # ssh's last-but-one argument is the host; node-b refuses
    _stand_ins(tmp_path, monkeypatch, ssh='#!/bin/sh\nfor a; do host=$prev; prev=$a; done\n[ "$host" != node-b ]\n')
    path = _hostfile(tmp_path, "node-a slots=1\nnode-b slots=1\n")
    err = _cli_error(capsys, f"run_dir={tmp_path / 'run'}", "launch.launcher=pdsh", f"launch.hostfile={path}",
                     "launch.nodes=2")
    assert err.startswith("ondol: pre-flight: hosts not reachable by passwordless ssh: "
                                              f"node-b (from {path})")


def test_config_keys_are_validated(tmp_path):
    with pytest.raises(ValueError, match="launch.launcher must be one of"):
        _cfg(tmp_path, "launch.launcher=ssh")
    with pytest.raises(ValueError, match="launch.launcher=pdsh needs launch.hostfile"):
        _cfg(tmp_path, "launch.launcher=pdsh")
    with pytest.raises(ValueError, match="launch.nodes > 1 needs launch.launcher"):
        _cfg(tmp_path, "launch.nodes=2")


# ---------------------------------------------------------------- reports

def test_more_cpu_workers_than_cores_is_warned(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs: local ranks are GPUs, not CPU workers")
    cores = os.cpu_count() or 1
    _, report = run_preflight(_cfg(tmp_path, f"launch.gpus_per_node={cores + 1}"), check_inputs=False)
    assert f"warning: {cores + 1} gloo workers on {cores} CPU cores: they will share cores and run slower than " \
           "fewer workers would" in report
    _, report = run_preflight(_cfg(tmp_path, f"launch.gpus_per_node={cores}"), check_inputs=False)
    assert not [line for line in report if "gloo workers on" in line]


def test_network_env_report_lists_the_variables_ranks_inherit():
    env = {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_DEBUG": "INFO", "GLOO_SOCKET_IFNAME": "eth0", "HOME": "/root"}
    assert network_env_report(env) == ["network env: GLOO_SOCKET_IFNAME=eth0", "network env: NCCL_DEBUG=INFO",
                                       "network env: NCCL_SOCKET_IFNAME=ib0"]
    assert network_env_report({"HOME": "/root"})[0].startswith("network env: no NCCL_")


MOUNTS = """\
/dev/sda1 / ext4 rw 0 0
fs1:/export/home /shared nfs4 rw 0 0
lustre@tcp:/scratch /scratch lustre rw 0 0
tmpfs /shared/tmp tmpfs rw 0 0
"""


def test_shared_storage_warning_for_multi_node():
    assert storage_warning("/home/me/runs/a", nodes=2, mounts=MOUNTS).startswith(
        "warning: run_dir /home/me/runs/a is on a node-local filesystem (ext4 at /): with 2 nodes")
    assert storage_warning("/shared/tmp/run", nodes=2, mounts=MOUNTS).startswith(
        "warning: run_dir /shared/tmp/run is on a node-local filesystem (tmpfs at /shared/tmp)")
    assert storage_warning("/shared/runs/a", nodes=2, mounts=MOUNTS) is None
    assert storage_warning("/scratch/x", nodes=8, mounts=MOUNTS) is None
    assert storage_warning("/home/me/runs/a", nodes=1, mounts=MOUNTS) is None


def test_rank_env_from_mpi_runners():
    ompi = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert torch_rank_env(ompi, "n1", 29500) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                                 "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    mv2 = {"MV2_COMM_WORLD_RANK": "3", "MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_LOCAL_RANK": "3"}
    assert torch_rank_env(mv2, None, None) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    stale = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "a", "MASTER_PORT": "1"}  # from the submitting shell
    assert torch_rank_env({**stale, **ompi}, "n1", 29500) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                                              "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    assert torch_rank_env({**stale, "RANK": "1"}, None, None) == {}  # deepspeed.launch set them: left alone


# ---------------------------------------------------------------- supervisor

def _script(body: str) -> list[str]:
    return [sys.executable, "-c", body]


def test_supervisor_stops_a_job_whose_other_nodes_keep_running_after_a_rank_failed(tmp_path, capsys):
    logs = tmp_path / "logs"
    (logs).mkdir()
    (logs / "rank1.exit").write_text(json.dumps({"rank": 1, "host": "old", "exit_code": 9, "time": 0}))  # stale
    body = f"""
import json, time, pathlib
logs = pathlib.Path({str(logs)!r})
(logs / "rank0.log").write_text("step 1\\n")
(logs / "rank3.log").write_text("loading shard\\nValueError: shard 17 is truncated\\n")
(logs / "rank3.exit").write_text(json.dumps({{"rank": 3, "host": "node-b", "exit_code": 1, "time": time.time()}}))
time.sleep(600)  # the other nodes would wait in a collective until the process-group timeout
"""
    started = time.monotonic()
    code = supervise(_script(body), logs, watchdog_minutes=0, failure_grace_s=1.0)
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code != 0 and elapsed < 20
    assert "step 1\n" in out  # rank 0's log echoed
    assert err.splitlines()[0] == "ondol launch: a rank failed and the job was still running 1 s later: stopped it"
    assert err.splitlines()[1] == ("ondol launch: rank 3 on node-b failed with exit code 1: ValueError: shard 17 is "
                                   "truncated")
    assert "    loading shard" in err


def test_supervisor_watchdog_stops_a_silent_job(tmp_path, capsys):
    started = time.monotonic()
    code = supervise(_script("import time; time.sleep(600)"), tmp_path / "logs", watchdog_minutes=0.03)
    elapsed = time.monotonic() - started
    assert code == 1 and 1.5 < elapsed < 20
    assert "watchdog: no rank log in" in capsys.readouterr().err


def test_supervisor_success_and_launcher_failure_without_rank_records(tmp_path, capsys):
    assert supervise(_script("pass"), tmp_path / "logs") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ondol launch: {sys.executable} -c pass\n  rank logs: {tmp_path / 'logs'}/rank*.log")
    assert "all ranks finished" in out
    chatter = "[INFO] [launch.py:174:main] Setting CUDA_VISIBLE_DEVICES=0,1"
    printed = f"print({chatter[:50]!r} {chatter[50:]!r})"  # the command line itself does not hold the text
    assert supervise(_script(f"import sys; {printed}; sys.exit('pdsh: node-a: ssh exited with 255')"),
                     tmp_path / "logs") == 1
    out, err = capsys.readouterr()
    assert "CUDA_VISIBLE_DEVICES" not in out  # the launcher's own output goes to its log, shown when it fails
    assert (tmp_path / "logs" / "launcher.log").read_text() == f"{chatter}\npdsh: node-a: ssh exited with 255\n"
    assert err.splitlines()[0].startswith("ondol launch: launcher exited with code 1 after")
    assert err.splitlines()[1:] == [f"  last lines of {tmp_path / 'logs' / 'launcher.log'}:", f"    {chatter}",
                                    "    pdsh: node-a: ssh exited with 255"]
