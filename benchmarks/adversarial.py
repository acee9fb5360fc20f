"""Issue 27's adversarial table, replayed: the real `ondol` program, run as a hostile or a clumsy user would run
it, one row per case: what was done, what is expected (exit code, one line naming the file or key, nothing lost),
what happened, ok or FAIL. Exits 1 if any row fails. benchmarks/README.md lists the cases by group.

Everything runs in a temp folder on configs/tiny-ko.yaml shrunk as tests/golden.py shrinks it (2,048-piece
tokenizer, 3,000 documents, 4 x 64 tokens, fp32 on CPU). The tokenizer and data are built once; a base run is
trained once (4 steps, checkpoints at steps 2 and 4) and copied for each case. "Nothing lost": after a case, every
file that was in the run before it (logs and lock files aside) has the same bytes, unless the case is meant to
change it; a case that trains further protects the checkpoints, tokenizer and data it started from. A full
disk is a real one: a small tmpfs mounted in a user namespace (`unshare -rm`).

  .venv/bin/python benchmarks/adversarial.py                      # every case, about 7 minutes on 2 cores
  .venv/bin/python benchmarks/adversarial.py --only lock,signal   # some groups (GROUPS below)
  .venv/bin/python benchmarks/adversarial.py --work /tmp/adv      # keep the tokenizer, data and base run there
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import xxhash
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from golden import build_assets, tiny_config
from test_launch_injection import STAND_IN

from ondol.configs import to_yaml

BASE = ("train.steps=4", "train.save_every=2", "train.eval_every=100", "train.eval_batches=1",
        "train.keep_last=10")  # no checkpoint pruned: every earlier one can be compared
STEP = "checkpoints/step_{:08d}"
KEPT = ("tokenizer", "data", STEP.format(2))  # what a case that trains on from step 4 must not touch
SECRET = "sk-adversarial-7f3a91c2"


@dataclasses.dataclass
class Row:
    case: str
    done: str
    expected: str
    observed: str
    ok: bool


@dataclasses.dataclass
class Done:
    code: int
    out: str
    err: str
    seconds: float

    @property
    def last(self) -> str:
        lines = [line for line in self.err.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def one_line(self, code: int, pattern: str) -> bool:
        """Exit `code`, and stderr ends with one line matching `pattern` with no traceback or 'unexpected'."""
        return (self.code == code and re.search(pattern, self.last) is not None
                and "Traceback" not in self.err and "unexpected" not in self.err)

    def shown(self) -> str:
        return f"exit {self.code} in {self.seconds:.0f} s: {self.last[:300] or '(no stderr)'}"


class Bench:
    """The temp folder, the shared assets, the base run, and the rows collected so far."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.rows: list[Row] = []
        self.env = {k: v for k, v in os.environ.items() if k not in
                    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        self.env["OMP_NUM_THREADS"] = "1"
        self.assets = assets = build_assets(work / "assets")
        self.config = work / "tiny.yaml"
        self.config.write_text(to_yaml(tiny_config(work / "unused", assets, *BASE)), encoding="utf-8")
        self.base = work / "base"
        if not (self.base / "model").is_dir():
            shutil.rmtree(self.base, ignore_errors=True)
            self.base.mkdir()
            shutil.copytree(assets / "tokenizer", self.base / "tokenizer")
            shutil.copytree(assets / "data", self.base / "data")
            done = self.ondol("train", *self.args(self.base))
            assert done.code == 0, done.err
        self.resumed: dict[int, Path] = {}  # step -> the base run resumed from there to step 6 without trouble

    # processes

    def args(self, run: Path, *overrides: str) -> list[str]:
        return [str(self.config), f"run_dir={run}", f"tokenizer.path={run / 'tokenizer'}", *overrides]

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "ondol.launch.cli", *map(str, args)]

    def ondol(self, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> Done:
        started = time.perf_counter()
        done = subprocess.run(self.command(*args), cwd=cwd or self.work, env=env or self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)
        return Done(done.returncode, done.stdout, done.stderr, time.perf_counter() - started)

    def start(self, *args: str, cwd: Path | None = None) -> subprocess.Popen:
        """`ondol ARGS` in a session of its own (its workers share its process group), output in files."""
        fd, log = tempfile.mkstemp(dir=self.work, suffix=".log")
        proc = subprocess.Popen(self.command(*args), cwd=cwd or self.work, env=self.env, stdout=fd, stderr=fd,
                                text=True, start_new_session=True)
        os.close(fd)
        proc.log, proc.started = Path(log), time.perf_counter()
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float = 300) -> Done:
        code = proc.wait(timeout)
        text = proc.log.read_text(encoding="utf-8", errors="replace")
        return Done(code, text, text, time.perf_counter() - proc.started)

    # runs

    def copy(self, name: str, checkpoints: bool = True) -> Path:
        """A fresh copy of the base run (without its checkpoints, model and metrics: a run not yet trained)."""
        run = self.work / "cases" / name
        shutil.rmtree(run, ignore_errors=True)
        keep = None if checkpoints else shutil.ignore_patterns("checkpoints", "model", "metrics.jsonl", "config*",
                                                               "logs", "loss.png", ".lock")
        shutil.copytree(self.base, run, symlinks=True, ignore=keep)
        return run

    def add(self, case: str, done: str, expected: str, observed: str, ok: bool) -> None:
        self.rows.append(Row(case, done, expected, observed, bool(ok)))
        print(f"{'ok  ' if ok else 'FAIL'} {case}: {observed}", flush=True)


# what a case may change


def tree(root: Path) -> dict[str, str]:
    """relative path -> digest of the bytes (or the link's target), every file under `root`, no link followed;
    logs (appended to by every attempt) and lock files (held while a command runs) are left out."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = Path(folder, name)
            rel = str(path.relative_to(root))
            if rel.startswith("logs/") or name.endswith(".lock"):
                continue
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            else:
                found[rel] = xxhash.xxh3_128(path.read_bytes()).hexdigest()
    return found


def lost(before: dict[str, str], after: dict[str, str], within: tuple[str, ...] = ("",)) -> list[str]:
    """The files of `before` under any of the prefixes `within` that `after` lacks or holds other bytes of.
    RUN_DIR/config.yaml is left out: every attempt that passes the resume checks writes it anew (README), and
    the text it had stays in configs/attempt-N.yaml, which is compared."""
    return sorted(k for k, v in before.items() if k.startswith(within) and k != "config.yaml" and after.get(k) != v)


def nothing_lost(changed: list[str]) -> str:
    return "nothing lost" if not changed else f"CHANGED {changed[:4]}{' ...' if len(changed) > 4 else ''}"


def session_alive(pgid: int) -> list[int]:
    """Processes still in the process group `pgid` (a command's workers and children)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry.name))
    return alive


def wait_for(predicate: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def holds(lock: Path, pid: int) -> bool:
    """Whether process `pid` wrote itself into the lock file as its holder."""
    return lock.is_file() and str(pid) in lock.read_text(errors="replace")


def paused_while(proc: subprocess.Popen, call: Callable[..., Done], *args: str) -> Done:
    """`call(*args)` while `proc` and its workers are stopped (SIGSTOP): the first writer still holds its lock however
    fast it would have finished, so the second always meets it."""
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        return call(*args)
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


def flip(path: Path, count: int = 570, at: float = 0.5) -> None:
    """Invert `count` bytes in the middle of `path`, size unchanged (a new inode: a copy's source is untouched)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.unlink()
    path.write_bytes(bytes(data))


def replace_file(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def same_model(a: Path, b: Path) -> bool:
    return (a / "model" / "model.safetensors").read_bytes() == (b / "model" / "model.safetensors").read_bytes()


def full_disk(bench: Bench, run: Path, spare_bytes: int, *args: str) -> Done:
    """`ondol ARGS` with RUN_DIR on a tmpfs of the run's size plus `spare_bytes`, mounted over it in a user
    namespace; what the command left there replaces RUN_DIR afterwards."""
    used = sum(p.lstat().st_size + 4096 for p in run.rglob("*"))
    stage, after = run.with_name(run.name + ".stage"), run.with_name(run.name + ".after")
    shutil.copytree(run, stage, symlinks=True)
    after.mkdir()
    script = ('size=$1 run=$2 stage=$3 after=$4; shift 4; mount -t tmpfs -o size="$size" tmpfs "$run" && '
              'cp -a "$stage"/. "$run"/ && { "$@"; rc=$?; cp -a "$run"/. "$after"/; exit $rc; }')
    started = time.perf_counter()
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(used + spare_bytes), str(run), str(stage),
                           str(after), *bench.command(*args)], cwd=bench.work, env=bench.env, capture_output=True,
                          text=True, timeout=300, check=False)
    shutil.rmtree(run)
    shutil.rmtree(stage)
    after.rename(run)
    return Done(done.returncode, done.stdout, done.stderr, time.perf_counter() - started)


# 1. values that would become lines of a generated script


def launch_injection(b: Bench) -> None:
    """Payloads in the config file (YAML strings hold real newlines), on the command line and in the config's
    path: each is refused in one line naming its key, or the sbatch script `--dry-run` prints passes `bash -n`
    and, run with recording stand-ins for srun, scontrol, python and deepspeed, creates none of the canaries."""
    canaries = b.work / "canaries"
    sandbox = b.work / "sandbox"
    for folder in (canaries, sandbox):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    for name in ("python", "srun", "scontrol", "deepspeed", "sbatch"):
        (sandbox / name).write_text(STAND_IN)
        (sandbox / name).chmod(0o755)
    slurm = ("launch.launcher=slurm", "launch.nodes=2", "launch.slurm.request_gpus=false")

    def ran(done: Done) -> str:
        """What running the printed sbatch script did: '' if it created no canary."""
        found = re.search(r"^# file (.*ondol\.sbatch)\n(.*?)\n# end of \1$", done.out, re.DOTALL | re.MULTILINE)
        if found:
            script = sandbox / "job.sbatch"
            script.write_text(found.group(2) + "\n")
            env = {**b.env, "PATH": f"{sandbox}{os.pathsep}{b.env['PATH']}", "ARGV_LOG": str(b.work / "argv"),
                   "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2",
                   "SLURM_CPUS_ON_NODE": "2"}
            if subprocess.run(["bash", "-n", str(script)], capture_output=True, check=False).returncode:
                return "the script fails bash -n"
            subprocess.run(["bash", str(script)], cwd=sandbox, env=env, capture_output=True, timeout=60, check=False)
        planted = sorted(p.name for p in canaries.iterdir()) + sorted(p.name for p in sandbox.glob("pwned*"))
        return f"payload ran: {planted}" if planted else ""

    def row(case: str, done_to: str, done: Done, key: str) -> None:
        effect = ran(done)
        if done.code == 0:
            ok, what = not effect and "ondol.sbatch" in done.out, effect or "exit 0, printed script ran nothing planted"
        else:
            # the key, and why: a message cut at a newline in the value names the key and nothing else
            why = r".*(control character|not a valid YAML value|not a host name)"
            ok = done.code in (2, 7) and done.one_line(done.code, re.escape(key) + why) and not effect
            what = done.shown() + (f"; {effect}" if effect else "")
        b.add(f"inject: {case}", done_to, "exit 2/7, one line naming the key, or a script that runs nothing planted",
              what, ok)

    in_file = (
        ("run_dir with a newline", "run_dir", f"{b.work}/inj\ntouch {canaries}/newline #"),
        ("run_dir with $(...)", "run_dir", f"{b.work}/inj$(touch {canaries}/subst)"),
        ("extra_sbatch entry with a newline", "launch.slurm.extra_sbatch", [f"--mem=1G\ntouch {canaries}/extra"]),
        ("extra_sbatch entry that is two directives", "launch.slurm.extra_sbatch", ["--mem=1G --wrap=id"]),
        ("job_name with $(...)", "launch.slurm.job_name", f"$(touch {canaries}/job)"),
        ("partition with backticks", "launch.slurm.partition", f"`touch {canaries}/tick`"),
        ("account with a carriage return", "launch.slurm.account", "proj\rtouch pwned-cr"),
        ("env_file with a newline", "launch.env_file", f"/tmp/x\ntouch {canaries}/env"),
    )
    for i, (case, key, value) in enumerate(in_file):
        cfg = tiny_config(b.work / "cases" / f"inject-{i}", b.assets, *BASE, *slurm)
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)
        config = b.work / "cases" / f"inject-{i}.yaml"
        config.parent.mkdir(exist_ok=True)
        config.write_text(to_yaml(cfg), encoding="utf-8")
        row(case, f"{key}: {value!r} in the config file; ondol launch CONFIG launch.launcher=slurm --dry-run",
            b.ondol("launch", str(config), "--dry-run"), leaf)

    run = b.work / "cases" / "inject-cli"
    for case, value, key in (("partition with backticks on the command line",
                              f"launch.slurm.partition=`touch {canaries}/cli`", "launch.slurm.partition"),
                             ("job_name with $(...) on the command line",
                              f"launch.slurm.job_name=$(touch {canaries}/cli-job)", "launch.slurm.job_name")):
        row(case, f"ondol launch CONFIG {value!r} launch.launcher=slurm --dry-run",
            b.ondol("launch", str(b.config), f"run_dir={run}", value, *slurm, "--dry-run"), key)

    named = b.work / "cases" / "cfg\ntouch pwned-config-path #.yaml"
    shutil.copy(b.config, named)
    row("config path with a newline", "ondol launch 'cfg\\ntouch pwned-config-path #.yaml' launch.launcher=slurm "
        "--dry-run", b.ondol("launch", str(named), f"run_dir={run}", *slurm, "--dry-run"), "config")
    named.unlink()

    hosts = b.work / "hostfile-inj"
    hosts.write_text(f"node1;touch$IFS{canaries}/host slots=1\n")
    done = b.ondol("launch", *b.args(b.copy("pdsh-host")), "launch.launcher=pdsh", f"launch.hostfile={hosts}",
                   "--dry-run", "--no-host-check")
    b.add("inject: hostfile host with ';'", "hostfile line 'node1;touch$IFS... slots=1', launch.launcher=pdsh",
          "exit 7, one line naming the hostfile", done.shown(),
          done.one_line(7, "hostfile|host") and not list(canaries.iterdir()))


# secrets


def secrets(b: Bench) -> None:
    env_file = b.work / "secret.env"
    env_file.write_text(f"WANDB_API_KEY={SECRET}\n")
    env_file.chmod(0o600)
    run = b.copy("secret-launch", checkpoints=False)
    proc = b.start("launch", *b.args(run), f"launch.env_file={env_file}", "launch.gpus_per_node=1",
                   "launch.master_port=0")
    seen_in_ps = False
    while proc.poll() is None:
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout
        seen_in_ps |= SECRET in ps
        time.sleep(0.2)
    done = b.finish(proc)
    in_files = [str(p.relative_to(run)) for p in run.rglob("*")
                if p.is_file() and not p.is_symlink() and SECRET.encode() in p.read_bytes()]
    b.add("secret: launch.env_file", "WANDB_API_KEY in a 0600 env file, ondol launch (local, 1 rank) to the end",
          "exit 0; the value in no ps line, console line or file of the run",
          f"{done.shown()}; in ps: {seen_in_ps}, in output: {SECRET in done.out}, in files: {in_files}",
          done.code == 0 and not seen_in_ps and SECRET not in done.out and not in_files)

    cwd = b.work / "ds-env"
    cwd.mkdir(exist_ok=True)
    (cwd / ".deepspeed_env").write_text(f"WANDB_API_KEY={SECRET}\n")
    hosts = b.work / "hostfile"
    hosts.write_text("node1 slots=1\n")
    done = b.ondol("launch", *b.args(b.copy("ds-env-run")), "launch.launcher=pdsh", f"launch.hostfile={hosts}",
                   "--dry-run", "--no-host-check", cwd=cwd)
    b.add("secret: in .deepspeed_env", "WANDB_API_KEY=... in ./.deepspeed_env, ondol launch launch.launcher=pdsh",
          "exit 7, one line pointing to launch.env_file; the value not printed", done.shown(),
          done.one_line(7, "deepspeed_env|env_file") and SECRET not in done.err + done.out)


# already working: resume after a stop, a kill and a full disk is bit-exact


def resumes(b: Bench) -> None:
    run = b.copy("reference6")
    before = tree(run)
    done = b.ondol("train", *b.args(run, "train.steps=6"))
    b.resumed[4] = run
    b.add("resume: from step 4 to 6", "ondol train CONFIG train.steps=6 on the base run",
          "exit 0, 'resumed from .../step_00000004'; steps 2, 4, tokenizer, data kept",
          f"{done.shown()}; {nothing_lost(lost(before, tree(run), (*KEPT, STEP.format(4))))}",
          done.code == 0 and "resumed from" in done.out and not lost(before, tree(run), (*KEPT, STEP.format(4))))

    run = b.copy("reference6-from2")
    shutil.rmtree(run / STEP.format(4))
    before = tree(run)
    done = b.ondol("train", *b.args(run, "train.steps=6"))
    b.resumed[2] = run
    b.add("resume after deleting the newest checkpoint", "rm -r step_00000004 (`latest` still names it); "
          "train.steps=6", "exit 0, resumed from step 2; step 2, tokenizer, data kept",
          f"{done.shown()}; {'resumed from step 2' if 'at step 2' in done.out else 'NOT from step 2'}; "
          f"{nothing_lost(lost(before, tree(run), KEPT))}",
          done.code == 0 and "at step 2" in done.out and not lost(before, tree(run), KEPT))

    run = b.copy("sigterm", checkpoints=False)
    proc = b.start("train", *b.args(run))
    hit = wait_for(lambda: (run / "metrics.jsonl").is_file() and '"step": 1' in (run / "metrics.jsonl").read_text(),
                   120)
    os.kill(proc.pid, signal.SIGTERM)
    stopped = b.finish(proc)
    again = b.ondol("train", *b.args(run))
    exact = again.code == 0 and same_model(run, b.base)
    b.add("SIGTERM during ondol train", "SIGTERM once step 1 is logged, then the same command",
          "exit 75 after saving, rerun exit 0, final weights = the uninterrupted run's bit for bit",
          f"hit {hit}; first {stopped.shown()}; rerun exit {again.code}; bit-exact {exact}",
          stopped.code == 75 and exact)

    run = b.copy("kill9", checkpoints=False)
    proc = b.start("train", *b.args(run))
    hit = wait_for(lambda: (run / STEP.format(2) / "meta.json").is_file(), 120, 0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = b.ondol("train", *b.args(run))
    exact = again.code == 0 and same_model(run, b.base)
    b.add("kill -9 during ondol train", "SIGKILL to the process group once step 2 is saved, then the same command",
          "rerun exit 0 (no stale lock), resumes, final weights bit-exact",
          f"hit {hit}; rerun {again.shown()}; bit-exact {exact}", again.code == 0 and exact)

    run = b.copy("disk-full-save")
    before = tree(run)
    done = full_disk(b, run, 20 << 20, "train", *b.args(run, "train.steps=6"))
    changed = lost(before, tree(run), (*KEPT, STEP.format(4)))
    partial = (run / STEP.format(6)).exists()
    b.add("disk full during a save", "train.steps=6 with 20 MiB free (a checkpoint takes 52 MB)",
          "exit 6, one line naming the checkpoint and what to free; no partial step 6; steps 2, 4 kept",
          f"{done.shown()}; partial step 6: {partial}; {nothing_lost(changed)}",
          done.one_line(6, "could not save|no space") and not partial and not changed)
    again = b.ondol("train", *b.args(run, "train.steps=6"))
    exact = again.code == 0 and same_model(run, b.resumed[4])
    b.add("rerun after the full disk", "the same command with space again",
          "exit 0, final weights = an undisturbed resume from step 4 to 6", f"{again.shown()}; bit-exact {exact}", exact)


# 2. one writer per folder


def locks(b: Bench) -> None:
    run = b.copy("two-trains")
    first = b.start("train", *b.args(run, "train.steps=8"))
    held = wait_for(functools.partial(holds, run / ".lock", first.pid), 120)
    second = paused_while(first, b.ondol, "train", *b.args(run, "train.steps=8"))
    first_done = b.finish(first)
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    resume = b.ondol("train", *b.args(run, "train.steps=9"))
    b.add("two ondol train on one run_dir", "a second `ondol train` while the first (stopped by SIGSTOP once it holds the lock) trains steps 5-8",
          "second exit 6, one line naming the holder's pid and host; first exit 0; its metrics and checkpoints whole",
          f"lock held {held}; second {second.shown()}; first exit {first_done.code}; {len(rows)} loss rows; "
          f"resume to 9: exit {resume.code}",
          second.one_line(6, f"{first.pid}.*{socket.gethostname()}|{socket.gethostname()}.*{first.pid}")
          and first_done.code == 0 and len(rows) == 8 and resume.code == 0)

    for what, command, lock, code, extra in (
            ("data prepare", ("data", "prepare"), "data.lock", 3,
             ("data.sources.0.max_docs=60000", "data.sources.1.max_docs=900", "--no-progress")),
            ("tokenizer train", ("tokenizer", "train"), "tokenizer.lock", 4,
             ("data.sources.0.max_docs=30000", "tokenizer.max_sentences=60000"))):
        run = b.copy(f"two-{command[0]}", checkpoints=False)
        shutil.rmtree(run / command[0])
        first = b.start(*command, *b.args(run, *extra))
        held = wait_for(functools.partial(holds, run / lock, first.pid), 120)
        second = paused_while(first, b.ondol, *command, *b.args(run, *extra))
        first_done = b.finish(first)
        b.add(f"two ondol {what} on one folder", f"a second `ondol {what}` while the first (SIGSTOP) holds the lock",
              f"second exit {code}, one line naming the holder's pid; first exit 0",
              f"lock held {held}; second {second.shown()}; first {first_done.shown()}",
              second.one_line(code, str(first.pid)) and first_done.code == 0)


# 3, 4. checkpoints that are links, renamed, or hold other bytes


def damaged_checkpoints(b: Bench) -> None:
    """Each damages or adds a checkpoint in a copy and trains to step 6: the bad one must be skipped with one line
    and the newest good one used; the resumed run ends bit-exact with the undisturbed resume to step 6."""
    other = b.copy("other-run")
    other_before = tree(other)
    step4 = STEP.format(4)

    def link_folder(run: Path) -> None:
        (run / STEP.format(30)).symlink_to(other / step4, target_is_directory=True)
        (run / "checkpoints" / "latest").unlink()  # else `latest` names step 4, which is used unexamined

    def link_file(run: Path) -> None:
        (run / step4 / "model.safetensors").unlink()
        (run / step4 / "model.safetensors").symlink_to(other / step4 / "model.safetensors")

    def renamed(run: Path) -> None:
        shutil.copytree(run / step4, run / STEP.format(5))
        (run / "checkpoints" / "latest").unlink()

    def broken_meta(run: Path) -> None:
        meta = run / step4 / "meta.json"
        replace_file(meta, meta.read_bytes()[:100])

    cases = (
        ("a step folder that is a link to another run's",
         "step_00000030 -> other-run/step_00000004, `latest` removed", link_folder, 4),
        ("a checkpoint file that is a link", "step_4/model.safetensors -> other-run's", link_file, 2),
        ("a folder whose meta.json records another step", "step_4 copied to step_00000005, `latest` removed",
         renamed, 4),
        ("570 flipped bytes in the DeepSpeed file", "mp_rank_00_model_states.pt, same size",
         lambda run: flip(run / step4 / "mp_rank_00_model_states.pt"), 2),
        ("one flipped byte in optim.safetensors", "optim.safetensors, same size",
         lambda run: flip(run / step4 / "optim.safetensors", count=1), 2),
        ("a truncated meta.json in the newest checkpoint", "step_4/meta.json cut to 100 bytes", broken_meta, 2),
    )
    for case, done_to, damage, good in cases:
        run = b.copy("ckpt-" + re.sub(r"\W+", "-", case)[:40])
        damage(run)
        before = tree(run)
        done = b.ondol("train", *b.args(run, "train.steps=6"))
        resumed = re.search(r"resumed from \S*/(step_\d+) at step (\d+)", done.out)
        skipped = [line for line in (done.out + done.err).splitlines() if "skip" in line.lower()]
        kept = (*KEPT, STEP.format(4)) if good == 4 else KEPT
        changed = lost(before, tree(run), kept) + lost(other_before, tree(other))
        exact = done.code == 0 and same_model(run, b.resumed[good])
        ok = (done.code == 0 and resumed is not None and resumed.groups() == (f"step_{good:08d}", str(good))
              and len(skipped) >= 1 and exact and not changed)
        b.add(f"checkpoint: {case}", f"{done_to}; ondol train CONFIG train.steps=6",
              f"exit 0; one line skipping it; resumed from step {good}; other run and step {good} untouched; "
              "bit-exact",
              f"exit {done.code}; {resumed.group(0) if resumed else 'no resume line'}; "
              f"skip line: {skipped[0][:160] if skipped else None}; bit-exact {exact}; {nothing_lost(changed)}"
              + ("" if done.code == 0 else f"; {done.last[:200]}"), ok)


def verified_reads(b: Bench) -> None:
    run = b.copy("flip-export")
    flip(run / STEP.format(4) / "model.safetensors")
    before = tree(run)
    out = b.work / "cases" / "flip-export-hf"
    shutil.rmtree(out, ignore_errors=True)
    done = b.ondol("export", "hf", str(run / STEP.format(4)), str(out))
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    b.add("export of a flipped checkpoint", "570 bytes of step_4/model.safetensors flipped; ondol export hf STEP OUT",
          "exit 5, one line naming the file; nothing left in OUT", f"{done.shown()}; OUT holds {left}",
          done.one_line(5, "model.safetensors") and not left and not lost(before, tree(run)))
    done = b.ondol("export", "hf", str(run / STEP.format(4)), str(out), "--no-verify")
    b.add("export --no-verify", "the same with --no-verify", "exit 0 (the check skipped on request)", done.shown(),
          done.code == 0)

    done = b.ondol("eval", str(run), "--checkpoint", "step_00000004")
    b.add("eval of a flipped checkpoint", "ondol eval RUN --checkpoint step_00000004",
          "exit 5 or 6, one line naming the file", done.shown(),
          done.code in (5, 6) and done.one_line(done.code, "model.safetensors") and not lost(before, tree(run)))

    run = b.copy("flip-final")
    flip(run / "model" / "model.safetensors")
    before = tree(run)
    done = b.ondol("generate", str(run))
    b.add("generate with flipped final weights", "570 bytes of RUN/model/model.safetensors flipped; ondol generate",
          "exit 5, one line naming the file and SHA256SUMS", done.shown(),
          done.one_line(5, "model.safetensors|SHA256SUMS") and not lost(before, tree(run)))

    out = b.work / "cases" / "export-ok"
    shutil.rmtree(out, ignore_errors=True)
    done = b.ondol("export", "hf", str(b.copy("export-src")), str(out))
    flip(out / "model.safetensors", count=1)
    check = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True,
                           check=False)
    b.add("flipped byte in an export folder", "ondol export hf RUN OUT, one byte of OUT/model.safetensors flipped",
          "export exit 0; `sha256sum -c SHA256SUMS` in OUT names the file", f"export exit {done.code}; sha256sum: "
          f"exit {check.returncode} {check.stdout.strip()[:100]}",
          done.code == 0 and check.returncode != 0 and "model.safetensors" in check.stdout)


# 5. the model matches its tokenizer, data and config


def identity(b: Bench) -> None:
    tok2 = b.work / "cases" / "tok2"
    shutil.rmtree(tok2, ignore_errors=True)
    made = b.ondol("tokenizer", "train", *b.args(tok2, "data.sources.0.max_docs=1500"))
    run = b.copy("new-tokenizer", checkpoints=False)
    before = tree(run)
    done = b.ondol("train", str(b.config), f"run_dir={run}", f"tokenizer.path={tok2 / 'tokenizer'}")
    b.add("train: a new tokenizer beside old data", "a tokenizer trained on other documents, same vocab size",
          "exit 3, one line: data prepared with another tokenizer; nothing written",
          f"tokenizer exit {made.code}; {done.shown()}",
          made.code == 0 and done.one_line(3, "tokenizer") and not lost(before, tree(run))
          and not (run / "checkpoints").exists())

    for key, value in (("model.window", 32), ("model.rope_theta", 50000.0), ("model.max_seq_len", 512),
                       ("data.sources.0.weight", 0.9), ("seed", 7), ("deepspeed.precision", "bf16")):
        run = b.copy("changed-" + key.replace(".", "-"))
        before = tree(run)
        done = b.ondol("train", *b.args(run, "train.steps=6", f"{key}={value}"))
        shown_key = key.replace(".0.", "[0].") if "sources" in key else key
        b.add(f"resume with {key} changed", f"ondol train CONFIG train.steps=6 {key}={value}",
              "exit 6, one line listing the key as old -> new; nothing changed", done.shown()
              + f"; {nothing_lost(lost(before, tree(run)))}",
              done.one_line(6, re.escape(shown_key.split(".")[-1])) and not lost(before, tree(run)))

    done = b.ondol("train", *b.args(b.copy("seq-len", checkpoints=False), "data.seq_len=2048"))
    b.add("data.seq_len above model.max_seq_len", "ondol train CONFIG data.seq_len=2048 (max_seq_len 1024)",
          "exit 2, one line naming both keys", done.shown(), done.one_line(2, "seq_len"))

    original = b.copy("original")
    moved = b.work / "cases" / "moved"
    shutil.rmtree(moved, ignore_errors=True)
    shutil.copytree(original, moved, symlinks=True)
    shutil.rmtree(original)
    before = tree(moved)
    gen = b.ondol("generate", str(moved))
    ev = b.ondol("eval", str(moved))
    b.add("a moved run", "copy a run, delete the original, ondol generate COPY and ondol eval COPY",
          "both exit 0, reading only the copy", f"generate exit {gen.code}, eval exit {ev.code}: {ev.last[:150]}",
          gen.code == 0 and ev.code == 0 and not lost(before, tree(moved)))

    run = b.copy("relative")
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(re.sub(r"(?m)^run_dir: .*$", "run_dir: runs/somewhere-else", config))
    done = b.ondol("generate", str(run), cwd=Path("/"))
    b.add("a run recording a relative run_dir", "config.yaml run_dir: runs/somewhere-else; ondol generate RUN from /",
          "exit 0", done.shown(), done.code == 0)


# 6. signals outside training


def signals(b: Bench) -> None:
    big = ("data.sources.0.max_docs=60000", "data.sources.1.max_docs=900", "data.num_proc=2", "--no-progress")
    run = b.copy("term-prepare", checkpoints=False)
    shutil.rmtree(run / "data")
    proc = b.start("data", "prepare", *b.args(run, *big))
    workers = wait_for(lambda: len(session_alive(proc.pid)) > 2, 120)
    os.kill(proc.pid, signal.SIGTERM)
    done = b.finish(proc)
    orphans = session_alive(proc.pid) if wait_for(lambda: not session_alive(proc.pid), 10) is False else []
    again = b.ondol("data", "prepare", *b.args(run, *big))
    b.add("SIGTERM during data prepare", "SIGTERM once its tokenizing workers run, then the same command",
          "exit 143, one line; no worker alive after 10 s; rerun exit 0 with a manifest",
          f"workers seen {workers}; {done.shown()}; alive after: {orphans}; rerun exit {again.code}",
          done.one_line(143, "SIGTERM") and not orphans and again.code == 0 and (run / "data/manifest.json").is_file())

    run = b.copy("double-prepare", checkpoints=False)
    shutil.rmtree(run / "data")
    proc = b.start("data", "prepare", *b.args(run, *big))
    wait_for(lambda: len(session_alive(proc.pid)) > 2, 120)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.02)
    running = proc.poll() is None
    second = time.perf_counter()
    os.kill(proc.pid, signal.SIGINT)
    done = b.finish(proc)
    took = time.perf_counter() - second
    # ended by the signal itself (Python restores the default handlers while it exits): a shell reports 128 + N
    code = 128 - done.code if done.code < 0 else done.code
    orphans = [] if wait_for(lambda: not session_alive(proc.pid), 2) else session_alive(proc.pid)
    b.add("a second signal during data prepare", "SIGTERM, then SIGINT 0.02 s later (while it cleans up)",
          "exit 143 or 130 (as a shell reports it) within 2 s of the second signal, its workers killed too (README)",
          f"still running at the second signal {running}; exit {done.code} (shell: {code}) {took:.2f} s after it; "
          f"alive after: {orphans}; {done.last[:120]}",
          running and took < 2 and not orphans and code in (130, 143) and "Traceback" not in done.err)

    run = b.copy("term-tokenizer", checkpoints=False)
    shutil.rmtree(run / "tokenizer")
    tok = ("data.sources.0.max_docs=60000", "tokenizer.max_sentences=200000")
    proc = b.start("tokenizer", "train", *b.args(run, *tok))
    training = wait_for(lambda: "training SentencePiece" in proc.log.read_text(errors="replace"), 120)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    done = b.finish(proc)
    orphans = [] if wait_for(lambda: not session_alive(proc.pid), 10) else session_alive(proc.pid)
    leftovers = sorted(p.name for p in run.iterdir() if p.name.startswith("tokenizer") and p.name != "tokenizer.lock")
    b.add("SIGTERM during tokenizer train", "SIGTERM while SentencePiece trains",
          "exit 143, one line; SentencePiece stopped; no tokenizer or scratch folder left",
          f"training {training}; {done.shown()}; alive after: {orphans}; left: {leftovers}",
          done.one_line(143, "SIGTERM") and not orphans and not leftovers)

    run = b.copy("term-export")
    out = b.work / "cases" / "term-export-hf"
    outcomes = []
    for _ in range(5):  # the write takes a fraction of a second: signal as soon as OUT gets its first file
        shutil.rmtree(out, ignore_errors=True)
        proc = b.start("export", "hf", str(run), str(out))
        wait_for(lambda: out.is_dir() and any(out.iterdir()), 120, 0.001)
        os.kill(proc.pid, signal.SIGTERM)
        done = b.finish(proc)
        temps = [p.name for p in out.rglob("*") if ".tmp" in p.name] if out.is_dir() else []
        outcomes.append((done, temps, done.one_line(143, "SIGTERM") or done.code == 0))
    codes = [done.code for done, _, _ in outcomes]
    temps = [t for _, found, _ in outcomes for t in found]
    odd = [done.last[:200] for done, _, ok in outcomes if not ok]
    b.add("SIGTERM during export hf", "5 exports, each sent SIGTERM as soon as OUT holds a file",
          "exit 143 with one line (or 0 if it finished first); no .tmp left in OUT",
          f"exit codes {codes}; temp files left: {temps}" + (f"; other ends: {odd}" if odd else ""),
          143 in codes and not temps and not odd)

    run = b.copy("int-eval")
    corpus = Path(b.env.get("ONDOL_CORPORA", ROOT.parent / "shared" / "corpora")) / "ko_reviews.jsonl.gz"
    proc = b.start("eval", str(run), "--data", str(corpus), "--max-docs", "50000")
    time.sleep(8)  # imports and the model loaded: scoring 50,000 documents takes minutes
    running = proc.poll() is None
    os.kill(proc.pid, signal.SIGINT)
    done = b.finish(proc)
    b.add("Ctrl-C during eval --data", "SIGINT 8 s into scoring 50,000 ko_reviews documents", "exit 130, one line",
          f"running at the signal {running}; {done.shown()}", running and done.one_line(130, "interrupted"))


# 7. damaged inputs and bad values: one line, the documented code


def messages(b: Bench) -> None:
    def damage_case(case: str, damage: Callable[[Path], Path], code: int, *command: str) -> None:
        run = b.copy(re.sub(r"\W+", "-", case)[:40])
        path = damage(run)
        before = tree(run)
        done = b.ondol(*(command or ("train",)), *b.args(run, "train.steps=6"))
        rel = str(path.relative_to(run))
        b.add(case, f"{rel} damaged; ondol {' '.join(command or ('train',))}",
              f"exit {code}, one line naming {path.name}", done.shown() + f"; {nothing_lost(lost(before, tree(run)))}",
              done.one_line(code, re.escape(path.name)) and not lost(before, tree(run)))

    def truncate(rel: str) -> Callable[[Path], Path]:
        def cut(run: Path) -> Path:
            replace_file(run / rel, (run / rel).read_bytes()[:40])
            return run / rel
        return cut

    def bad_ids(run: Path) -> Path:
        shard = run / "data" / "train" / "ko_reviews" / "00000.bin"
        replace_file(shard, b"\xff" * shard.stat().st_size)
        return shard

    def garbage_model(run: Path) -> Path:
        path = run / "tokenizer" / "tokenizer.model"
        replace_file(path, (run / "config.yaml").read_bytes() * 20)
        return path

    damage_case("a broken data manifest.json", truncate("data/manifest.json"), 3)
    damage_case("a broken tokenizer meta.json", truncate("tokenizer/meta.json"), 4)
    damage_case("a garbage tokenizer.model", garbage_model, 4)
    damage_case("a shard of the right size with bad ids", bad_ids, 3)

    run = b.work / "cases" / "disk-full-tokenizer"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    done = full_disk(b, run, 64 << 10, "tokenizer", "train", *b.args(run))
    left = sorted(p.name for p in run.iterdir())
    b.add("disk full during tokenizer train", "RUN_DIR on a tmpfs with 64 KiB free; ondol tokenizer train",
          "exit 4, one line: no space, how much; no tokenizer folder left", f"{done.shown()}; left: {left}",
          done.one_line(4, "no space") and "tokenizer" not in left)

    run = b.copy("disk-full-prepare", checkpoints=False)
    shutil.rmtree(run / "data")
    done = full_disk(b, run, 256 << 10, "data", "prepare", *b.args(run, "--no-progress"))
    b.add("disk full during data prepare", "RUN_DIR on a tmpfs with 256 KiB free; ondol data prepare",
          "exit 3, one line: no space; no manifest", done.shown(),
          done.one_line(3, "no space") and not (run / "data" / "manifest.json").exists())

    bad_values = (
        ("model.vocab_size=1", 2, "vocab_size"),
        ("model.n_layer=2", 2, "n_layers"),
        ("train.steps=abc", 2, "train.steps"),
        ("train.steps=-1", 2, "train.steps"),
        ("deepspeed.zero_stage=7", 2, "zero_stage"),
        ("model.attn_pattern=LLXG", 2, "attn_pattern"),
        ("data.sources.0.path=/nonexistent/corpus.jsonl.gz", 3, "corpus.jsonl.gz"),
    )
    for value, code, key in bad_values:
        run = b.copy("bad-" + re.sub(r"\W+", "-", value)[:30])
        before = tree(run)
        command = ("data", "prepare") if "sources" in value else ("train",)
        if command[0] == "data":
            shutil.rmtree(run / "data")
            before = tree(run)
        done = b.ondol(*command, *b.args(run, "train.steps=6", value))
        b.add(f"bad value {value}", f"ondol {' '.join(command)} CONFIG {value}", f"exit {code}, one line naming {key}",
              done.shown(), done.one_line(code, re.escape(key)) and not lost(before, tree(run)))

    missing = b.work / "no-such.yaml"
    done = b.ondol("train", str(missing))
    b.add("a config file that is not there", "ondol train no-such.yaml", "exit 2, one line naming the file",
          done.shown(), done.one_line(2, re.escape(missing.name)))
    done = b.ondol("eval", str(b.base) + "x")
    b.add("a misspelt RUN_DIR", "ondol eval RUN_DIRx", "exit 2, one line naming the folder", done.shown(),
          done.one_line(2, re.escape(b.base.name + "x")))


GROUPS = {"inject": launch_injection, "secret": secrets, "resume": resumes, "lock": locks,
          "checkpoint": damaged_checkpoints, "verify": verified_reads, "identity": identity, "signal": signals,
          "message": messages}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated groups: " + ", ".join(GROUPS))
    parser.add_argument("--work", type=Path, help="folder kept between calls (default: a temp folder)")
    args = parser.parse_args()
    chosen = [g for g in GROUPS if not args.only or g in args.only.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        bench = Bench(work)
        if any(g in chosen for g in ("checkpoint", "resume")) and "resume" not in chosen:
            resumes(bench)  # the undisturbed resume to step 6 that the checkpoint cases compare with
        for group in chosen:
            GROUPS[group](bench)
    table = Table(title=f"issue 27, adversarial cases (tiny preset, CPU): {time.perf_counter() - started:.0f} s",
                  show_lines=True)
    for column in ("#", "case", "what was done", "expected", "observed", "ok"):
        table.add_column(column, overflow="fold")
    for i, row in enumerate(bench.rows, 1):
        table.add_row(str(i), row.case, row.done, row.expected, row.observed, "ok" if row.ok else "[red]FAIL[/]")
    Console(width=200).print(table)
    failed = [r.case for r in bench.rows if not r.ok]
    print(f"{len(bench.rows) - len(failed)} of {len(bench.rows)} ok" + (f"; FAIL: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
