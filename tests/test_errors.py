"""A new user's mistakes: each is one line on stderr naming the file, line or key and what to do, with its
class's exit code (ondol/errors.py), and nothing is written or lost. Commands run in this process through
`ondol.launch.cli.main`; Ctrl-C runs real processes, whose workers must not print tracebacks of their own.
The run directories are copies of the session's 4-step `eval_run` (conftest.py)."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
import zstandard

from ondol.configs import load_config, parse_config_args
from ondol.data.config import SourceConfig
from ondol.data.sources import source_identity
from ondol.files import LOCK, exclusive_lock
from ondol.launch.cli import build_parser, main
from ondol.model.io import CHECKSUMS
from tests.conftest import CORPORA, ROOT, without_rank_variables

TINY = str(ROOT / "configs" / "tiny-ko.yaml")
INTERRUPTED = "ondol: interrupted (Ctrl-C); finished work is kept, run the same command to continue\n"
TERMINATED = "ondol: stopped by SIGTERM; finished work is kept, run the same command to continue\n"
STRICT = " (data.strict is on: fix this line, or set data.strict=false to count and skip bad lines)"


def ondol(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (to show nothing was written or lost)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- config and command line --------------------------------------------------------------------------------
def test_yaml_syntax_error_is_one_line_with_its_line_number(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\ntrain:\n  steps: [3\nmodel:\n  d_model: 64\n")
    code, _, err = ondol(capsys, "train", config)
    assert (code, err) == (2, (f"ondol: config error: {config}:4:6: not valid YAML: did not find expected ',' or "
                              "']' while parsing a flow sequence that starts on line 3 (fix the syntax there)\n"))
    assert not (tmp_path / "run").exists()


def test_a_folder_where_the_config_file_is_expected(tmp_path, capsys):
    code, _, err = ondol(capsys, "data", "prepare", tmp_path)
    assert (code, err) == (2, (f"ondol: config error: {tmp_path} is a folder: give a YAML file, e.g. "
                              "configs/tiny-ko.yaml\n"))


def test_overrides_are_taken_after_option_flags(tmp_path, capsys):
    code, out, _ = ondol(capsys, "launch", TINY, "--dry-run", f"run_dir={tmp_path}", "launch.gpus_per_node=2",
                         "--no-host-check", "train.steps=7")
    assert code == 0 and "deepspeed --num_gpus 2 " in out
    assert "\n  steps: 7\n" in out  # the resolved config it prints has both overrides
    assert not (tmp_path / "launch").exists()  # a dry run writes nothing
    args = parse_config_args(build_parser(), ["generate", "RUN", "--prompt", "안녕", "generate.max_new_tokens=200"])
    assert (args.run_dir, args.prompt, args.overrides) == ("RUN", "안녕", ["generate.max_new_tokens=200"])
    args = parse_config_args(build_parser(), ["data", "prepare", TINY, "--no-progress", "seed=3", "data.num_proc=1"])
    assert args.no_progress and args.overrides == ["seed=3", "data.num_proc=1"]
    with pytest.raises(SystemExit) as exit_:
        main(["train", TINY, "--bogus"])
    assert exit_.value.code == 2 and capsys.readouterr().err.endswith("ondol: error: unrecognized arguments: --bogus\n")


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("train: {steps: [3}\n")
    code, _, err = ondol(capsys, "train", config, "--debug")
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith(f"ondol: config error: {config}:1:")
    monkeypatch.setenv("ONDOL_DEBUG", "1")
    assert "Traceback" in ondol(capsys, "train", config)[2]


# ---- identity and corpora -----------------------------------------------------------------------------------
def test_corpora_are_found_from_any_folder_and_identity_ignores_path_spelling(tmp_path, monkeypatch):
    monkeypatch.delenv("ONDOL_CORPORA", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY)
    assert Path(cfg.corpora_dir).resolve() == CORPORA.resolve() and Path(cfg.data.sources[0].path).is_file()
    (tmp_path / "link").symlink_to(CORPORA)
    spellings = [str(CORPORA / "ko_docs.jsonl.gz"), os.path.relpath(CORPORA / "ko_docs.jsonl.gz"),
                 "link/ko_docs.jsonl.gz", str(tmp_path / "." / "link" / "ko_docs.jsonl.gz")]
    identities = [source_identity(SourceConfig(name="docs", path=p)) for p in spellings]
    assert all(i == identities[0] for i in identities)
    size = (CORPORA / "ko_docs.jsonl.gz").stat().st_size
    assert [c[0] for c in identities[0]["content"]] == [size] and "path" not in identities[0]
    copy = tmp_path / "docs.jsonl.gz"
    copy.write_bytes((CORPORA / "ko_docs.jsonl.gz").read_bytes()[:-1])  # other content: another identity
    assert source_identity(SourceConfig(name="docs", path=str(copy))) != identities[0]


def test_missing_corpora_dir(tmp_path, capsys):
    code, _, err = ondol(capsys, "tokenizer", "train", TINY, f"run_dir={tmp_path / 'run'}",
                         f"corpora_dir={tmp_path / 'nope'}")
    assert (code, err) == (3, (f"ondol: data error: data source 'ko_reviews': path '{tmp_path}/nope/ko_reviews.jsonl.gz' "
                              "matches no file (give a file, glob or folder; for a Hugging Face dataset set "
                              "format: hf)\n"))
    assert not (tmp_path / "run").exists()


# ---- bad sources, through `ondol data prepare` ----------------------------------------------------------------
def _jsonl(n: int) -> bytes:
    with gzip.open(CORPORA / "ko_docs.jsonl.gz", "rb") as f:
        return b"".join(next(f) for _ in range(n))


def _prepare(capsys, tmp_path: Path, eval_run: Path, path: Path, *overrides: str) -> tuple[int, str, str]:
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\ntokenizer: {{path: {eval_run / 'tokenizer'}}}\n"
                      f"data: {{sources: [{{name: bad, path: '{path}'}}], num_proc: 1, val_fraction: 0.0}}\n")
    return ondol(capsys, "data", "prepare", config, "--no-progress", *overrides)


@pytest.mark.parametrize("suffix,compress,decompressor", [
    (".jsonl.gz", gzip.compress, lambda: zlib.decompressobj(wbits=31)),
    (".jsonl.zst", zstandard.compress, lambda: zstandard.ZstdDecompressor().decompressobj())])
def test_truncated_compressed_file_keeps_what_was_read(tmp_path, capsys, eval_run, suffix, compress, decompressor):
    whole = compress(_jsonl(200))
    path = tmp_path / f"docs{suffix}"
    path.write_bytes(whole[:len(whole) // 2])
    lines = decompressor().decompress(path.read_bytes()).count(b"\n")  # what the cut file still holds whole
    assert 0 < lines < 200

    code, _, err = _prepare(capsys, tmp_path, eval_run, path, "data.strict=true")
    assert (code, err) == (3, (f"ondol: data error: {path}:{lines + 1}: broken file: the compressed stream ends "
                              f"early at byte {len(whole) // 2:,} of {len(whole) // 2:,} (truncated file?); the "
                              "lines before it are kept (re-download or recompress the file to read the rest)"
                              f"{STRICT}\n"))
    assert not (tmp_path / "run" / "data" / "manifest.json").exists()

    code, out, err = _prepare(capsys, tmp_path, eval_run, path)
    assert code == 0, err
    (source,) = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())["sources"]
    assert source["read"] == lines and source["bad_input"] == {"broken_file": 1}
    assert f"skipped {path}:{lines + 1}: broken file: the compressed stream ends early" in out


@pytest.mark.parametrize("content", [b"", gzip.compress(b"")], ids=["0-byte", "empty-gzip"])
def test_empty_source(tmp_path, capsys, eval_run, content):
    path = tmp_path / "empty.jsonl.gz"
    path.write_bytes(content)
    code, _, err = _prepare(capsys, tmp_path, eval_run, path)
    assert (code, err) == (3, (f"ondol: data error: data source 'bad': no documents in '{path}' (no bad input); "
                              "check the path and text_field 'text'\n"))
    assert not (tmp_path / "run" / "data" / "manifest.json").exists()


def test_non_utf8_bytes(tmp_path, capsys, eval_run):
    good = _jsonl(30).split(b"\n")
    good[4] = good[4][:40] + b"\xff" + good[4][40:]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(good))
    code, _, err = _prepare(capsys, tmp_path, eval_run, path, "data.strict=true")
    assert (code, err) == (3, (f"ondol: data error: {path}:5: invalid utf8: byte 40: invalid start byte{STRICT}\n"))
    code, _, _ = _prepare(capsys, tmp_path, eval_run, path)
    (source,) = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())["sources"]
    assert code == 0 and source["read"] == 29 and source["bad_input"] == {"invalid_utf8": 1}


def test_a_folder_where_a_source_file_is_expected(tmp_path, capsys, eval_run):
    folder = tmp_path / "docs.jsonl.gz"
    folder.mkdir()
    code, _, err = _prepare(capsys, tmp_path, eval_run, folder)
    assert (code, err) == (3, (f"ondol: data error: data source 'bad': folder '{folder}' has no "
                              ".jsonl/.json, .csv, .tsv, .txt (each also .gz/.zst) or .parquet files\n"))


def test_unreadable_file(tmp_path, capsys, eval_run):
    path = tmp_path / "locked.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl(5)))
    path.chmod(0)
    expected = f"ondol: data error: {path}: cannot read it (Permission denied): fix its permissions or path\n"
    if os.geteuid() != 0:
        code, _, err = _prepare(capsys, tmp_path, eval_run, path)
        assert (code, err) == (3, expected)
        return
    # root reads any file: drop the capability that lets it, in a process of its own
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    config = tmp_path / "run.yaml"
    _prepare(capsys, tmp_path, eval_run, path)  # writes run.yaml (and fails: root reads it here)
    result = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m",
                             "ondol.launch.cli", "data", "prepare", str(config), "--no-progress"],
                            check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=without_rank_variables(os.environ))
    assert (result.returncode, result.stderr) == (3, expected)


# ---- runs and checkpoints (copies of the session's 4-step eval_run, checkpoints at steps 2 and 4) -----------
@pytest.fixture
def run(eval_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(eval_run, copy, symlinks=True)  # data/ stays a link to the shared prepared data
    return copy


def _train(capsys, run: Path, *overrides: str) -> tuple[int, str, str]:
    return ondol(capsys, "train", run / "config.yaml", f"run_dir={run}", *overrides)


def test_steps_below_the_checkpoint_are_refused(run, capsys, keep_process_group):
    before = tree(run)
    code, _, err = _train(capsys, run, "train.steps=3")
    assert (code, err) == (6, (f"ondol: train error: {run}/checkpoints/step_00000004 is at step 4, past "
                              "train.steps=3: nothing to train. Set train.steps above 4 to train further (the "
                              "schedule stretches to the new length), or train.resume=never to start over\n"))
    assert tree(run) == before  # config.yaml, its history, metrics and checkpoints untouched


def test_a_resume_with_another_model_shape_under_ondol_run(run, capsys):
    before = tree(run)
    code, _, err = ondol(capsys, "run", run / "config.yaml", f"run_dir={run}", "model.d_model=256")
    assert (code, err) == (6, (f"ondol: train error: cannot resume from {run}/checkpoints/step_00000004: "
                              "model.d_model: 128 -> 256. Restore the original setting, point train.resume at a "
                              "compatible checkpoint, or start over with train.resume=never\n"))
    assert tree(run) == before  # config.yaml still says d_model 128, like the checkpoints


def test_a_truncated_checkpoint(run, capsys, keep_process_group):
    folder = run / "checkpoints" / "step_00000004"
    states = folder / "mp_rank_00_model_states.pt"
    size = states.stat().st_size
    states.write_bytes(states.read_bytes()[:size // 2])
    before = tree(run)
    code, _, err = _train(capsys, run, f"train.resume={folder}")
    assert (code, err) == (6, (f"ondol: train error: train.resume={folder}: {states} has {size // 2:,} bytes, "
                              f"meta.json recorded {size:,}: the checkpoint is damaged; point train.resume at "
                              f"another one under {run}/checkpoints\n"))
    assert tree(run) == before


def test_a_deleted_shard(eval_run, tmp_path, capsys, keep_process_group):
    run = tmp_path / "run"
    shutil.copytree(eval_run, run)  # the prepared data copied too: one of its shards goes
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    record = manifest["splits"]["train"]["ko_docs"][0]
    shard = run / "data" / f"{record['path']}.bin"
    shard.unlink()
    before = tree(run)
    code, _, err = _train(capsys, run, "train.steps=5")
    assert (code, err) == (3, (f"ondol: data error: {shard}: missing, or not the {record['tokens']} tokens and "
                              f"{record['docs']} documents the manifest says; re-run `ondol data prepare CONFIG` "
                              "to rebuild it\n"))
    assert tree(run) == before


def test_a_damaged_manifest_is_named_and_rebuilt_by_prepare(eval_run, tmp_path, capsys, keep_process_group):
    run = tmp_path / "run"
    shutil.copytree(eval_run, run)  # the prepared data copied too: its manifest is damaged
    manifest = run / "data" / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text(manifest.read_text()[:100])
    code, _, err = _train(capsys, run, "train.steps=5")
    assert code == 3 and err.startswith(f"ondol: data error: {manifest}: damaged, not JSON (") and err.endswith(
        "); re-run `ondol data prepare CONFIG`: it rebuilds the manifest from the finished shards\n"), err
    code, _, err = ondol(capsys, "data", "prepare", run / "config.yaml", f"run_dir={run}", "--no-progress")
    assert code == 0, err
    assert json.loads(manifest.read_text())["splits"] == good["splits"]


def test_a_shard_with_ids_past_the_vocabulary_is_named(eval_run, tmp_path, capsys, keep_process_group):
    run = tmp_path / "run"
    shutil.copytree(eval_run, run)
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    shards = [run / "data" / f"{r['path']}.bin" for rs in manifest["splits"]["train"].values() for r in rs]
    for shard in shards:  # the right size, damaged bytes: the first id of every shard becomes 65535
        with open(shard, "r+b") as f:
            f.write(b"\xff\xff")
    code, _, err = _train(capsys, run, "train.steps=5")
    named = err.removeprefix("ondol: data error: ").split(":")[0]
    assert code == 3 and Path(named) in shards, err
    assert err == (f"ondol: data error: {named}: token id 65535 is not below the vocabulary of "
                   f"{manifest['tokenizer']['vocab_size']} the manifest records: the shard is damaged; delete it "
                   "and re-run `ondol data prepare CONFIG` to rebuild it\n")


def test_a_model_vocab_below_the_tokenizers_names_the_key(run, capsys, keep_process_group):
    code, _, err = _train(capsys, run, "model.vocab_size=1")
    assert code == 2 and err.startswith("ondol: config error: model.vocab_size=1 is smaller than the tokenizer's "
                                        "2048 at "), err


@pytest.mark.parametrize("damage", ["meta.json", "tokenizer.model"])
def test_damaged_tokenizer_files_are_named(run, tmp_path, capsys, damage):
    path = run / "tokenizer" / damage
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    code, _, err = ondol(capsys, "export", "hf", run, tmp_path / "hf")
    why = "damaged, not JSON (" if damage == "meta.json" else "damaged, not a SentencePiece model"
    assert code == 4 and err.startswith(f"ondol: tokenizer error: {path}: {why}") and err.endswith(
        "; retrain the tokenizer (`ondol tokenizer train CONFIG`) or copy its folder again\n"), err


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_the_tokenizer(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ondol.tokenizer.train.write_hf_files", _full_disk)
    run = tmp_path / "run"
    code, _, err = ondol(capsys, "tokenizer", "train", TINY, f"run_dir={run}", "tokenizer.vocab_size=2048",
                         "data.sources.0.max_docs=2500", "data.sources.1.max_docs=500")  # the golden sample
    last = err.splitlines()[-1]  # after the sample's progress lines
    assert code == 4 and last.startswith(f"ondol: tokenizer error: {run}: no space left on the device for the "
                                         "tokenizer (about ") and last.endswith(
        " MiB free); free some space and run the same command again"), err
    assert list(run.iterdir()) == []  # neither a tokenizer folder nor its scratch folder, nor a lock


def test_a_full_disk_while_preparing_keeps_the_finished_shards(eval_run, tmp_path, capsys, monkeypatch):
    from ondol.data import shards

    writes = []

    def fills_at_the_second_record(path, data):  # the file that would mark shard 00001 complete
        writes.append(path)
        if path.name == "00001.json":
            _full_disk()
        write_atomic(path, data)

    write_atomic = shards.write_atomic
    monkeypatch.setattr("ondol.data.shards.write_atomic", fills_at_the_second_record)
    run = tmp_path / "run"
    args = ["data", "prepare", TINY, f"run_dir={run}", "--no-progress", f"tokenizer.path={eval_run / 'tokenizer'}",
            "data.sources.0.max_docs=3000", "data.sources.1.max_docs=300", "data.shard_tokens=20000"]
    code, _, err = ondol(capsys, *args)
    folder = writes[-1].parent
    assert code == 3 and err.startswith(f"ondol: data error: {folder}: no space left on the device for shard "
                                        "00001 (about "), err
    assert "00001.json" not in {p.name for p in folder.iterdir()}  # shard 00001 is not marked complete
    assert not (run / "data" / "manifest.json").exists()
    monkeypatch.setattr("ondol.data.shards.write_atomic", write_atomic)
    code, _, err = ondol(capsys, *args)
    assert code == 0, err
    assert (run / "data" / "manifest.json").is_file()


def test_each_attempt_that_trains_keeps_its_config(run, capsys, keep_process_group):
    first = (run / "config.yaml").read_text()
    assert [p.name for p in (run / "configs").iterdir()] == ["attempt-1.yaml"]
    code, out, err = _train(capsys, run, "train.steps=5")
    assert code == 0, err
    assert f"resumed from {run}/checkpoints/step_00000004 at step 4" in out
    second = (run / "config.yaml").read_text()
    assert "steps: 5" in second and "steps: 4" in first
    history = sorted((run / "configs").iterdir())
    assert [p.name for p in history] == ["attempt-1.yaml", "attempt-2.yaml"]
    assert history[0].read_text().split("\n", 1)[1] == first
    assert history[1].read_text().startswith("# attempt 2, started ") and " at step 4\n" in history[1].read_text()
    assert history[1].read_text().split("\n", 1)[1] == second


def test_a_resume_with_another_seed(run, capsys, keep_process_group):
    """(deepspeed.precision is checked the same way: test_train.py; a bf16 engine takes half a minute on CPU)"""
    before = tree(run)
    code, _, err = _train(capsys, run, "train.steps=5", "seed=7")
    assert (code, err) == (6, (f"ondol: train error: cannot resume from {run}/checkpoints/step_00000004: seed: 1234 "
                              "-> 7. Restore the original setting, point train.resume at a compatible checkpoint, "
                              "or start over with train.resume=never\n"))
    assert tree(run) == before


# How a full disk reaches a save: an OSError, or torch.save's zip writer finding its file shorter than written
FULL_DISK = {"oserror": (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
             "torch.save": (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 20797632 vs "
                                         "20797524"), "a file could not be written whole")}


@pytest.mark.parametrize("how", FULL_DISK)
def test_a_full_disk_while_saving_loses_nothing(run, capsys, keep_process_group, monkeypatch, how):
    save = torch.save
    error, reason = FULL_DISK[how]

    def disk_full(obj, path, *args, **kwargs):  # the last file of a save: every other one is written
        if Path(path).name.startswith("rng_rank"):
            raise error
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    checkpoints = tree(run / "checkpoints")
    code, _, err = _train(capsys, run, "train.steps=5")
    assert (code, err) == (6, (f"ondol: train error: could not save checkpoint {run}/checkpoints/step_00000005: "
                              f"{reason}; the previous checkpoints are kept: free space under "
                              f"{run}/checkpoints (or lower train.keep_last) and run the same command again to "
                              "resume\n"))
    assert tree(run / "checkpoints") == checkpoints  # the partial step 5 removed, steps 2 and 4 and latest as were


HOLD_LOCK = """
import sys
from ondol.files import exclusive_lock
with exclusive_lock(sys.argv[1], RuntimeError):
    print("held", flush=True)
    sys.stdin.readline()  # until the test closes stdin (or kills this process)
"""


def _holder(lock: Path) -> subprocess.Popen:
    """A process holding `lock` once this returns."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=without_rank_variables(os.environ))
    assert proc.stdout.readline() == "held\n"
    return proc


def _held_by(lock: Path, holder: subprocess.Popen) -> str:
    return (f"{lock} is held by pid {holder.pid} on host {socket.gethostname()}, which is writing there: wait for "
            "it to finish or stop it, or use another folder\n")


def test_a_second_writer_of_a_run_is_refused_while_the_first_lives(run, capsys, keep_process_group):
    holder = _holder(run / LOCK)
    try:
        before = tree(run)
        code, _, err = _train(capsys, run, "train.steps=5")
        assert (code, err) == (6, f"ondol: train error: {_held_by(run / LOCK, holder)}")
        assert tree(run) == before
    finally:
        holder.kill()  # SIGKILL: the OS releases the lock, nothing stale is left
        holder.wait()
    with exclusive_lock(run / LOCK, RuntimeError):
        assert (run / LOCK).read_text() == f"pid {os.getpid()} on host {socket.gethostname()}\n"


def test_data_and_tokenizer_folders_have_one_writer(eval_run, tmp_path, capsys):
    source = tmp_path / "docs.jsonl"
    source.write_bytes(_jsonl(20))
    data_lock = tmp_path / "run" / "data.lock"  # beside the folder, which may be moved aside whole
    holder = _holder(data_lock)
    code, _, err = _prepare(capsys, tmp_path, eval_run, source)
    assert (code, err) == (3, f"ondol: data error: {_held_by(data_lock, holder)}")
    holder.stdin.close()  # a holder that exits normally releases it too
    assert holder.wait(timeout=60) == 0
    assert _prepare(capsys, tmp_path, eval_run, source)[0] == 0

    tokenizer_lock = tmp_path / "run" / "tokenizer.lock"  # beside the folder, which appears only when complete
    holder = _holder(tokenizer_lock)
    try:
        code, _, err = ondol(capsys, "tokenizer", "train", TINY, f"run_dir={tmp_path / 'run'}")
        assert (code, err) == (4, f"ondol: tokenizer error: {_held_by(tokenizer_lock, holder)}")
        assert not (tmp_path / "run" / "tokenizer").exists()
    finally:
        holder.kill()
        holder.wait()


def test_exports_and_checkpoints_prove_their_bytes(eval_run, tmp_path, capsys):
    out = tmp_path / "hf"
    code, _, err = ondol(capsys, "export", "hf", eval_run, out)
    assert code == 0, err
    check = subprocess.run(["sha256sum", "-c", CHECKSUMS], cwd=out, capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout  # coreutils reads the list: an independent check of the digests
    assert sorted(check.stdout.splitlines()) == sorted(f"{p.name}: OK" for p in out.iterdir() if p.name != CHECKSUMS)
    run = tmp_path / "run"
    shutil.copytree(eval_run, run, symlinks=True)
    weights = run / "model" / "model.safetensors"
    _flip_byte(weights)
    code, _, err = ondol(capsys, "export", "hf", run, tmp_path / "again")
    assert (code, err) == (5, (f"ondol: model error: {weights} does not match its SHA-256 in "
                              f"{run}/model/{CHECKSUMS} (its bytes changed): export the model again, or copy it "
                              "again from its source\n"))
    folder = run / "checkpoints" / "step_00000004"
    states = folder / "mp_rank_00_model_states.pt"
    _flip_byte(states)
    code, _, err = ondol(capsys, "export", "hf", folder, tmp_path / "again")
    assert (code, err) == (5, (f"ondol: model error: {folder}: {states} does not have the xxh3_128 digest meta.json "
                              "recorded (its bytes changed): the checkpoint is damaged; export another one (or the "
                              "final weights), or pass --no-verify to export it as it is\n"))
    assert ondol(capsys, "export", "hf", folder, tmp_path / "again", "--no-verify")[0] == 0


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- Ctrl-C in each stage ------------------------------------------------------------------------------------
def _interrupt(tmp_path: Path, args: list[str], ready) -> tuple[int, str]:
    """Run `ondol ARGS`, send SIGINT once `ready(its stderr so far)` holds; (exit code, stderr)."""


# ---- Ctrl-C and SIGTERM in each stage --------------------------------------------------------------------------
def _descendants(pid: int) -> set[int]:
    """The processes below `pid` (from /proc: each one's parent is the 4th field of its stat)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while listed
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie has ended: it only waits for its parent to read its status)."""
    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    return {pid for pid in pids if running(pid)}


def _interrupt(tmp_path: Path, args: list[str], ready, sig=signal.SIGINT, workers: int = 0) -> tuple[int, str]:
    """Run `ondol ARGS`, send `sig` once `ready(its stderr so far)` holds and it has `workers` child processes;
    (exit code, stderr). It must exit within 10 s of the signal and leave none of its children running."""
    err = tmp_path / "stderr"
    with open(err, "w") as stderr:
        # The child starts with SIGINT at its default, as from a terminal: an ignored SIGINT (a test run started
        # in the background) would be inherited, a handled one is reset by exec.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "ondol.launch.cli", *args], cwd=ROOT, text=True,
                                    stdout=subprocess.DEVNULL, stderr=stderr, env=without_rank_variables(os.environ))
        finally:
            signal.signal(signal.SIGINT, previous)
        deadline, children = time.monotonic() + 240, set()
        while proc.poll() is None and time.monotonic() < deadline and not (
                ready(err.read_text()) and len(children := _descendants(proc.pid)) >= workers):
            time.sleep(0.05)
        assert proc.poll() is None, f"finished before it could be interrupted: {err.read_text()[-2000:]}"
        proc.send_signal(sig)
        proc.wait(timeout=10)
    assert _alive(children) == set(), f"left running: {_alive(children)}"
    return proc.returncode, err.read_text()


def test_ctrl_c_while_training_the_tokenizer(tmp_path):
    run = tmp_path / "run"
    code, err = _interrupt(tmp_path, ["tokenizer", "train", TINY, f"run_dir={run}"],
                           ready=lambda err: "training SentencePiece" in err)  # the trainer runs in its child
    assert code == 130 and err.endswith(INTERRUPTED) and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("ondol")] == [INTERRUPTED.strip()]
    assert not (run / "tokenizer").exists()


def test_ctrl_c_while_preparing_data(tmp_path, eval_run):
    run = tmp_path / "run"
    code, err = _interrupt(tmp_path, ["data", "prepare", TINY, f"run_dir={run}", "--no-progress",
                                      f"tokenizer.path={eval_run / 'tokenizer'}", "data.num_proc=2"],
                           ready=lambda out: (run / "data" / "prepare.json").exists())
    assert (code, err) == (130, INTERRUPTED)  # one line: the tokenizing workers left Ctrl-C to their parent
    assert not (run / "data" / "manifest.json").exists()


def test_sigterm_while_training_the_tokenizer_stops_its_trainer_child(tmp_path):
    run = tmp_path / "run"
    code, err = _interrupt(tmp_path, ["tokenizer", "train", TINY, f"run_dir={run}"], sig=signal.SIGTERM, workers=1,
                           ready=lambda err: "training SentencePiece" in err)
    assert code == 143 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("ondol")] == [TERMINATED.strip()]
    assert not (run / "tokenizer").exists() and not (run / "tokenizer.partial").exists()


def test_sigterm_while_preparing_data_stops_the_workers_and_a_rerun_finishes(tmp_path, eval_run):
    run = tmp_path / "run"
    args = ["data", "prepare", TINY, f"run_dir={run}", "--no-progress", f"tokenizer.path={eval_run / 'tokenizer'}",
            "data.num_proc=2", "data.sources.0.max_docs=20000", "data.sources.1.max_docs=2000"]
    code, err = _interrupt(tmp_path, args, sig=signal.SIGTERM, workers=2,
                           ready=lambda out: (run / "data" / "prepare.json").exists())
    assert (code, err) == (143, TERMINATED)
    assert not (run / "data" / "manifest.json").exists()
    assert [p.name for p in (run / "data").rglob("*.tmp")] == []
    rerun = subprocess.run([sys.executable, "-m", "ondol.launch.cli", *args],
                           check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env=without_rank_variables(os.environ))
    assert rerun.returncode == 0, rerun.stderr
    assert (run / "data" / "manifest.json").is_file()


def test_ctrl_c_while_exporting(eval_run, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ondol.model.export.read_tensor", interrupted)  # mid-way through writing the weights
    code, _, err = ondol(capsys, "export", "hf", eval_run, tmp_path / "hf")
    assert (code, err) == (130, INTERRUPTED)
    assert list((tmp_path / "hf").iterdir()) == []  # no partial weights file left behind


def test_sigterm_while_exporting_leaves_no_temporary_file(eval_run, tmp_path, capsys, monkeypatch):
    from ondol.model import export

    read_tensor = export.read_tensor

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled as soon as this returns: mid-way through the weights
        return read_tensor(*args, **kwargs)

    monkeypatch.setattr("ondol.model.export.read_tensor", terminated)
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = ondol(capsys, "export", "hf", eval_run, tmp_path / "hf")
    assert (code, err) == (143, TERMINATED)
    assert list((tmp_path / "hf").iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler is gone with it


def test_a_signal_that_a_library_turns_into_its_own_error_still_stops_as_the_signal(eval_run, tmp_path, capsys,
                                                                                    monkeypatch):
    """safetensors' get_tensor turns the Terminated raised inside it into a ValueError: the command still exits
    as SIGTERM (143, one line), not as an unexpected ValueError."""
    def terminated_inside(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException as e:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from e

    monkeypatch.setattr("ondol.model.export.read_tensor", terminated_inside)
    code, _, err = ondol(capsys, "export", "hf", eval_run, tmp_path / "hf")
    assert (code, err) == (143, TERMINATED)
    assert list((tmp_path / "hf").iterdir()) == []


CLEANUP_THAT_HANGS = """
import multiprocessing, sys, time
from ondol.errors import exit_process, reported

def command():
    multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,)).start()
    try:
        time.sleep(600)
    finally:
        print("cleaning up", file=sys.stderr, flush=True)
        time.sleep(600)

exit_process(reported(command, "ondol", False))
"""


def test_a_second_signal_stops_at_once_with_the_workers(tmp_path):
    """The first SIGTERM starts the command's clean-up; a second one, while that clean-up runs, ends the
    command within seconds and kills its worker processes."""
    script = tmp_path / "hangs.py"
    script.write_text(CLEANUP_THAT_HANGS)
    err = tmp_path / "stderr"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stderr=stderr)
        deadline = time.monotonic() + 60
        while not (children := _descendants(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        while "cleaning up" not in err.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 143
    deadline = time.monotonic() + 2  # SIGKILL is sent, not waited for: the worker ends within moments
    while _alive(children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children and _alive(children) == set()
    assert err.read_text() == ("cleaning up\nreceived SIGTERM after SIGTERM: stopping at once; a run of the same "
                               "command redoes what was not finished\n")


EXIT_AFTER_TEARDOWN_ABORT = """
import os, sys
from ondol.errors import exit_process

class AbortsAtTeardown:  # stands in for torch's gloo threads, destroyed while the interpreter shuts down
    def __del__(self):
        os.abort()

keep = AbortsAtTeardown()
if sys.argv[1] == "trained":
    sys.modules["deepspeed"] = type(sys)("deepspeed")
print("summary written", end="")  # left in stdout's buffer: the exit path must flush it
exit_process(3)
"""


@pytest.mark.parametrize("trained", [True, False])
def test_a_process_that_trained_skips_the_teardown_that_can_abort_it(tmp_path, trained):
    """A finished rank whose interpreter teardown would abort (SIGABRT) still exits with its own code and keeps
    its output; a process that never trained tears down as usual, so the abort stays visible there."""
    script = tmp_path / "leave.py"
    script.write_text(EXIT_AFTER_TEARDOWN_ABORT)
    result = subprocess.run([sys.executable, str(script), "trained" if trained else "plain"], check=False,
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout == "summary written"
    assert result.returncode == (3 if trained else -signal.SIGABRT)
