"""`ondol data prepare` on DataTrove (data.executor=local|slurm): the same shards as single-machine prepare from
any number of tasks, near-duplicate removal, personal data, a task killed mid-write, bad input, real Slurm."""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ondol.data import cluster
from ondol.data.config import CleaningConfig, DataConfig, NearDedupConfig, SlurmConfig, SourceConfig
from ondol.data.preparation import prepare
from ondol.data.shards import read_manifest
from tests.conftest import CORPORA, ROOT, corpus_texts
from tests.test_data_prepare import corpus_source, decoded_split, messy_reviews, small_tokenizer

COMPARED = ("format", "hash", "seed", "dtype", "bos", "tokenizer", "weights", "sources", "totals", "splits")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


def shard_files(data_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data_dir)): p.read_bytes() for split in ("train", "val")
            for p in sorted((data_dir / split).rglob("*")) if p.is_file()}


def assert_same_preparation(a: Path, b: Path) -> None:
    """Byte-identical shards and the same manifest but for how it was made (executor, tasks, time)."""
    assert shard_files(a) == shard_files(b)
    ma, mb = read_manifest(a), read_manifest(b)
    assert {k: ma[k] for k in COMPARED} == {k: mb[k] for k in COMPARED}
    assert not (a / cluster.WORK).exists() and not (b / cluster.WORK).exists()


def messy_sources(tmp_path: Path) -> list[SourceConfig]:
    """Real reviews with duplicates far apart (so across task shares), bad lines, and a second source that
    repeats some of the first one's documents (deduplication is across sources, the first kept)."""
    messy = messy_reviews(tmp_path / "messy.jsonl")
    with open(tmp_path / "messy.jsonl", "a", encoding="utf-8") as f:
        f.write('{"text": "unterminated\n{"body": "no text field"}\n')
        f.write("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in messy[::7]))
    again = corpus_texts("ko_docs", 30) + messy[200:230]
    (tmp_path / "again.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                                  for t in again), encoding="utf-8")
    return [SourceConfig(name="messy", path=str(tmp_path / "messy.jsonl"), weight=0.7),
            SourceConfig(name="again", path=str(tmp_path / "again.jsonl"), weight=0.3)]


def test_one_and_four_tasks_write_the_shards_of_single_machine_prepare(tmp_path, tok, monkeypatch, capfd):
    monkeypatch.setattr(cluster, "CHECKPOINT_DOCS", 37)  # tasks start reading at a checkpoint inside the file
    monkeypatch.setattr(cluster, "RUN_SIGNATURES", 50)  # exact-dedup signatures sorted in runs, then merged
    monkeypatch.setattr(cluster, "MERGE_BLOCK", 16)
    sources = messy_sources(tmp_path)
    single = DataConfig(sources=sources, val_fraction=0.1, shard_tokens=3000, num_proc=1)
    reference = prepare(single, tok, tmp_path / "single", seed=7, progress=False)
    stats = {s["name"]: s for s in reference["sources"]}
    assert stats["messy"]["dropped"]["duplicate"] > 70 and stats["again"]["dropped"]["duplicate"] == 30
    assert stats["messy"]["bad_input"] == {"malformed_json": 1, "missing_text_field": 1}
    for tasks in (1, 4):
        cfg = DataConfig(sources=sources, val_fraction=0.1, shard_tokens=3000, num_proc=2, executor="local",
                         tasks=tasks)
        capfd.readouterr()
        manifest = prepare(cfg, tok, tmp_path / f"tasks{tasks}", seed=7, progress=True)
        assert manifest["stages"]["tokenize"]  # DataTrove's per-step counts of every stage
        assert_same_preparation(tmp_path / "single", tmp_path / f"tasks{tasks}")
        # DataTrove's log lines (its tasks run in other processes) go to a file, Ondol's stage lines to the console
        console = capfd.readouterr().err
        assert " | INFO " not in console and " | WARNING " not in console
        assert f"data: DataTrove's log: {tmp_path / f'tasks{tasks}' / cluster.LOG}" in console
        kept = sum(s["kept"]["train"] + s["kept"]["val"] for s in manifest["sources"])
        assert re.search(rf"stage tokenize: {tasks} tasks? done in [0-9.]+ s \(.*documents {kept:,}\)", console)
        assert f"Stats: All {tasks} tasks" in (tmp_path / f"tasks{tasks}" / cluster.LOG).read_text()
    # a finished preparation is reused whatever the executor
    assert prepare(single, tok, tmp_path / "tasks4", seed=7, progress=False)["config"]["executor"] == "local"


def test_near_duplicates_go_and_personal_data_is_masked(tmp_path, tok):
    # Long real reviews and ten planted near-copies (punctuation changed, a ㅋ added); one holds a phone number.
    long_reviews = [t for t in corpus_texts("ko_reviews", 3000) if len(t.split()) >= 25]
    reviews, other = long_reviews[:60], long_reviews[60]
    copies = [r.replace(".", "!").replace(",", ";") + " ㅋ" for r in reviews[:10]]
    assert all(c != r for c, r in zip(copies, reviews))
    texts = reviews + [f"{other} 문의 010-2345-6789"] + copies
    (tmp_path / "near.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                                 for t in texts), encoding="utf-8")
    cfg = DataConfig(sources=[SourceConfig(name="near", path=str(tmp_path / "near.jsonl"))], val_fraction=0.0,
                     executor="local", tasks=2, num_proc=1, near_dedup=NearDedupConfig(enabled=True), pii="mask")
    manifest = prepare(cfg, tok, tmp_path / "data", seed=0, progress=False)
    kept = decoded_split(tmp_path / "data", "train", tok)["near"]
    assert manifest["sources"][0]["dropped"] == {"near_duplicate": 10}
    for review, copy in zip(reviews[:10], copies):
        assert (review in kept) != (copy in kept)  # one of each pair, whichever task holds it
    assert set(reviews[10:]) <= set(kept)  # every distinct review stays
    assert manifest["sources"][0]["personal_data"] == {"phone": 1}
    assert f"{other} 문의 [전화번호]" in kept


def test_personal_data_in_the_pipeline_is_masked_or_dropped(tmp_path, tok):
    reviews = corpus_texts("ko_reviews", 40, skip=100)
    planted = [f"{reviews[0]} 연락 010-2345-6789", f"{reviews[1]} 메일 someone@example.co.kr"]
    (tmp_path / "pii.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                                for t in reviews[2:] + planted), encoding="utf-8")
    source = [SourceConfig(name="pii", path=str(tmp_path / "pii.jsonl"))]
    masked = prepare(DataConfig(sources=source, val_fraction=0.0, executor="local", tasks=1, pii="mask"), tok,
                     tmp_path / "mask", seed=0, progress=False)
    assert masked["sources"][0]["personal_data"] == {"phone": 1, "email": 1}
    assert decoded_split(tmp_path / "mask", "train", tok)["pii"][-2:] == [
        f"{reviews[0]} 연락 [전화번호]", f"{reviews[1]} 메일 [이메일]"]
    dropped = prepare(DataConfig(sources=source, val_fraction=0.0, executor="local", tasks=1, pii="drop"), tok,
                      tmp_path / "drop", seed=0, progress=False)
    assert dropped["sources"][0]["dropped"] == {"personal_data": 2}
    assert decoded_split(tmp_path / "drop", "train", tok)["pii"] == reviews[2:]
    with pytest.raises(ValueError, match="data.near_dedup and data.pii run on DataTrove"):
        prepare(DataConfig(sources=source, pii="mask"), tok, tmp_path / "single", seed=0, progress=False)


def test_language_filter_drops_english_from_the_korean_sources_on_both_executors(tmp_path, tok):
    """The corpora's own languages are the reference: Korean documents stay, English ones in the filtered sources
    go (counted as wrong_language), a source outside data.cleaning.language_sources is untouched."""
    sources = [corpus_source("ko_docs", 40), corpus_source("en_docs", 20), corpus_source("code_python", 10)]
    cleaning = CleaningConfig(languages=["ko"], min_language_score=0.5, language_sources=["ko_docs", "en_docs"])
    manifests = [prepare(DataConfig(sources=sources, cleaning=cleaning, val_fraction=0.0, executor=executor,
                                    tasks=2, num_proc=1), tok, tmp_path / executor, seed=0, progress=False)
                 for executor in ("single", "local")]
    assert_same_preparation(tmp_path / "single", tmp_path / "local")
    stats = {s["name"]: s for s in manifests[0]["sources"]}
    assert stats["ko_docs"]["kept"]["train"] >= 38
    assert stats["en_docs"]["dropped"] == {"wrong_language": 20} and stats["en_docs"]["kept"]["train"] == 0
    assert stats["code_python"]["kept"]["train"] == 10


KILLED_RUN = """
import sys
from ondol.data.preparation import prepare
from ondol.data.config import DataConfig, SourceConfig
from ondol.tokenizer.tokenizer import Tokenizer
if __name__ == "__main__":
    cfg = DataConfig(sources=[SourceConfig(name="ko_reviews", path=sys.argv[3], max_docs=8000)], shard_tokens=1000,
                     val_fraction=0.05, executor="local", tasks=2, num_proc=1)
    prepare(cfg, Tokenizer.load(sys.argv[1]), sys.argv[2], seed=5, progress=False)
"""


def test_a_task_killed_mid_write_is_redone_alone_and_the_output_is_identical(tmp_path, tok, monkeypatch):
    """num_proc=1: the tasks run one after another in the process that is killed, as a Slurm task would be."""
    killed = tmp_path / "killed"
    work = killed / cluster.WORK
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tok.directory), str(killed),
                             str(CORPORA / "ko_reviews.jsonl.gz")], cwd=ROOT, start_new_session=True,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((work / "tokens/00001/train/ko_reviews").glob("*.json"))) < 3:
        assert proc.poll() is None, "the preparation finished before it could be interrupted"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # task 1 of stage tokenize, mid-way through its shards
    proc.wait()
    assert (work / "tokenize/completions/00000").exists() and not (work / "tokenize/completions/00001").exists()

    ran = []
    for step in (cluster._CleanShare, cluster._TokenizeAndWrite):
        monkeypatch.setattr(step, "run", lambda self, data=None, rank=0, world_size=1, run=step.run:
                            ran.append((self.name, rank)) or run(self, data, rank, world_size))
    cfg = DataConfig(sources=[SourceConfig(name="ko_reviews", path=str(CORPORA / "ko_reviews.jsonl.gz"),
                                           max_docs=8000)], shard_tokens=1000, val_fraction=0.05,
                     executor="local", tasks=2, num_proc=1)
    prepare(cfg, tok, killed, seed=5, progress=False)
    assert ran == [("tokenize", 1)]  # finished tasks are not redone
    prepare(DataConfig(**{**cfg.__dict__, "executor": "single"}), tok, tmp_path / "whole", seed=5, progress=False)
    assert_same_preparation(tmp_path / "whole", killed)


def test_a_completion_file_is_renamed_into_place_after_the_tasks_files_are_on_disk(tmp_path, tok, monkeypatch):
    """When a task's completion file is renamed into place, every file the stages have left (cleaned documents,
    signatures, duplicates, shards, statistics, completion files) is fsynced at its present size, and so is
    every folder above it: a crash then cannot leave a task marked complete with torn outputs."""
    work = (tmp_path / "data" / cluster.WORK).resolve()
    durable, synced_folders, markers = {}, set(), []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.isdir(path):
            synced_folders.add(Path(path))
        else:
            durable[path] = os.fstat(fd).st_size
        fsync(fd)

    def checking_replace(src, dst):
        replace(src, dst)
        if str(src) in durable:
            durable[str(dst)] = durable.pop(str(src))
        if "completions" not in Path(dst).parts:
            return
        markers.append(Path(dst).relative_to(work).as_posix())
        for path in work.rglob("*"):
            rel = path.relative_to(work)
            if (path.is_dir() or path == Path(dst) or "logs" in rel.parts
                    or (len(rel.parts) == 2 and rel.name in DATATROVE_SUMMARIES)):
                continue  # the marker's folder is fsynced after the rename
            assert durable.get(str(path)) == path.stat().st_size, f"{rel} is not on disk before {markers[-1]}"
            assert {p for p in path.parents if p.is_relative_to(work)} <= synced_folders, rel

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", checking_replace)
    cfg = DataConfig(sources=[corpus_source("ko_reviews", 400)], val_fraction=0.1, shard_tokens=2000,
                     executor="local", tasks=2, num_proc=1)  # num_proc=1: the tasks run in this process
    prepare(cfg, tok, tmp_path / "data", seed=0, progress=False)
    assert markers == [f"{stage}/completions/{rank:05d}" for stage in ("clean", "exact", "tokenize")
                       for rank in (0, 1)]


def test_a_failing_task_is_one_error_line_naming_datatroves_log(tmp_path, tok, monkeypatch, capfd):
    def disk_full(self, data, rank=0, world_size=1):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cluster._TokenizeAndWrite, "run", disk_full)
    cfg = DataConfig(sources=[corpus_source("ko_docs", 20)], executor="local", tasks=1, num_proc=1)
    log = tmp_path / "data" / cluster.LOG
    with pytest.raises(ValueError, match=rf"a DataTrove task failed \(OSError: .*No space left on device\): see {log}"):
        prepare(cfg, tok, tmp_path / "data", seed=0, progress=False)
    assert "Traceback" not in capfd.readouterr().err
    assert "No space left on device" in log.read_text() and "Traceback" in log.read_text()


DATATROVE_SUMMARIES = ("executor.json", "stats.json")  # a stage's, written by DataTrove's launching process


def test_bad_input_behaves_as_in_single_machine_prepare(tmp_path, tok):
    good = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in corpus_texts("ko_reviews", 300))
    (tmp_path / "truncated.jsonl.gz").write_bytes(gzip.compress(good.encode())[:-2000])
    (tmp_path / "empty.jsonl").write_text("")
    cases = {"truncated": tmp_path / "truncated.jsonl.gz", "empty": tmp_path / "empty.jsonl",
             "missing": tmp_path / "no-such-corpus-dir"}
    for name, path in cases.items():
        outcomes = []
        for executor in ("single", "local"):
            cfg = DataConfig(sources=[SourceConfig(name=name, path=str(path))], executor=executor, tasks=2,
                             num_proc=1)
            try:
                manifest = prepare(cfg, tok, tmp_path / f"{name}-{executor}", seed=0, progress=False)
                outcomes.append(({k: manifest["sources"][0][k] for k in ("read", "bad_input", "kept", "dropped")},
                                 shard_files(tmp_path / f"{name}-{executor}")))
            except Exception as e:  # noqa: BLE001 - the same error, word for word, is what is compared
                outcomes.append((type(e).__name__, str(e)))
        assert outcomes[0] == outcomes[1], name
    assert "matches no file" in outcomes[0][1]  # the missing directory, named in one line


def test_sbatch_script_values_cannot_be_shell_words(tmp_path, tok):
    cfg = DataConfig(sources=[corpus_source("ko_docs", 5)], executor="slurm", tasks=1)
    with pytest.raises(ValueError, match="data.executor=slurm needs data.slurm.partition"):
        prepare(cfg, tok, tmp_path / "data", seed=0, progress=False)
    cfg.slurm = SlurmConfig(partition="debug", job_name="x$(touch pwned)")
    with pytest.raises(ValueError, match=r"data.slurm.job_name 'x\$\(touch pwned\)-clean' goes into an sbatch"):
        prepare(cfg, tok, tmp_path / "data", seed=0, progress=False)
    cfg.slurm.job_name = "ondol"
    with pytest.raises(ValueError, match="the run directory .* goes into an sbatch script"):
        prepare(cfg, tok, tmp_path / "a b;touch pwned", seed=0, progress=False)
    assert not list(tmp_path.rglob("pwned")) and not list(Path.cwd().glob("pwned"))


def test_slurm_executor_runs_the_stages_as_job_arrays_on_a_real_cluster(slurm_cluster, tmp_path, tok,
                                                                        monkeypatch, capfd):
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    sources = [corpus_source("ko_reviews", 600), corpus_source("ko_docs", 30)]
    cfg = DataConfig(sources=sources, val_fraction=0.1, shard_tokens=4000, executor="slurm", tasks=2,
                     slurm=SlurmConfig(partition="debug", time="00:10:00", mem_per_cpu_gb=1))
    manifest = prepare(cfg, tok, tmp_path / "slurm", seed=3, progress=True)
    assert set(manifest["stages"]) == {"clean", "exact", "tokenize"}
    console = capfd.readouterr().err
    assert " | INFO " not in console and "stage exact: 2 tasks done" in console  # sbatch lines in the log file
    assert re.search(r"stage tokenize: 2 tasks done in [0-9.]+ s \(.*documents 6", console)
    prepare(DataConfig(sources=sources, val_fraction=0.1, shard_tokens=4000), tok, tmp_path / "single", seed=3,
            progress=False)
    assert_same_preparation(tmp_path / "single", tmp_path / "slurm")
