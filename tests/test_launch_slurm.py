"""`ondol launch` on a real Slurm cluster (tests/clusters.py: munged, slurmctld and two slurmd on this machine):
the generated script runs to completion, and USR1 to its batch shell (what `--signal=B:USR1@N` sends before the
time limit) makes every rank save and stop, the script requeue its own job, and the requeued job resume to the
weights of an uninterrupted job, bit for bit; by default the launcher task of each node holds all its CPUs."""

from __future__ import annotations

import json
import time

from clusters import job_record, run_slurm, wait_job
from test_launch_run import TINY, _module, _ondol, tiny_run  # noqa: F401 (the fixture is used by name)

from ondol.model.io import load_pretrained

JOB_TIMEOUT_S = 600


def _submit(config, run_dir, env: dict[str, str]) -> str:
    result = _ondol(["launch", str(config), f"run_dir={run_dir}", "launch.launcher=slurm", "launch.nodes=2",
                     "launch.gpus_per_node=1", "launch.slurm.request_gpus=false", "train.steps=16",
                     "train.save_every=100", "train.eval_every=100",
                     "launch.slurm.cpus_per_node=1", "--submit"], env)  # one CPU each: both jobs run at once
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout.split("submitted Slurm job ")[1].split(":")[0]


def test_usr1_before_the_time_limit_saves_requeues_and_resumes_bit_identical(tiny_run, slurm_cluster):  # noqa: F811
    run = tiny_run.parent / "run"  # the fixture prepared its tokenizer and data here
    reference = tiny_run.parent / "reference"
    reference.mkdir()
    for name in ("tokenizer", "data"):
        (reference / name).symlink_to(run / name, target_is_directory=True)
    env = slurm_cluster.env
    ref_job = _submit(tiny_run, reference, env)
    job = _submit(tiny_run, run, env)

    log = run / "logs" / "rank0.log"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (log.is_file() and "step      3 |" in log.read_text()):
        assert time.monotonic() < deadline and job_record(job, env)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    run_slurm(env, "scancel", "--signal=USR1", "--batch", job)
    assert wait_job(job, env, timeout=JOB_TIMEOUT_S) == "COMPLETED"
    assert wait_job(ref_job, env, timeout=JOB_TIMEOUT_S) == "COMPLETED"

    output = (run / "logs" / f"slurm-{job}.out").read_text()
    assert job_record(job, env)["Restarts"] == "1", output[-3000:]
    assert f"ondol: saved before the time limit; requeueing job {job}" in output  # the script requeued itself
    assert "(restart 1)" in output  # --open-mode=append kept the first attempt's output above the second's
    stopped = [line for line in log.read_text().splitlines() if line.startswith("resumed from")]
    assert len(stopped) == 1 and 3 <= int(stopped[0].rsplit(" ", 1)[1]) < 16
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 17))
    ref, got = (load_pretrained(d / "model").state_dict() for d in (reference, run))  # per-rank shards
    assert ref.keys() == got.keys() and all((got[k] == ref[k]).all() for k in ref)


# A rank that reports the CPUs Slurm gave its task and the node.
CPU_RANK = """
import os
print(f"node {os.environ['SLURM_NODEID']} task cpus {os.environ.get('SLURM_CPUS_PER_TASK')} "
      f"node cpus {os.environ['SLURM_CPUS_ON_NODE']}", flush=True)
"""


def test_default_script_gives_each_node_launcher_every_cpu_of_the_node(slurm_cluster, tmp_path):
    env = {**slurm_cluster.env, **_module(tmp_path, "cpu_rank", CPU_RANK)}
    run = tmp_path / "run"
    result = _ondol(["launch", TINY, f"run_dir={run}", "launch.launcher=slurm", "launch.nodes=2",
                     "launch.gpus_per_node=1", "launch.slurm.request_gpus=false", "launch.slurm.stop_signal_s=0",
                     "--module", "cpu_rank", "--submit"], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = (run / "launch" / "ondol.sbatch").read_text().splitlines()
    assert '#SBATCH "--exclusive"' in lines and not [x for x in lines if x.startswith("#SBATCH \"--cpus")]
    srun = [x for x in lines if " srun " in x]
    assert len(srun) == 1 and ' --kill-on-bad-exit=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" bash -c ' in srun[0]
    job = result.stdout.split("submitted Slurm job ")[1].split(":")[0]
    assert wait_job(job, env, timeout=JOB_TIMEOUT_S) == "COMPLETED", (run / "logs").iterdir()
    cpus = slurm_cluster.cpus
    for rank in (0, 1):
        assert f"task cpus {cpus} node cpus {cpus}" in (run / "logs" / f"rank{rank}.log").read_text()
