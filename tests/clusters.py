"""Real clusters on this machine for tests: a two-node Slurm cluster and a private sshd that pdsh can use.

Each runs its own daemons (munged + slurmctld + slurmd; sshd) with its own keys, sockets, free ports and state in
a temp dir, so it clashes with nothing installed here, and stops them at the end of the session. When this
machine cannot run one (not root, a binary missing, a daemon that does not come up), the fixture skips the test
with one line saying why; with ONDOL_CLUSTERS=required in the environment (CI, where the packages were just
installed) it fails instead, so a broken cluster cannot pass as a skip.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ondol.launch.launcher import free_port

START_TIMEOUT_S = 30.0
# States a Slurm job does not leave on its own (a requeue can still take it out of them).
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                          "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})
# Variables that would steer the Slurm commands away from the test cluster (e.g. pytest itself run in a job).
SLURM_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCANCEL_")
SSH_HOSTS = ("ondol-node1", "ondol-node2")


def unavailable(reason: str) -> None:
    """Skip (or, with ONDOL_CLUSTERS=required, fail) the test that needs a cluster, with one line."""
    if os.environ.get("ONDOL_CLUSTERS") == "required":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def missing_binaries(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if shutil.which(name) is None]


def last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1].strip() if lines else "(empty log)"


PRCTL = ctypes.CDLL(None).prctl
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends it SIGTERM if pytest dies without tearing down."""
    PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


class Daemons:
    """Daemons run in the foreground as children of pytest, each logging to a file; stopped in reverse order."""

    def __init__(self, name: str) -> None:
        self.name = name  # what they make up, to start the lines of unavailable()
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent)  # noqa: PLW1509 (no threads, one libc call)
        self.procs.append((proc, log))
        return proc

    def wait_until(self, ready: Callable[[], bool], what: str) -> None:
        """Poll ready() until it holds; unavailable() if a daemon exits or START_TIMEOUT_S passes."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            # Checked first: a client command asking a daemon that has died waits for its timeout.
            for proc, log in self.procs:
                if proc.poll() is not None:
                    unavailable(f"{self.name}: {Path(proc.args[0]).name} exited with {proc.returncode} before "
                                f"{what}: {last_line(log)}")
            if ready():
                return
            if time.monotonic() > deadline:
                proc, log = self.procs[-1]
                unavailable(f"{self.name}: {what} not within {START_TIMEOUT_S:.0f} s; {Path(proc.args[0]).name}'s "
                            f"last log line: {last_line(log)}")
            time.sleep(0.2)

    def stop(self) -> None:
        for proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


# ---------------------------------------------------------------------------------------------- Slurm


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster: pass `env` to sbatch/squeue/scancel/scontrol/srun (it sets SLURM_CONF).

    Its nodes are one slurmd each on this machine, named this machine's short hostname and `localhost` so that
    a node name (e.g. MASTER_ADDR taken from $SLURM_JOB_NODELIST) resolves to this machine; each has all of
    this machine's CPUs (`cpus`), so `sbatch --nodes=2` runs a real two-node job here."""

    conf: Path
    nodes: tuple[str, ...]
    cpus: int  # per node
    env: dict[str, str]


def run_slurm(env: dict[str, str], *args: str) -> str:
    """A Slurm command's stdout; its stderr in the error when it fails."""
    done = subprocess.run(args, env=env, check=False, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def job_record(job_id: str | int, env: dict[str, str]) -> dict[str, str]:
    """`scontrol show job -o`'s fields of a job (finished jobs stay listed for MinJobAge=3600 s)."""
    line = run_slurm(env, "scontrol", "show", "job", "-o", str(job_id))
    # Fields are space separated `Key=value`; a value such as Command or WorkDir may itself hold spaces.
    return dict(re.findall(r"(?:^| )([\w/:]+)=(.*?)(?= [\w/:]+=|$)", line.strip()))


def job_state(job_id: str | int, env: dict[str, str]) -> str:
    """The job's state as scontrol reports it: PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, ..."""
    return job_record(job_id, env)["JobState"]


def wait_job(job_id: str | int, env: dict[str, str], timeout: float = 60.0,
             states: frozenset[str] = FINAL_STATES) -> str:
    """Poll until the job is in one of `states` (by default a final one) and return that state."""
    deadline = time.monotonic() + timeout
    while (state := job_state(job_id, env)) not in states:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s, waiting for "
                               f"{'/'.join(sorted(states))}")
        time.sleep(0.2)
    return state


def slurm_conf(root: Path, nodes: tuple[str, ...], cpus: int, memory_mb: int) -> str:
    # Every node is a slurmd of this host (NodeHostname) on its own port; each gets an equal share of memory.
    host = nodes[0]
    node_lines = "\n".join(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
                           f"CPUs={cpus} RealMemory={memory_mb // len(nodes)} State=UNKNOWN" for node in nodes)
    return f"""\
ClusterName=ondoltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays the restart of a requeued job (default 120 s)
AuthInfo=socket={root}/munge/munge.sock,cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# a pending job whose begin time passes (a requeued one) starts within a second (default: within 60 s)
SchedulerParameters=sched_interval=1
JobRequeue=1
KillWait=30
MinJobAge=3600
ReturnToService=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def memory_mb() -> int:
    """Half of this machine's memory: the nodes' RealMemory must not exceed what slurmd finds, or they drain."""
    kb = int(re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())[1])
    return kb // 1024 // 2


def cancel_all(env: dict[str, str], timeout: float) -> None:
    """Cancel every job and wait until none runs (a job that ignores SIGTERM is killed after KillWait)."""
    ids = run_slurm(env, "squeue", "-h", "-o", "%i").split()
    if ids:
        run_slurm(env, "scancel", *ids)
    deadline = time.monotonic() + timeout
    while run_slurm(env, "squeue", "-h", "-o", "%i").split() and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """munged, slurmctld and two slurmd for this machine alone, up until the end of the test session."""
    if os.geteuid() != 0:
        unavailable("slurm cluster: needs root (slurmd runs jobs as their user)")
    if missing := missing_binaries(("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "scontrol", "scancel",
                                    "squeue", "srun")):
        unavailable(f"slurm cluster: {', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
    # Not under pytest's tmp_path: munged wants every directory above its socket searchable by all.
    root = Path(tempfile.mkdtemp(prefix="ondol-slurm-"))
    conf = root / "slurm.conf"
    from conftest import without_rank_variables

    env = {k: v for k, v in without_rank_variables(os.environ).items() if not k.startswith(SLURM_ENV_PREFIXES)}
    env |= {"SLURM_CONF": str(conf)}
    daemons = Daemons("slurm cluster")
    up = False
    try:
        root.chmod(0o755)
        host = socket.gethostname().split(".")[0]
        nodes = (host, "localhost") if host != "localhost" else (host,)
        for sub in ("munge", "state", *(f"spool/{node}" for node in nodes)):
            (root / sub).mkdir(mode=0o755, parents=True)
        munge = root / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        cpus = len(os.sched_getaffinity(0))
        conf.write_text(slurm_conf(root, nodes, cpus, memory_mb()))
        daemons.start([shutil.which("munged"), "--foreground", f"--socket={munge}/munge.sock",
                       f"--key-file={key}", f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/munged.seed"],
                      munge / "munged.log")
        daemons.wait_until(lambda: (munge / "munge.sock").exists(), "munged's socket")
        daemons.start([shutil.which("slurmctld"), "-D", "-f", str(conf)], root / "slurmctld.stderr")
        for node in nodes:
            daemons.start([shutil.which("slurmd"), "-D", "-N", node, "-f", str(conf)],
                          root / f"slurmd-{node}.stderr")

        def idle() -> bool:
            sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, check=False, capture_output=True,
                                   text=True, timeout=30)
            return sinfo.stdout.split() == ["idle"] * len(nodes)

        daemons.wait_until(idle, f"nodes {','.join(nodes)} idle in sinfo")
        up = True
        yield SlurmCluster(conf=conf, nodes=nodes, cpus=cpus, env=env)
    finally:
        try:
            if up:
                cancel_all(env, timeout=40)
        finally:
            daemons.stop()
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- ssh


@dataclass(frozen=True)
class SshHosts:
    """A private sshd on 127.0.0.1 reachable as SSH_HOSTS through `ssh -F config HOST`.

    `env` makes pdsh use it: PDSH_RCMD_TYPE=ssh and PDSH_SSH_ARGS_APPEND="-F config" (DeepSpeed's pdsh runner
    appends its own `-p PORT` to the latter and keeps the rest). A plain `ssh HOST` without -F does not know
    the hosts, so DeepSpeed needs --no_ssh_check and --master_addr with them."""

    config: Path
    hosts: tuple[str, ...]
    port: int
    env: dict[str, str]


def sshd_config(root: Path, port: int, user: str) -> str:
    return f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {root}/ssh_host_ed25519_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
AllowUsers {user}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
"""


def ssh_client_config(root: Path, port: int, user: str) -> str:
    return f"""\
Host {' '.join(SSH_HOSTS)}
    HostName 127.0.0.1
    Port {port}
    User {user}
    IdentityFile {root}/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile {root}/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    LogLevel ERROR
"""


@pytest.fixture(scope="session")
def ssh_localhost() -> Iterator[SshHosts]:
    """sshd with its own host key, user key and config, listening on a free port of 127.0.0.1."""
    if missing := missing_binaries(("sshd", "ssh", "ssh-keygen", "pdsh")):
        unavailable(f"ssh hosts: {', '.join(missing)} not installed (apt-get install openssh-server pdsh)")
    sshd = shutil.which("sshd")  # sshd re-executes itself and so must be started by its absolute path
    if os.geteuid() == 0:
        # sshd started as root insists on its privilege-separation directory, which Debian's service creates.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="ondol-ssh-"))
    daemons = Daemons("ssh hosts")
    try:
        for key in ("ssh_host_ed25519_key", "id_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True,
                           capture_output=True)
        shutil.copy(root / "id_ed25519.pub", root / "authorized_keys")
        port = free_port()
        host_key = (root / "ssh_host_ed25519_key.pub").read_text().split()
        (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
        user = pwd.getpwuid(os.geteuid()).pw_name
        (root / "sshd_config").write_text(sshd_config(root, port, user))
        config = root / "ssh_config"
        config.write_text(ssh_client_config(root, port, user))
        daemons.start([sshd, "-D", "-e", "-f", str(root / "sshd_config")], root / "sshd.log")

        def answers() -> bool:
            return subprocess.run(["ssh", "-F", str(config), SSH_HOSTS[0], "true"], capture_output=True,
                                  check=False, timeout=30).returncode == 0

        daemons.wait_until(answers, f"ssh -F {config} {SSH_HOSTS[0]} true succeeding")
        from conftest import without_rank_variables

        env = without_rank_variables(os.environ) | {"PDSH_RCMD_TYPE": "ssh", "PDSH_SSH_ARGS_APPEND": f"-F {config}"}
        yield SshHosts(config=config, hosts=SSH_HOSTS, port=port, env=env)
    finally:
        daemons.stop()
        shutil.rmtree(root, ignore_errors=True)
