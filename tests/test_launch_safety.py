"""Hostile values through every launcher, for real: `ondol launch` builds the command, DeepSpeed's own runners
(pdsh, OpenMPI, MVAPICH) or the generated sbatch script carry it, and the remote side runs it the way the real
tool would (pdsh: the joined remote line through `bash -c`; mpirun: the program's argv; srun: `bash -c` of the
node command). Stand-ins replace only the transport (pdsh, mpirun, srun), and record their command lines; two
more cases use the real tools: pdsh over ssh to a private sshd, and a job on the test Slurm cluster
(tests/clusters.py).

Each launch runs a probe module as every rank: it reads the resolved config and writes what it received.
Nothing may be executed (the payloads would create a canary file) and every rank must receive the exact values;
a secret given through launch.env_file must reach the rank and appear in no command line and no written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clusters import SSH_HOSTS, wait_job
from conftest import corpus_texts
from test_launch_run import (
    FAKE_MPIRUN,
    FAKE_PDSH,
    FAKE_SCONTROL,
    FAKE_SRUN,
    TINY,
    _free_port_in,
    _module,
    _ondol,
    _stand_ins,
)

PROBE = """
import hashlib, json, os, sys
from pathlib import Path
from ondol.configs import load_config
cfg = load_config(sys.argv[1])
secret = os.environ.get("WANDB_API_KEY", "")
received = {"mounts": cfg.launch.slurm.container_mounts, "prompt": cfg.generate.prompt, "run_dir": cfg.run_dir,
            "name": cfg.logging.wandb_run_name, "argv": sys.argv[1:],
            "secret_sha256": hashlib.sha256(secret.encode()).hexdigest()}
Path(cfg.run_dir, f"probe-rank{os.environ['RANK']}.json").write_text(json.dumps(received))
"""

FAKE_MPIRUN_MVAPICH = """#!/bin/bash
# stand-in for MVAPICH's mpirun: start -np copies of the program here with MVAPICH's rank variables
n=1
while [[ $# -gt 0 ]]; do
  case $1 in
    -np) n=$2; shift 2;;
    -ppn|--hostfile|-env) shift 2;;
    *) break;;
  esac
done
pids=()
for ((i = 0; i < n; i++)); do
  MV2_COMM_WORLD_RANK=$i MV2_COMM_WORLD_SIZE=$n MV2_COMM_WORLD_LOCAL_RANK=$i "$@" & pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

ROOT = Path(__file__).resolve().parents[1]
SECRET = "planted-secret-" + hashlib.sha256(b"ondol").hexdigest()[:16]


def _recording(script: str) -> str:
    """The stand-in, first appending its own command line (NUL-separated words) to $ARGV_LOG."""
    shebang, rest = script.split("\n", 1)
    return f'{shebang}\nprintf "%s\\0" "$0" "$@" >> "$ARGV_LOG"; echo >> "$ARGV_LOG"\n{rest}'


def hostile_values(canary: Path) -> dict[str, str]:
    """Value class -> value; every payload would create `canary` if a shell ran it."""
    korean = corpus_texts("ko_reviews", 1)[0][:24]  # real Korean text, as stored in the corpus
    return {
        "spaces": "two  words and a tab\there",
        "double quotes": 'say "hi" and "$(touch ' + str(canary) + ')"',
        "single quotes": "it's '$(touch " + str(canary) + ")'",
        "command substitution": f"$(touch {canary})",
        "backticks": f"`touch {canary}`",
        "semicolon": f"x; touch {canary}",
        "newline": f"x\ntouch {canary}",
        "pipe and redirect": f"x | tee {canary} > {canary} && touch {canary}",
        "variable": "$HOME $PATH %n",
        "non-ASCII": korean,
    }


LAUNCHERS = {  # launcher -> (stand-ins, extra overrides)
    "local": ({}, ["launch.gpus_per_node=1"]),
    "pdsh": ({"pdsh": _recording(FAKE_PDSH), "ssh": "#!/bin/sh\nexit 0\n"}, ["launch.gpus_per_node=1", "launch.nodes=2"]),
    "openmpi": ({"mpirun": _recording(FAKE_MPIRUN), "ompi_info": "#!/bin/sh\nexit 0\n", "ssh": "#!/bin/sh\nexit 0\n"},
                ["launch.gpus_per_node=2"]),
    "mvapich": ({"mpirun": _recording(FAKE_MPIRUN_MVAPICH), "mpiname": "#!/bin/sh\necho MVAPICH2-GDR 2.3\n",
                 "ssh": "#!/bin/sh\nexit 0\n"}, ["launch.gpus_per_node=2"]),
    "slurm": ({"srun": _recording(FAKE_SRUN), "scontrol": FAKE_SCONTROL},
              ["launch.nodes=2", "launch.gpus_per_node=1", "launch.slurm.request_gpus=false",
               f"launch.slurm.setup=[export PATH={Path(sys.executable).parent}:$PATH]"]),
}


def _launch(tmp_path: Path, launcher: str, stand_ins: dict[str, str], extra: list[str], *,
            env: dict[str, str] | None = None, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
            slurm_env: dict[str, str] | None = None) -> tuple[dict, Path, Path, list[str]]:
    """Launch the probe through `launcher` with hostile values; (values, run dir, canary, recorded command lines).
    `slurm_env`: submit to that real Slurm cluster and wait for the job instead of running the script here."""
    canary = tmp_path / "canary"
    values = hostile_values(canary)
    run = tmp_path / "run $(touch canary) `touch canary`; 'q' \"dq\" & | > x"  # a hostile run directory too
    env_file = tmp_path / "secrets.env"
    env_file.write_text(f"# secrets for the ranks\nWANDB_API_KEY={SECRET}\n")
    env_file.chmod(0o600)
    env = {**(env or {}), **_module(tmp_path, "probe_rank", PROBE), "ARGV_LOG": str(tmp_path / "argv.log")}
    env.setdefault("PDSH_RCMD_TYPE", "ssh")
    _stand_ins(tmp_path, env, **stand_ins)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{host} slots=2\n" for host in hosts))
    overrides = [f"run_dir={run}", f"launch.launcher={launcher}", f"launch.env_file={env_file}",
                 # JSON is YAML: the override grammar reads these strings back exactly
                 "launch.slurm.container_mounts=" + json.dumps(list(values.values()), ensure_ascii=False),
                 "generate.prompt=" + json.dumps(values["backticks"] + values["newline"], ensure_ascii=False),
                 "logging.wandb_run_name=a;id>" + str(canary), "launch.watchdog_minutes=2", *extra]
    if launcher in ("pdsh", "openmpi", "mvapich"):
        overrides += [f"launch.hostfile={hostfile}", f"launch.master_port={_free_port_in(1024, 65536)}"]
    if launcher == "local":
        overrides.append("launch.master_port=0")
    if slurm_env is not None:
        env = {**slurm_env, **env}
        overrides.append("--submit")
    result = _ondol(["launch", TINY, *overrides, "--module", "probe_rank"], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if slurm_env is not None:
        job = result.stdout.split("submitted Slurm job ")[1].split(":")[0]
        state = wait_job(job, slurm_env, timeout=300)
        output = (run / "logs" / f"slurm-{job}.out").read_text(encoding="utf-8", errors="replace")
        assert state == "COMPLETED", output[-3000:]
    elif launcher == "slurm":  # the sbatch script, as Slurm would run it on the batch host
        script = run / "launch" / "ondol.sbatch"
        job_id = _free_port_in(20000, 60000) - 20000
        slurm = {**os.environ, **env, "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "node[1-2]",
                 "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_ON_NODE": "2"}
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=slurm, timeout=240,
                              check=False, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    argv_log = tmp_path / "argv.log"
    commands = argv_log.read_text(encoding="utf-8").split("\n") if argv_log.is_file() else []
    return values, run, canary, [*commands, result.stdout, result.stderr]


def _check(values: dict, run: Path, canary: Path, commands: list[str], launcher: str, ranks: int) -> None:
    # the run directory's payloads touch `canary` in the shell's working directory: the test's or the ranks'
    assert not [p for p in (canary, run.parent / "canary", ROOT / "canary") if p.exists()], f"{launcher}: a payload ran"
    probes = sorted(run.glob("probe-rank*.json"))
    assert len(probes) == ranks
    for probe in probes:
        received = json.loads(probe.read_text(encoding="utf-8"))
        table = dict(zip(values, received["mounts"]))
        assert table == values, f"{launcher}: value classes received differently"
        assert received["prompt"] == values["backticks"] + values["newline"]
        assert received["name"] == f"a;id>{canary}"
        assert received["run_dir"] == str(run)
        assert received["secret_sha256"] == hashlib.sha256(SECRET.encode()).hexdigest()  # the env file reached it
    # The secret is in no command line and no file the launch wrote (the env file itself lives outside).
    assert not [c for c in commands if SECRET in c]
    leaked = [p for p in run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


# the stand-in variants that a test with the real tool repeats where the cluster tests must run (CI)
REAL_TOOL_TESTS = {"pdsh": "test_hostile_values_through_real_pdsh_and_sshd",
                   "slurm": "test_hostile_values_through_a_real_slurm_job"}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_hostile_values_execute_nothing_and_arrive_exactly(tmp_path, launcher):
    if launcher in REAL_TOOL_TESTS and os.environ.get("ONDOL_CLUSTERS") == "required":
        pytest.skip(f"{REAL_TOOL_TESTS[launcher]} runs the real {launcher}")
    stand_ins, extra = LAUNCHERS[launcher]
    _check(*_launch(tmp_path, launcher, stand_ins, extra), launcher, ranks=1 if launcher == "local" else 2)


def test_hostile_values_through_real_pdsh_and_sshd(tmp_path, ssh_localhost):
    """pdsh itself, over ssh to a real sshd whose remote shell runs the joined command line (ssh is wrapped
    only to add the private config and to record what it was asked to run)."""
    ssh = _recording(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {ssh_localhost.config} "$@"\n')
    extra = ["launch.nodes=2", "launch.gpus_per_node=1", "launch.master_addr=localhost"]
    result = _launch(tmp_path, "pdsh", {"ssh": ssh}, extra, env=ssh_localhost.env, hosts=ssh_localhost.hosts)
    assert any(SSH_HOSTS[0] in line and "deepspeed.launcher.launch" in line for line in result[3])
    _check(*result, "pdsh over sshd", ranks=2)


def test_hostile_values_through_a_real_slurm_job(tmp_path, slurm_cluster):
    """sbatch, the generated script and srun on the test cluster's two nodes."""
    extra = ["launch.nodes=2", "launch.gpus_per_node=1", "launch.slurm.request_gpus=false"]
    _check(*_launch(tmp_path, "slurm", {}, extra, slurm_env=slurm_cluster.env), "slurm cluster", ranks=2)
