"""Every string of the run config, in turn, holding shell payloads, through what `ondol launch` generates for
Slurm (the sbatch script, with and without a container) and pdsh (DeepSpeed's remote command line): each value is
either refused in one line naming its key, or the script passes `bash -n` and, run in a sandbox with recording
stand-ins for srun, scontrol, python and deepspeed, runs to its end and creates none of the payloads' files.

The keys are found by walking RunConfig's dataclasses, not listed by hand. A value is planted in the loaded
config and checked by the same `__post_init__` that load_config runs; the plan is made by plan_slurm / plan_launch,
as after the pre-flight. The resolved config's YAML (0.2 s of OmegaConf per plan) is replaced by a stand-in of the
same path: its text never enters a script. Identical scripts are run once.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import re
import subprocess
import sys
import typing
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from ondol.configs import RunConfig, load_config
from ondol.errors import OndolError, reported
from ondol.launch import launcher, slurm
from ondol.launch.launcher import DEFAULT_MODULE, launch_dir, plan_launch, write_files
from ondol.launch.preflight import resolve_layout
from ondol.launch.script_values import UnsafeValueError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny-ko.yaml")
SHELL_CODE_KEYS = ("launch.slurm.setup",)  # shell lines before srun by design: only one line each is checked

# Records its name and argv in $ARGV_LOG; python and srun then run the command they were given (as the
# supervisor and srun do), scontrol names two nodes.
STAND_IN = """#!/bin/bash
printf '%s\\0' "${0##*/}" "$@" >> "$ARGV_LOG"; echo >> "$ARGV_LOG"
case ${0##*/} in
  python) while [[ $# -gt 0 && $1 != -- ]]; do shift; done; [[ $# -gt 0 ]] && shift && exec "$@";;
  srun) while [[ $1 == --* ]]; do shift; done; exec "$@";;
  scontrol) [ "$1 $2" = "show hostnames" ] && printf 'node1\\nnode2\\n';;
esac
exit 0
"""


def payloads(canaries: Path) -> dict[str, str]:
    """Payload class -> value; run by a shell, each would create its own file in `canaries`."""
    return {
        "newline": f"x\ntouch {canaries}/newline",
        "command substitution": f"$(touch {canaries}/substitution)",
        "backticks": f"`touch {canaries}/backticks`",
        "semicolon": f"x; touch {canaries}/semicolon",
        "quotes": f"it's \"q\"'; touch {canaries}/quotes; echo '\"",
        "NUL": f"x\0touch {canaries}/nul",
    }


def string_keys(schema: type, cfg: object, prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted key, is a list) of every str and list[str] field, entries of lists of configs included."""
    keys = []
    for name, hint in typing.get_type_hints(schema).items():
        args, value = typing.get_args(hint), getattr(cfg, name)
        if dataclasses.is_dataclass(hint):
            keys += string_keys(hint, value, f"{prefix}{name}.")
        elif hint is str or set(args) == {str, type(None)}:
            keys.append((prefix + name, False))
        elif typing.get_origin(hint) is list and args == (str,):
            keys.append((prefix + name, True))
        elif typing.get_origin(hint) is list and dataclasses.is_dataclass(args[0]):
            for i, entry in enumerate(value):
                keys += string_keys(args[0], entry, f"{prefix}{name}[{i}].")
    return keys


def planted(base: RunConfig, key: str, value: str, is_list: bool) -> RunConfig:
    """A copy of `base` with `key` set to `value`, checked by the __post_init__ of every config on its path."""
    cfg = copy.deepcopy(base)
    chain = [cfg]
    *parents, leaf = key.split(".")
    for part in parents:
        name, index = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", part).groups()
        chain.append(getattr(chain[-1], name) if index is None else getattr(chain[-1], name)[int(index)])
    setattr(chain[-1], leaf, [value] if is_list else value)
    for node in reversed(chain):
        if hasattr(node, "__post_init__"):
            node.__post_init__()
    return cfg


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working directory, stand-ins first on PATH, a virtual environment that puts them first, a canary
    folder, and the resolved config's stand-in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "srun", "scontrol", "deepspeed"):
        (bin_dir / name).write_text(STAND_IN)
        (bin_dir / name).chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f"export PATH={bin_dir}:$PATH\n")
    (tmp_path / "canaries").mkdir()
    (tmp_path / "hostfile").write_text("node1 slots=1\nnode2 slots=1\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "prefix", str(venv))  # the script activates this environment
    for module in (launcher, slurm):
        monkeypatch.setattr(module, "resolved_config", lambda cfg: (launch_dir(cfg) / "config.0123456789ab.yaml", ""))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "ARGV_LOG": str(tmp_path / "argv"),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_CPUS_ON_NODE": "2"}
    return tmp_path, env


def _run(text: str, env: dict[str, str], canaries: Path, cwd: Path, *, script: bool) -> list[list[str]]:
    """Run `text` (a script file, or a `bash -c` line) after `bash -n`; the stand-ins' recorded command lines."""
    argv_log = Path(env["ARGV_LOG"])
    argv_log.unlink(missing_ok=True)
    if script:
        path = cwd / "job.sbatch"
        path.write_text(text)
        checked, command = ["bash", "-n", str(path)], ["bash", str(path)]
    else:
        checked, command = ["bash", "-n", "-c", text], ["bash", "-c", text]
    syntax = subprocess.run(checked, capture_output=True, text=True, env=env, check=False)
    assert syntax.returncode == 0, syntax.stderr
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=30, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert not list(canaries.iterdir()), f"a payload ran: {sorted(p.name for p in canaries.iterdir())}"
    return [line.split("\0")[:-1] for line in argv_log.read_text().splitlines() if line]


def _refusal_line(error: OndolError) -> str:
    """What `ondol launch` prints for this error: stderr of the CLI's error reporting."""
    err = io.StringIO()
    with redirect_stderr(err):
        code = reported(lambda: (_ for _ in ()).throw(error), "ondol", debug=False)
    assert code == error.exit_code
    return err.getvalue()


def _pdsh_remote_line(plan, env: dict[str, str], monkeypatch, stand_in_python: Path) -> str:
    """The command line DeepSpeed's pdsh runner has each node's shell run (pdsh joins its words; %n = 0), the
    words after pdsh's host list included, as a pdsh that took every one of them for the remote command."""
    from deepspeed.launcher.multinode_runner import PDSHRunner
    from deepspeed.launcher.runner import (
        encode_world_info,
        fetch_hostfile,
        parse_args,
        parse_inclusion_exclusion,
    )

    write_files(plan)
    args = parse_args(plan.command[1:])
    active = parse_inclusion_exclusion(fetch_hostfile(args.hostfile), args.include, args.exclude)
    with monkeypatch.context() as patch:  # the runner writes its own interpreter into the line
        patch.setattr(sys, "executable", str(stand_in_python))
        cmd, _, _ = PDSHRunner(args, encode_world_info(active)).get_cmd(dict(env), active)
    assert cmd[:6] == ["pdsh", "-S", "-f", cmd[3], "-w", "node1,node2"]
    return " ".join(cmd[6:]).replace("%n", "0")


VARIANTS = {
    "slurm": ["launch.launcher=slurm", "launch.nodes=2", "launch.slurm.request_gpus=false"],
    "slurm in a container": ["launch.launcher=slurm", "launch.nodes=2", "launch.slurm.container=ondol.sqsh"],
    "pdsh": ["launch.launcher=pdsh", "launch.nodes=2", "launch.hostfile=../hostfile"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_config_string_is_refused_or_inert_in_what_launch_generates(sandbox, variant, monkeypatch):
    tmp_path, env = sandbox
    canaries, work = tmp_path / "canaries", Path.cwd()
    base = load_config(TINY, [f"run_dir={work / 'run'}", *VARIANTS[variant]])
    layout = resolve_layout(base)
    pdsh = base.launch.launcher == "pdsh"
    seen: set[str] = set()
    refused, ran = [], set()
    for key, is_list in string_keys(RunConfig, base):
        for kind, value in payloads(canaries).items():
            try:
                cfg = planted(base, key, value, is_list)
            except ValueError:  # load_config refuses it: a ConfigError naming the override
                refused.append((key, kind))
                continue
            try:
                plan = plan_launch(cfg, layout) if pdsh else slurm.plan_slurm(cfg, layout, DEFAULT_MODULE)
            except UnsafeValueError as e:
                line = _refusal_line(e)
                assert line.count("\n") == 1 and key.split("[")[0] in line and line.startswith("ondol: launch error"), \
                    (key, kind, line)
                refused.append((key, kind))
                continue
            if key in SHELL_CODE_KEYS and not pdsh:
                assert "\n" not in value and "\0" not in value  # one line per entry; its code is the user's
                continue
            if pdsh:
                text = _pdsh_remote_line(plan, env, monkeypatch, tmp_path / "bin" / "python")
            else:
                text = plan.files[launch_dir(cfg) / slurm.SCRIPT_NAME]
            if text in seen:
                continue
            seen.add(text)
            commands = _run(text, env, canaries, work, script=not pdsh)
            ran.add(key)
            # ran to its end: the per-node command was started
            assert [c[0] for c in commands].count("python" if pdsh else "deepspeed") == 1, (key, kind, commands)
    # every control-character payload in a value that reaches the script was refused by its writer
    assert ("run_dir", "newline") in refused and ("run_dir", "NUL") in refused
    assert {"run_dir", "launch.env_file"} <= ran, ran  # their quoted payloads reached a script and ran nothing
    if not pdsh:
        for key in ("launch.slurm.partition", "launch.slurm.extra_sbatch", "launch.slurm.setup"):
            assert (key, "newline") in refused, key


def test_a_newline_in_run_dir_is_refused_by_ondol_launch(tmp_path, capsys):
    """The reproduction from the issue: one line on stderr naming run_dir, exit 7, and no script."""
    from ondol.launch.cli import main

    run = tmp_path / "inj\ntouch PWNED #"
    code = main(["launch", TINY, "run_dir=" + repr(str(run)).replace("'", '"'), "launch.launcher=slurm", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 7 and err.count("\n") == 1 and err.startswith("ondol: launch error: run_dir '"), err
    assert not list(tmp_path.rglob("*.sbatch"))


@pytest.mark.parametrize(("option", "accepted"), [
    ("--constraint=h100", True), ("--comment=two words", True), ("--exclusive", True),
    ("constraint=h100", False), ("-C h100", False), ("--exclusive --comment=x", False),
    ("--comment=a\nrm -rf ~", False), ("--comment=a\rb", False), ("--comment=\u2028", False),
])
def test_extra_sbatch_entries_are_single_options(option, accepted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}", "launch.launcher=slurm"])
    cfg.launch.slurm.extra_sbatch = [option]
    if accepted:
        script = slurm.sbatch_script(cfg, resolve_layout(cfg), tmp_path / "c.yaml", DEFAULT_MODULE)
        assert f'#SBATCH "{option}"' in script.splitlines()
    else:
        with pytest.raises(UnsafeValueError, match=r"^launch\.slurm\.extra_sbatch\[0\] "):
            slurm.sbatch_script(cfg, resolve_layout(cfg), tmp_path / "c.yaml", DEFAULT_MODULE)


def test_derived_paths_are_checked_and_quoted(sandbox, monkeypatch):
    """The working directory and the virtual environment are written into the script too: hostile names run
    nothing, and a newline in either is refused naming it."""
    tmp_path, env = sandbox
    canaries = tmp_path / "canaries"
    work = tmp_path / "w $(touch PWNED) `touch PWNED`; 'q' \"dq\""
    work.mkdir()
    monkeypatch.chdir(work)
    venv = tmp_path / "v $(touch PWNED); x"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text((tmp_path / "venv" / "bin" / "activate").read_text())
    monkeypatch.setattr(sys, "prefix", str(venv))
    cfg = load_config(TINY, ["run_dir=run", *VARIANTS["slurm"]])
    layout = resolve_layout(cfg)
    script = slurm.plan_slurm(cfg, layout, DEFAULT_MODULE).files[launch_dir(cfg) / slurm.SCRIPT_NAME]
    commands = _run(script, env, canaries, work, script=True)
    assert [c[0] for c in commands].count("deepspeed") == 1 and not list(tmp_path.rglob("PWNED"))
    for what, folder in (("the working directory", tmp_path / "a\nb"), ("the virtual environment", tmp_path / "c\nd")):
        (folder / "bin").mkdir(parents=True)
        (folder / "bin" / "activate").touch()
        if what == "the working directory":
            monkeypatch.chdir(folder)
        else:
            monkeypatch.chdir(work)
            monkeypatch.setattr(sys, "prefix", str(folder))
        with pytest.raises(UnsafeValueError, match=f"^{what} "):
            slurm.plan_slurm(load_config(TINY, ["run_dir=/tmp/r", *VARIANTS["slurm"]]), layout, DEFAULT_MODULE)


def test_a_control_character_in_env_file_is_refused_whole_by_the_preflight(tmp_path):
    """The pre-flight reads launch.env_file before any script is written: a newline in its path is refused
    there with the value shown escaped, not cut into a first line that says nothing of what is wrong."""
    from ondol.launch.preflight import check_env_file

    cfg = load_config(TINY, [f"run_dir={tmp_path}"])
    cfg.launch.env_file = f"{tmp_path}/x\ntouch {tmp_path}/env"
    with pytest.raises(UnsafeValueError) as raised:
        check_env_file(cfg)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("launch.env_file '") and "control character '\\n'" in message
