"""The test clusters themselves: real jobs on the one-node Slurm cluster, real commands over the private sshd."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from clusters import SSH_HOSTS, job_record, job_state, run_slurm, wait_job

from ondol.launch.launcher import free_port


def wait_for(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} not written within {timeout:.0f} s"
        time.sleep(0.1)
    return path.read_text()


def sbatch(cluster, script: str, tmp_path: Path, *options: str) -> str:
    """Submit a bash script (its output in tmp_path/job.out); the job's id."""
    path = tmp_path / "job.sh"
    path.write_text("#!/bin/bash\n" + textwrap.dedent(script))
    return run_slurm(cluster.env, "sbatch", "--parsable", f"--output={tmp_path}/job.out", f"--chdir={tmp_path}",
                     *options, str(path)).strip()


def test_wrap_job_runs_to_completed(slurm_cluster, tmp_path):
    out = tmp_path / "wrote.txt"
    job = run_slurm(slurm_cluster.env, "sbatch", "--parsable", f"--output={tmp_path}/job.out",
                    f"--wrap=echo written by $SLURM_JOB_ID on $SLURMD_NODENAME > {shlex.quote(str(out))}").strip()
    assert wait_job(job, slurm_cluster.env) == "COMPLETED"
    record = job_record(job, slurm_cluster.env)
    assert record["NodeList"] in slurm_cluster.nodes
    assert out.read_text() == f"written by {job} on {record['NodeList']}\n"
    assert record["ExitCode"] == "0:0"


def test_failing_job_is_failed_with_its_exit_code(slurm_cluster, tmp_path):
    job = run_slurm(slurm_cluster.env, "sbatch", "--parsable", f"--output={tmp_path}/job.out",
                    "--wrap=exit 3").strip()
    assert wait_job(job, slurm_cluster.env) == "FAILED"
    assert job_record(job, slurm_cluster.env)["ExitCode"] == "3:0"


def test_usr1_from_scancel_batch_reaches_the_script(slurm_cluster, tmp_path):
    job = sbatch(slurm_cluster, """\
        trap 'echo "USR1 in $SLURM_JOB_ID" > usr1; kill $sleeper; exit 0' USR1
        sleep 300 & sleeper=$!
        echo ready > ready
        wait $sleeper
        echo "not signalled" > usr1
        """, tmp_path)
    wait_for(tmp_path / "ready")
    assert job_state(job, slurm_cluster.env) == "RUNNING"
    run_slurm(slurm_cluster.env, "scancel", "--signal=USR1", "--batch", job)
    assert wait_job(job, slurm_cluster.env) == "COMPLETED"
    assert (tmp_path / "usr1").read_text() == f"USR1 in {job}\n"


def test_requeue_runs_the_job_again_with_restart_count_1(slurm_cluster, tmp_path):
    """`scontrol requeue` from outside; a script that requeues itself, as ondol's sbatch script does after a
    USR1 stop, runs in tests/test_launch_slurm.py."""
    job = sbatch(slurm_cluster, """\
        echo "run ${SLURM_RESTART_COUNT-unset}" >> runs
        if [ -z "$SLURM_RESTART_COUNT" ]; then
            sleep 300 & wait
        fi
        """, tmp_path)
    wait_for(tmp_path / "runs")
    run_slurm(slurm_cluster.env, "scontrol", "requeue", job)
    assert wait_job(job, slurm_cluster.env) == "COMPLETED"
    assert (tmp_path / "runs").read_text().splitlines() == ["run unset", "run 1"]
    assert job_record(job, slurm_cluster.env)["Restarts"] == "1"


def test_two_node_job_runs_one_srun_task_per_node(slurm_cluster, tmp_path):
    if len(slurm_cluster.nodes) < 2:
        pytest.skip(f"one node only: this machine's hostname is {slurm_cluster.nodes[0]}")
    job = sbatch(slurm_cluster, """\
        scontrol show hostnames "$SLURM_JOB_NODELIST" > hostnames
        srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'echo $SLURM_NODEID $SLURMD_NODENAME' > tasks
        """, tmp_path, "--nodes=2", "--ntasks-per-node=1")
    assert wait_job(job, slurm_cluster.env) == "COMPLETED", (tmp_path / "job.out").read_text()
    hostnames = (tmp_path / "hostnames").read_text().split()
    assert sorted(hostnames) == sorted(slurm_cluster.nodes)
    # Node i of the job is the i-th of its hostnames: the first one is where node rank 0 runs.
    assert sorted((tmp_path / "tasks").read_text().splitlines()) == [f"{i} {h}" for i, h in enumerate(hostnames)]


def test_pdsh_runs_commands_over_the_private_sshd(ssh_localhost):
    # The command line DeepSpeed's pdsh runner uses; $SSH_CONNECTION shows that sshd ran the command.
    done = subprocess.run(["pdsh", "-S", "-f", "1024", "-w", ",".join(ssh_localhost.hosts), "echo $SSH_CONNECTION"],
                          env=ssh_localhost.env, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = sorted(done.stdout.splitlines())
    assert [line.split(":")[0] for line in lines] == sorted(SSH_HOSTS)
    assert all(line.split()[-1] == str(ssh_localhost.port) for line in lines), lines


def test_pdsh_returns_the_remote_exit_status(ssh_localhost):
    done = subprocess.run(["pdsh", "-S", "-w", ssh_localhost.hosts[0], "exit 3"], env=ssh_localhost.env,
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 3, done.stderr


@pytest.mark.slow
def test_deepspeed_pdsh_runner_starts_one_rank_per_host(ssh_localhost, tmp_path):
    """DeepSpeed's own pdsh runner over the aliases, as a launch.launcher=pdsh run (~20 s, mostly imports)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{host} slots=1\n" for host in ssh_localhost.hosts))
    script = tmp_path / "rank.py"
    script.write_text("import os, pathlib\n"
                      "pathlib.Path(__file__).with_name(os.environ['RANK']).write_text(os.environ['WORLD_SIZE'])\n")
    # A plain `ssh ondol-node1` (DeepSpeed's ssh check and master-address lookup) does not know the aliases.
    done = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(hostfile),
                           "--launcher", "pdsh", "--no_ssh_check", "--master_addr", "localhost",
                           "--master_port", str(free_port()), str(script)],
                          env=ssh_localhost.env, cwd=tmp_path, capture_output=True, text=True, check=False,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [(tmp_path / rank).read_text() for rank in ("0", "1")] == ["2", "2"]


CHILD_SESSION = """\
import os
import time
from pathlib import Path

from clusters import run_slurm, slurm_cluster, ssh_localhost, wait_job  # noqa: F401


def test_leave_a_job_running(slurm_cluster, ssh_localhost, tmp_path):
    job = run_slurm(slurm_cluster.env, "sbatch", "--parsable", "--output=/dev/null",
                    f"--wrap=echo $$ > {tmp_path}/job.pid; sleep 300").strip()
    wait_job(job, slurm_cluster.env, states=frozenset({"RUNNING"}))
    root = slurm_cluster.conf.parent
    pid_files = [root / "munge/munged.pid", *root.glob("*.pid"), ssh_localhost.config.parent / "sshd.pid"]
    assert len(pid_files) == 3 + len(slurm_cluster.nodes)
    pids = [p.read_text().split()[0] for p in pid_files]
    while not (tmp_path / "job.pid").exists():
        time.sleep(0.1)
    Path(os.environ["REPORT"]).write_text(" ".join(pids + [(tmp_path / "job.pid").read_text().strip()]) + "\\n"
                                          + f"{root} {ssh_localhost.config.parent}")
"""


def test_session_end_stops_every_daemon_and_job(tmp_path):
    """A pytest session that leaves a job running ends with none of its daemons, job processes or files left."""
    (tmp_path / "test_child.py").write_text(CHILD_SESSION)
    report = tmp_path / "report"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parent), "REPORT": str(report)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull,
                           "--rootdir", str(tmp_path), str(tmp_path / "test_child.py")],
                          env=env, capture_output=True, text=True, check=False, timeout=120)
    if " skipped" in done.stdout:
        pytest.skip(f"the child session skipped: {done.stdout.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stdout[-3000:]
    pids, dirs = report.read_text().splitlines()
    alive = [pid for pid in pids.split() if Path(f"/proc/{pid}").exists()]
    assert alive == [], f"processes left behind: {alive}"
    assert [d for d in dirs.split() if Path(d).exists()] == []
