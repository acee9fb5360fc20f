"""Pre-flight checks before a launch: the mistakes that would otherwise surface minutes later on every rank.

Each failed check raises `PreflightError` with one line naming the file/line or config key and what to do;
everything else found (layout, network variables, storage) is returned as report lines.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ondol.configs import RunConfig, data_dir, tokenizer_dir
from ondol.errors import LaunchError
from ondol.launch.config import HOSTNAME, read_env_file
from ondol.launch.script_values import script_value

# Variables that decide how ranks find each other and which network they use.
NETWORK_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_", "TORCH_DISTRIBUTED_", "UCX_", "FI_", "MASTER_ADDR",
                        "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
SHARED_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph", "cephfs",
                      "glusterfs", "wekafs", "panfs", "pvfs2", "orangefs", "9p", "virtiofs")
LOCAL_FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "tmpfs", "overlay", "f2fs", "vfat", "ramfs")
# Variables DeepSpeed's multi-node runners copy into the remote command line (deepspeed/launcher/runner.py
# EXPORT_ENVS plus the CUDA accelerator's), besides every line of .deepspeed_env.
DEEPSPEED_EXPORTED_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
SHELL_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_@%+=:,./-")


class PreflightError(LaunchError):
    """A launch that cannot work as configured; the message is one line saying what to change."""

    kind = "pre-flight"


@dataclass
class Host:
    name: str
    slots: int
    line: int  # 1-based line in the hostfile


@dataclass
class Layout:
    """Where the ranks go: `nodes` x `gpus_per_node` processes (gloo workers on CPU)."""

    nodes: int
    gpus_per_node: int
    hosts: list[str] = field(default_factory=list)  # empty under Slurm: known once the job starts
    cpu: bool = False

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def parse_hostfile(path: str | os.PathLike) -> list[Host]:
    """MPI-style hostfile lines `HOST slots=N`; `#` starts a comment. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise PreflightError(f"hostfile {path} not found (launch.hostfile): write one 'HOST slots=N' line per node")
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots="):
            raise PreflightError(f"hostfile {path}:{number}: expected 'HOST slots=N', got '{raw.strip()}'")
        name, slots = parts[0], parts[1][len("slots="):]
        if not slots.isdigit() or int(slots) < 1:
            raise PreflightError(f"hostfile {path}:{number}: slots must be a positive integer, got '{slots}'")
        if not HOSTNAME.match(name):
            raise PreflightError(f"hostfile {path}:{number}: '{name}' is not a host name or IP address")
        if name in seen:
            raise PreflightError(f"hostfile {path}:{number}: host '{name}' is already listed on line {seen[name]}")
        seen[name] = number
        hosts.append(Host(name, int(slots), number))
    if not hosts:
        raise PreflightError(f"hostfile {path}: no hosts listed (write one 'HOST slots=N' line per node)")
    return hosts


def resolve_layout(cfg: RunConfig) -> Layout:
    """The node/rank layout the launch will use, checked against the hostfile or this machine's devices."""
    lc = cfg.launch
    if lc.launcher == "slurm":
        return Layout(lc.nodes, lc.gpus_per_node, cpu=not lc.slurm.request_gpus)
    if lc.launcher == "local":
        import torch

        gpus = torch.cuda.device_count()
        if gpus and lc.gpus_per_node > gpus:
            raise PreflightError(f"launch.gpus_per_node={lc.gpus_per_node} but this machine has {gpus} GPUs: "
                                 f"set launch.gpus_per_node={gpus} or fewer")
        return Layout(1, lc.gpus_per_node, ["localhost"], cpu=gpus == 0)
    hosts = parse_hostfile(lc.hostfile)
    if len(hosts) < lc.nodes:
        raise PreflightError(f"launch.nodes={lc.nodes} but hostfile {lc.hostfile} lists {len(hosts)} hosts: "
                             f"add hosts or set launch.nodes={len(hosts)}")
    chosen = hosts[: lc.nodes]
    for host in chosen:
        if host.slots < lc.gpus_per_node:
            raise PreflightError(f"hostfile {lc.hostfile}:{host.line}: host '{host.name}' has slots={host.slots} "
                                 f"but launch.gpus_per_node={lc.gpus_per_node}: lower launch.gpus_per_node")
    return Layout(lc.nodes, lc.gpus_per_node, [h.name for h in chosen])


def _zero_option(cfg: RunConfig, key: str) -> int:
    value = (cfg.deepspeed.extra.get("zero_optimization") or {}).get(key, 0)
    return int(value) if value else 0


def check_parallel_layout(cfg: RunConfig, layout: Layout) -> list[str]:
    """World size versus expert and sequence parallelism and ZeRO's sharding groups (MiCS shards, hpZ
    partitions)."""
    world, ep, sp = layout.world_size, cfg.deepspeed.expert_parallel_size, cfg.deepspeed.sequence_parallel_size
    where = f"{layout.nodes} node(s) x {layout.gpus_per_node} per node"
    if world % sp:
        raise PreflightError(f"world size {world} ({where}) is not divisible by deepspeed.sequence_parallel_size="
                             f"{sp}: change launch.gpus_per_node/launch.nodes or the sequence-parallel size")
    if world % ep:
        raise PreflightError(f"world size {world} ({where}) is not divisible by deepspeed.expert_parallel_size={ep}: "
                             "change launch.gpus_per_node/launch.nodes or the expert-parallel size")
    if ep > 1 and not cfg.model.n_experts:
        raise PreflightError(f"deepspeed.expert_parallel_size={ep} needs an MoE model (model.n_experts is 0): set "
                             "deepspeed.expert_parallel_size=1")
    if cfg.model.n_experts and cfg.model.n_experts % ep:
        raise PreflightError(f"model.n_experts={cfg.model.n_experts} is not divisible by "
                             f"deepspeed.expert_parallel_size={ep}: each expert-parallel rank needs the same count")
    mics = _zero_option(cfg, "mics_shard_size")
    if mics > 0 and world % mics:
        raise PreflightError(f"world size {world} ({where}) is not divisible by deepspeed.extra.zero_optimization."
                             f"mics_shard_size={mics}: pick a shard size that divides it")
    hpz = _zero_option(cfg, "zero_hpz_partition_size")
    if hpz > 1 and (world % hpz or layout.gpus_per_node % hpz):
        raise PreflightError(f"deepspeed.extra.zero_optimization.zero_hpz_partition_size={hpz} must divide the GPUs "
                             f"per node ({layout.gpus_per_node}) and the world size ({world})")
    kind = "gloo workers (CPU)" if layout.cpu else "GPUs"
    line = (f"layout: {world} ranks = {layout.nodes} node(s) x {layout.gpus_per_node} {kind}; "
            f"ZeRO stage {cfg.deepspeed.zero_stage}, expert-parallel size {ep}, sequence-parallel size {sp}")
    return [line]


def check_global_batch(cfg: RunConfig, layout: Layout) -> list[str]:
    """micro-batch x grad accumulation x data-parallel size (world / sequence-parallel size) must equal
    launch.global_batch_size when it is set."""
    tr, world = cfg.train, layout.world_size // cfg.deepspeed.sequence_parallel_size
    actual = tr.micro_batch_size * tr.grad_accum * world
    line = (f"global batch: train.micro_batch_size ({tr.micro_batch_size}) x train.grad_accum ({tr.grad_accum}) "
            f"x data-parallel size ({world}) = {actual} sequences")
    wanted = cfg.launch.global_batch_size
    if wanted and wanted != actual:
        per_step = tr.micro_batch_size * world
        fix = (f"set train.grad_accum={wanted // per_step}" if wanted % per_step == 0
               else f"it is not a multiple of micro x data-parallel ({per_step})")
        raise PreflightError(f"launch.global_batch_size={wanted} but {line.split(': ', 1)[1]}: {fix}")
    return [line]


def gpu_memory_gib(cfg: RunConfig, layout: Layout) -> float | None:
    """launch.gpu_memory_gib, else this machine's first GPU for a local launch; None for gloo workers or when
    the cluster's GPUs are not known here."""
    if layout.cpu:
        return None
    if cfg.launch.gpu_memory_gib:
        return cfg.launch.gpu_memory_gib
    if cfg.launch.launcher == "local":
        import torch

        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return None


def check_memory(cfg: RunConfig, layout: Layout, dry_run: bool = False) -> list[str]:
    """The per-GPU memory plan (launch/plan.py); a layout that cannot fit is refused (a dry run warns)."""
    from ondol.launch.plan import fits, plan_for_config, refusal, table

    gpu = gpu_memory_gib(cfg, layout)
    plan = plan_for_config(cfg, layout.nodes, layout.gpus_per_node)
    lines = [f"memory: {line}" for line in table(plan, gpu)]
    if gpu is not None and not fits(plan, gpu):
        line = refusal(cfg, plan, layout.gpus_per_node, gpu)
        if not dry_run:
            raise PreflightError(line)
        lines.append(f"warning: {line} (a real launch stops here)")
    return lines


def timeouts_line(cfg: RunConfig) -> str:
    """How long a broken job can take to stop: what a user tunes when a hang is expected or reported."""
    lc = cfg.launch
    watchdog = f"{lc.watchdog_minutes:g} min without rank output" if lc.watchdog_minutes else "off"
    return (f"timeouts: collectives {cfg.deepspeed.timeout_minutes} min (deepspeed.timeout_minutes), watchdog "
            f"{watchdog} (launch.watchdog_minutes), {lc.failure_grace_s:g} s after a rank fails "
            "(launch.failure_grace_s)")


def network_env_report(environ: dict[str, str] | None = None) -> list[str]:
    """The NCCL / gloo / network variables the ranks will inherit (one line each), or a note that none is set."""
    environ = os.environ if environ is None else environ
    found = sorted(k for k in environ if k.startswith(NETWORK_ENV_PREFIXES))
    if not found:
        return ["network env: no NCCL_/GLOO_/UCX_/FI_ variables set (libraries pick interfaces themselves)"]
    return [f"network env: {k}={environ[k]}" for k in found]


def filesystem_of(path: Path, mounts: str | None = None) -> tuple[str, str]:
    """(filesystem type, mount point) holding `path`, from /proc/mounts (or the given mounts text)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return "unknown", "?"
    path = Path(os.path.abspath(path))
    best = ("unknown", "")
    for entry in mounts.splitlines():
        parts = entry.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = path == Path(point) or Path(point) in path.parents
        if inside and len(point) > len(best[1]):
            best = (parts[2], point)
    return best


def storage_warning(run_dir: str | os.PathLike, nodes: int, mounts: str | None = None) -> str | None:
    """A warning when a multi-node run keeps its run directory on a node-local filesystem."""
    if nodes <= 1:
        return None
    fstype, point = filesystem_of(Path(run_dir), mounts)
    if fstype in SHARED_FILESYSTEMS or fstype.startswith("fuse."):
        return None
    what = "a node-local filesystem" if fstype in LOCAL_FILESYSTEMS else "a filesystem not known to be shared"
    return (f"warning: run_dir {run_dir} is on {what} ({fstype} at {point}): with {nodes} nodes the other nodes "
            "will not see its data, checkpoints and logs; put run_dir on shared storage (NFS, Lustre, GPFS, ...)")


def check_prepared(cfg: RunConfig) -> list[str]:
    """The trainer reads the run's tokenizer and prepared shards: missing ones would fail every rank."""
    tok, data = tokenizer_dir(cfg), data_dir(cfg)
    if not (tok / "meta.json").is_file():
        raise PreflightError(f"no tokenizer in {tok}: run `ondol tokenizer train CONFIG` (or `ondol run`) first")
    if not (data / "manifest.json").is_file():
        raise PreflightError(f"no prepared data in {data} (manifest.json missing): run `ondol data prepare CONFIG` "
                             "first")
    return [f"inputs: tokenizer {tok}, data {data}"]


def unreachable_hosts(hosts: list[str], timeout_s: int = 5) -> list[str]:
    """Hosts that passwordless ssh cannot reach (pdsh / mpirun start remote launchers over ssh)."""
    if not shutil.which("ssh"):
        return list(hosts)

    def fails(host: str) -> bool:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout_s}", host, "true"]
        try:
            return subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=timeout_s + 5).returncode != 0
        except subprocess.TimeoutExpired:
            return True

    with ThreadPoolExecutor(max_workers=min(32, len(hosts) or 1)) as pool:
        return [h for h, bad in zip(hosts, pool.map(fails, hosts)) if bad]


def _looks_secret(name: str) -> bool:
    return any(word in name.upper() for word in SECRET_WORDS)


def check_remote_shell(cfg: RunConfig, environ: dict[str, str] | None = None, home: Path | None = None) -> list[str]:
    """pdsh / OpenMPI / MVAPICH: DeepSpeed's runner writes the working directory, the Python path and exported
    variables unquoted into the remote shell line, and secrets there show in `ps` and its log."""
    import sys

    environ = os.environ if environ is None else environ
    for what, value in (("working directory", os.getcwd()), ("Python executable", sys.executable)):
        if not set(value) <= SHELL_SAFE:
            raise PreflightError(f"the {what} {value!r} has characters a remote shell would interpret and DeepSpeed's "
                                 f"{cfg.launch.launcher} runner does not quote: use a path of letters, digits and ._-/")
    exported = sorted(k for k in environ if k.startswith(DEEPSPEED_EXPORTED_PREFIXES) and _looks_secret(k))
    if exported:
        raise PreflightError(f"{exported[0]} is set and DeepSpeed's {cfg.launch.launcher} runner would put its value on "
                             "the remote command line: unset it and put it in launch.env_file (chmod 600)")
    for folder in (Path.cwd(), home or Path.home()):
        path = folder / ".deepspeed_env"
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            name = line.split("=", 1)[0].strip()
            if _looks_secret(name):
                raise PreflightError(f"{path}:{number}: {name} would be written into the remote command line (visible "
                                     "in ps and DeepSpeed's log): move it to launch.env_file (chmod 600)")
    return ["remote shell: every rank argument is shell-safe; secrets only in launch.env_file"]


def check_env_file(cfg: RunConfig) -> list[str]:
    """launch.env_file exists, is private and well-formed; its variable names (never values) are reported."""
    if not cfg.launch.env_file:
        return []
    # a control character in the path is refused with the path shown escaped: printed as it is, a newline would
    # cut the one-line error before it says what is wrong
    script_value("launch.env_file", cfg.launch.env_file)
    try:
        names = sorted(read_env_file(cfg.launch.env_file))
    except ValueError as e:
        raise PreflightError(str(e)) from None
    line = f"env file: {cfg.launch.env_file} gives every rank {', '.join(names) or 'no variables'}"
    return [f"{line} (values not shown; read on each node)"]


def run_preflight(cfg: RunConfig, *, check_inputs: bool = True, check_hosts: bool = False,
                  dry_run: bool = False) -> tuple[Layout, list[str]]:
    """Every check for this launch; returns the layout and the report lines (raises PreflightError).

    A dry run reports missing tokenizer/data as a warning (they may be prepared before the real launch)."""
    layout = resolve_layout(cfg)
    report: list[str] = []
    if layout.hosts and cfg.launch.launcher != "local":
        report.append(f"hosts: {', '.join(layout.hosts)} (from {cfg.launch.hostfile})")
        if check_hosts:
            bad = unreachable_hosts(layout.hosts)
            if bad:
                raise PreflightError(f"hosts not reachable by passwordless ssh: {', '.join(bad)} (from "
                                     f"{cfg.launch.hostfile}); fix ssh keys/known_hosts or remove them")
            report.append("hosts: all reachable over ssh")
    report += check_parallel_layout(cfg, layout)
    cores = os.cpu_count() or 1
    if layout.cpu and cfg.launch.launcher == "local" and layout.gpus_per_node > cores:
        report.append(f"warning: {layout.gpus_per_node} gloo workers on {cores} CPU cores: they will share cores "
                      "and run slower than fewer workers would")
    report += check_global_batch(cfg, layout)
    report += check_memory(cfg, layout, dry_run)
    if check_inputs:
        try:
            report += check_prepared(cfg)
        except PreflightError as e:
            if not dry_run:
                raise
            report.append(f"warning: {e} (a real launch stops here)")
    report.append(timeouts_line(cfg))
    report += network_env_report()
    report += check_env_file(cfg)
    if cfg.launch.launcher in ("pdsh", "openmpi", "mvapich"):
        report += check_remote_shell(cfg)
        report.append("network env: DeepSpeed forwards NCCL_*, UCX_*, PYTHON* and MV2_* to the other nodes; put "
                      "other variables in ./.deepspeed_env (non-secret) or launch.env_file (secrets)")
    warning = storage_warning(cfg.run_dir, layout.nodes)
    if warning:
        report.append(warning)
    return layout, report
