"""Real launches through DeepSpeed's launcher on CPU (gloo workers): a failing rank stops the job with its
error, the generated Slurm script runs one launcher per (stand-in) node, and 2 workers train the tiny
config, stop on SIGTERM with a checkpoint and resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ondol.configs import data_dir, load_config, tokenizer_dir
from ondol.model.io import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny-ko.yaml")
LAUNCH_TIMEOUT_S = 240

# A rank that fails after joining the group while the other waits for it in a collective.
FAILING_RANK = """
from datetime import timedelta
import torch.distributed as dist
dist.init_process_group("gloo", timeout=timedelta(seconds=120))
if dist.get_rank() == 1:
    raise RuntimeError("rank 1 cannot read its shard")
dist.barrier()
"""

# Every rank contributes rank+1 to an all-reduce and prints what it saw.
SUMMING_RANK = """
import os, sys
from datetime import timedelta
import torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=timedelta(seconds=120))
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
print(f"rank {dist.get_rank()} world {dist.get_world_size()} sum {total.item():g} local {os.environ['LOCAL_RANK']}")
dist.destroy_process_group()
"""


def _ondol(args: list[str], env: dict[str, str] | None = None, timeout: float = LAUNCH_TIMEOUT_S):
    return subprocess.run([sys.executable, "-m", "ondol.launch.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT, timeout=timeout, check=False)


def _module(tmp_path: Path, name: str, source: str) -> dict[str, str]:
    (tmp_path / f"{name}.py").write_text(source)
    return {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_a_rank_that_raises_stops_the_launch_with_its_error(tmp_path):
    env = _module(tmp_path, "failing_rank", FAILING_RANK)
    run = tmp_path / "run"
    started = time.monotonic()
    result = _ondol(["launch", TINY, f"run_dir={run}", "launch.gpus_per_node=2", "launch.master_port=0",
                     "launch.watchdog_minutes=2", "--module", "failing_rank"], env)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < 120  # the watchdog is 2 min and the ranks' collective timeout 2 min: neither was needed
    lines = result.stderr.splitlines()
    (summary,) = [x for x in lines if x.startswith("ondol launch: rank")]
    assert summary.startswith("ondol launch: rank 1 on ")
    assert "failed with exit code 1" in summary  # rank 0 may also record its broken collective, listed after
    assert summary.endswith(": RuntimeError: rank 1 cannot read its shard")
    assert f"  last lines of {run.resolve() / 'logs' / 'rank1.log'}:" in lines
    assert 'raise RuntimeError("rank 1 cannot read its shard")' in result.stderr  # the traceback, surfaced
    log1 = (run / "logs" / "rank1.log").read_text()
    assert "rank 1/2 on" in log1 and "RuntimeError: rank 1 cannot read its shard" in log1
    assert json.loads((run / "logs" / "rank1.exit").read_text())["exit_code"] == 1


def _stand_ins(tmp_path: Path, env: dict[str, str], **scripts: str) -> None:
    """Put executables (name -> shell script) first on env's PATH, in place of cluster tools this machine lacks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


# A rank that says it started, records its pid, and then hangs without output.
HANGING_RANK = """
import os, pathlib, time
print("started", flush=True)
pathlib.Path(os.environ["PIDS_DIR"], f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
time.sleep(3600)
"""


@pytest.mark.slow
def test_the_watchdog_stops_a_hung_launch_and_leaves_no_rank_behind(tmp_path):
    """test_launch_plan checks the watchdog rule on a plain command; here the whole DeepSpeed process tree."""
    env = {**_module(tmp_path, "hanging_rank", HANGING_RANK), "PIDS_DIR": str(tmp_path)}
    started = time.monotonic()
    result = _ondol(["launch", TINY, f"run_dir={tmp_path / 'run'}", "launch.gpus_per_node=2",
                     "launch.master_port=0", "launch.watchdog_minutes=0.5", "--module", "hanging_rank"], env)
    assert result.returncode != 0 and time.monotonic() - started < 150
    assert "ondol launch: watchdog: no rank log in" in result.stderr
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
    assert len(pids) == 2  # both ranks had started before the watchdog stopped them
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def _free_port_in(low: int, high: int) -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if low <= port < high:
            return port
    pytest.skip(f"no free port in [{low}, {high}) for the stand-in Slurm job id")


FAKE_SRUN = """#!/bin/bash
# stand-in for srun: run the command once per node (in parallel) with that node's SLURM_NODEID
nodes=1
while [[ $1 == --* ]]; do
  case $1 in --nodes=*) nodes=${1#--nodes=};; esac
  shift
done
pids=()
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

# Two names for this machine stand for two allocated nodes.
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && printf '127.0.0.1\\nlocalhost\\n'
"""


@pytest.mark.slow
def test_generated_sbatch_script_runs_one_launcher_per_node(tmp_path):
    """The script itself, run by bash with stand-ins for srun and scontrol: 2 nodes x 1 gloo worker.
    test_launch_plan checks the same script field by field and its syntax with `bash -n`."""
    env = _module(tmp_path, "summing_rank", SUMMING_RANK)
    _stand_ins(tmp_path, env, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
    run = tmp_path / "run"
    venv_bin = Path(sys.executable).parent
    generated = _ondol(["launch", TINY, f"run_dir={run}", "launch.launcher=slurm", "launch.nodes=2",
                        "launch.gpus_per_node=1", "launch.slurm.request_gpus=false", "launch.watchdog_minutes=2",
                        f"launch.slurm.setup=[export PATH={venv_bin}:$PATH]", "--module", "summing_rank"], env)
    assert generated.returncode == 0, generated.stderr
    script = run / "launch" / "ondol.sbatch"
    assert f"wrote {script.resolve()}" in generated.stdout
    job_id = _free_port_in(20000, 60000) - 20000  # the script derives MASTER_PORT = 20000 + job id
    slurm_env = {**os.environ, **env, "SLURM_JOB_ID": str(job_id),
                 "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2"}
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=slurm_env,
                            timeout=LAUNCH_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"ondol: job {job_id} on 2 node(s), master 127.0.0.1:{20000 + job_id}" in result.stdout
    assert (run / "launch" / f"hostfile.{job_id}").read_text() == "127.0.0.1 slots=1\nlocalhost slots=1\n"
    for rank in (0, 1):  # one rank per node, local rank 0 on each, both in one world of 2
        log = (run / "logs" / f"rank{rank}.log").read_text()
        assert f"rank {rank} world 2 sum 3 local 0" in log
    assert "rank 0 world 2 sum 3" in result.stdout  # the supervisor echoed rank 0 into the job output


TINY_RUN = """\
# configs/model/tiny.yaml on a slice of real Korean reviews, 4 steps on 2 gloo workers
defaults:
  - model/tiny.yaml
run_dir: {run_dir}
seed: 7
data:
  sources:
    - name: ko_reviews
      path: ${{corpora_dir}}/ko_reviews.jsonl.gz
      max_docs: 400
  seq_len: 64
  val_fraction: 0.05
  num_proc: 1
tokenizer:
  vocab_size: 2048
  hangul_coverage: false
  num_threads: 1
train:
  steps: 4
  micro_batch_size: 2
  eval_every: 4
  eval_batches: 1
  save_every: 4
  log_every: 1
optim:
  warmup_steps: 1
logging:
  progress: false
deepspeed:
  timeout_minutes: 3
launch:
  gpus_per_node: 2
  master_port: 0
  global_batch_size: 4
  watchdog_minutes: 3
"""


@pytest.fixture
def tiny_run(tmp_path, corpora) -> Path:
    """A run config with its tokenizer trained and its data prepared (small), as `ondol run` would leave them."""
    from ondol.data.preparation import prepare
    from ondol.tokenizer.train import train_tokenizer

    config = tmp_path / "tiny-run.yaml"
    config.write_text(TINY_RUN.format(run_dir=tmp_path / "run"))
    cfg = load_config(config)
    tokenizer = train_tokenizer(cfg.tokenizer, cfg.data.sources, tokenizer_dir(cfg), cfg.seed)
    prepare(cfg.data, tokenizer, data_dir(cfg), cfg.seed, progress=False)
    return config


FAKE_PDSH = """#!/bin/bash
# stand-in for pdsh: run the remote command here once per -w host (in parallel), %n = the host's index
hosts=""
while [[ $# -gt 0 ]]; do
  case $1 in
    -w) hosts=$2; shift 2;;
    -f) shift 2;;
    -S) shift;;
    *) break;;
  esac
done
IFS=, read -ra list <<< "$hosts"
pids=()
for i in "${!list[@]}"; do bash -c "${*//%n/$i}" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


@pytest.mark.slow
def test_hostfile_launch_through_deepspeeds_pdsh_runner(tmp_path):
    """launch.launcher=pdsh for real through DeepSpeed's multi-node runner, with stand-ins for pdsh and ssh
    that treat two names of this machine as two nodes (1 gloo worker each). The dry-run test covers the
    command line; this one shows the ranks it starts form one world."""
    env = _module(tmp_path, "summing_rank", SUMMING_RANK)
    _stand_ins(tmp_path, env, pdsh=FAKE_PDSH, ssh="#!/bin/sh\nexit 0\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=4\nlocalhost slots=4\n")
    run = tmp_path / "run"
    port = _free_port_in(1024, 65536)
    result = _ondol(["launch", TINY, f"run_dir={run}", "launch.launcher=pdsh", f"launch.hostfile={hostfile}",
                     "launch.nodes=2", "launch.gpus_per_node=1", f"launch.master_port={port}",
                     "launch.watchdog_minutes=2", "--module", "summing_rank"], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "preflight: hosts: all reachable over ssh" in result.stdout
    assert (run / "launch" / "hostfile").read_text() == "127.0.0.1 slots=1\nlocalhost slots=1\n"
    for rank in (0, 1):
        assert f"rank {rank} world 2 sum 3 local 0" in (run / "logs" / f"rank{rank}.log").read_text()


FAKE_MPIRUN = """#!/bin/bash
# stand-in for OpenMPI's mpirun: start -n copies of the program here with OpenMPI's rank variables
n=1
while [[ $# -gt 0 ]]; do
  case $1 in
    -n) n=$2; shift 2;;
    -hostfile|-x) shift 2;;
    --mca) shift 3;;
    *) break;;
  esac
done
pids=()
for ((i = 0; i < n; i++)); do
  OMPI_COMM_WORLD_RANK=$i OMPI_COMM_WORLD_SIZE=$n OMPI_COMM_WORLD_LOCAL_RANK=$i "$@" & pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


@pytest.mark.slow
def test_hostfile_launch_through_deepspeeds_openmpi_runner(tmp_path):
    """launch.launcher=openmpi through DeepSpeed's runner with a stand-in mpirun that sets only OpenMPI's rank
    variables: ondol.launch.rank must turn them (and --master-addr/--master-port) into torch's."""
    env = _module(tmp_path, "summing_rank", SUMMING_RANK)
    _stand_ins(tmp_path, env, mpirun=FAKE_MPIRUN, ompi_info="#!/bin/sh\nexit 0\n", ssh="#!/bin/sh\nexit 0\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run = tmp_path / "run"
    port = _free_port_in(1024, 65536)
    result = _ondol(["launch", TINY, f"run_dir={run}", "launch.launcher=openmpi", f"launch.hostfile={hostfile}",
                     "launch.gpus_per_node=2", f"launch.master_port={port}", "launch.watchdog_minutes=2",
                     "--module", "summing_rank"], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} world 2 sum 3 local {rank}" in (run / "logs" / f"rank{rank}.log").read_text()


def test_two_cpu_workers_stop_on_sigterm_resume_and_a_rank_error_stops_the_launch(tiny_run):
    """Two gloo workers train the tiny config. SIGTERM to `ondol launch` (as Slurm or a user would send it): the
    supervisor writes the stop file, both ranks save the same step and exit 75, nothing is left running; the same
    command then finishes the run, with a checkpoint of both ranks and the final weights as one shard per rank.
    A trainer error on every rank (a checkpoint of another shape) then stops the launch with that error."""
    run = tiny_run.parent / "run"
    steps = ["train.steps=16", "train.save_every=100", "train.eval_every=100"]
    proc = subprocess.Popen([sys.executable, "-m", "ondol.launch.cli", "launch", str(tiny_run), *steps],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "logs" / "rank0.log"
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not (log.is_file() and "step      3 |" in log.read_text()) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 75, out[-3000:] + err[-3000:]
    assert "ondol launch: received SIGTERM: every rank saves a checkpoint" in out
    assert "ondol launch: stopped on request" in out
    pids = [int(line.split("(pid ")[1].split(")")[0]) for r in (0, 1)
            for line in (run / "logs" / f"rank{r}.log").read_text().splitlines() if "(pid " in line]
    assert len(pids) == 2
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    for r in (0, 1):
        assert json.loads((run / "logs" / f"rank{r}.exit").read_text())["exit_code"] == 75
    checkpoints = run / "checkpoints"
    stopped = int((checkpoints / "latest").read_text().strip().removeprefix("step_"))
    assert 3 <= stopped < 16
    assert not (run / "launch" / "stop").exists()  # the request was consumed

    result = _ondol(["launch", str(tiny_run), *steps])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "preflight: global batch: train.micro_batch_size (2) x train.grad_accum (1) x data-parallel size (2) " \
           "= 4 sequences" in result.stdout
    assert "all ranks finished" in result.stdout
    assert f"resumed from {checkpoints.resolve() / f'step_{stopped:08d}'} at step {stopped}" in log.read_text()
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 17))
    assert (checkpoints / "latest").read_text().strip() == "step_00000016"
    meta = json.loads((checkpoints / "step_00000016" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 16
    assert sorted(p.name for p in (checkpoints / "step_00000016").glob("rng_rank*.pt")) == ["rng_rank0.pt",
                                                                                           "rng_rank1.pt"]
    for rank in (0, 1):
        assert f"rank {rank}/2 on" in (run / "logs" / f"rank{rank}.log").read_text()
        assert json.loads((run / "logs" / f"rank{rank}.exit").read_text())["exit_code"] == 0
    # the final weights as one shard per rank plus their index (no rank gathers the whole model)
    assert sorted(p.name for p in (run / "model").glob("model*")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.index.json"]
    assert load_pretrained(run / "model").cfg.n_layers == 4

    started = time.monotonic()
    result = _ondol(["launch", str(tiny_run), *steps, "model.n_layers=2"])
    assert result.returncode != 0 and time.monotonic() - started < 180  # launch.watchdog_minutes=3
    (summary,) = [x for x in result.stderr.splitlines() if x.startswith("ondol launch: rank")]
    assert "failed with exit code 6" in summary and result.returncode == 6  # TrainError's code (ondol/errors.py)
    assert f"python -m ondol.train: train error: cannot resume from {checkpoints.resolve() / 'step_00000016'}" \
        in summary
    # the failing rank's line once, with where its log is, not a traceback per rank
    assert "Traceback" not in result.stderr and "  rank log: " in result.stderr
