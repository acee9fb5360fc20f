"""Every exit code of the README's table, each from one real mistake through the real `ondol` program (its own
process, as a shell or a scheduler sees it): the code, and one line on stderr naming what to fix.

Elsewhere, because they need a running job: 75 (stopped after saving) in tests/test_train.py
(test_stop_signal_saves_at_that_step_and_resume_is_bit_exact), tests/test_train_procs.py (SIGTERM to one of two
ranks) and tests/test_launch_run.py (a signal to `ondol launch`); 130 (Ctrl-C) in tests/test_errors.py
(test_ctrl_c_while_*). `ondol launch` passes a rank's code on (launch/supervise.py, tests/test_launch_run.py), so a
launch on a finished run exits 6 like `ondol train` below.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, without_rank_variables

TINY = ROOT / "configs" / "tiny-ko.yaml"


def ondol(*args) -> tuple[int, str]:
    """(exit code, stderr) of `python -m ondol.launch.cli ARGS` in its own process."""
    env = {**without_rank_variables(os.environ), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "ondol.launch.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    return done.returncode, done.stderr


def one_line(err: str, start: str) -> str:
    assert err.startswith(start) and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def run(eval_run, tmp_path) -> Path:
    """A copy of the session's 4-step run (conftest.py), trained to its train.steps."""
    copy = tmp_path / "run"
    shutil.copytree(eval_run, copy, symlinks=True)
    return copy


def test_2_a_misspelt_run_folder(eval_run):
    misspelt = eval_run.with_name(eval_run.name + "x")
    code, err = ondol("eval", misspelt)
    assert (code, err) == (2, (f"ondol: config error: {misspelt}: not found: give a run directory written by `ondol "
                              "run` or `ondol train` (it holds config.yaml), or the run's config YAML\n"))


def test_2_a_config_file_where_a_run_folder_is_expected(tmp_path):
    code, err = ondol("export", "hf", TINY, tmp_path / "hf")
    assert (code, err) == (2, (f"ondol: config error: {TINY}: is a file (a config?): give the run directory (the "
                              "config's run_dir, e.g. runs/tiny-ko) or one of its checkpoints, "
                              "RUN_DIR/checkpoints/step_N\n"))
    assert not (tmp_path / "hf").exists()


def test_3_training_before_data_prepare(eval_run, tmp_path):
    code, err = ondol("train", TINY, f"run_dir={tmp_path}", f"tokenizer.path={eval_run / 'tokenizer'}")
    assert (code, err) == (3, (f"ondol: data error: no manifest.json in {tmp_path / 'data'}: run `ondol data prepare "
                              "CONFIG` first (an interrupted preparation resumes when re-run)\n"))


def test_4_data_prepare_before_tokenizer_train(tmp_path):
    code, err = ondol("data", "prepare", TINY, f"run_dir={tmp_path}", "--no-progress")
    assert code == 4, err
    one_line(err, f"ondol: tokenizer error: {tmp_path / 'tokenizer'}/tokenizer.model not found: train one with "
                  "`ondol tokenizer train CONFIG`")
    assert not (tmp_path / "data").exists()


def test_5_export_into_a_folder_that_holds_files(eval_run, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = ondol("export", "hf", eval_run, out)
    assert (code, err) == (5, (f"ondol: model error: {out} is not an empty folder: give a new folder, or add "
                              "--overwrite to replace the export in it\n"))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_6_training_a_run_already_at_train_steps(run):
    code, err = ondol("train", run / "config.yaml", f"run_dir={run}")
    assert (code, err) == (6, (f"ondol: train error: {run}/checkpoints/step_00000004 is at step 4, already at "
                              "train.steps=4: nothing to train. Set train.steps above 4 to train further (the "
                              "schedule stretches to the new length), or train.resume=never to start over\n"))


def test_7_a_hostfile_that_is_not_there(tmp_path):
    hosts = tmp_path / "hosts"
    code, err = ondol("launch", TINY, f"run_dir={tmp_path / 'run'}", "launch.launcher=pdsh", f"launch.hostfile={hosts}",
                      "--dry-run")
    assert code == 7, err
    one_line(err, f"ondol: pre-flight: hostfile {hosts} not found (launch.hostfile)")


def test_1_an_os_error(eval_run, tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "hf"
    code, err = ondol("export", "hf", eval_run, out)
    assert (code, err) == (1, (f"ondol: error: [Errno 20] Not a directory: '{out}' (run with --debug or "
                              "ONDOL_DEBUG=1 for the traceback)\n"))
