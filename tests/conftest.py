"""Shared test setup: offline environment and access to the real corpora in ../shared/corpora."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import socket
from pathlib import Path

import pytest
from clusters import slurm_cluster, ssh_localhost  # noqa: F401  (fixtures: real test clusters)

ROOT = Path(__file__).resolve().parents[1]
CORPORA = Path(os.environ.get("ONDOL_CORPORA", ROOT.parent / "shared" / "corpora"))

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "baselines" / "tiktoken_cache"))


# Set in this process by an in-process trainer (train/engine.py gives a launcher-less process rank 0 of 1 on a
# free port, and its process group stays up for the next in-process run).
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def without_rank_variables(environ) -> dict[str, str]:
    """The environment minus this process's rank variables: a child that inherited them would bind the port
    this process holds, or take rank 0 under an MPI runner."""
    return {k: v for k, v in environ.items() if k not in RANK_VARIABLES}


@pytest.fixture(autouse=True)
def _fresh_rank_variables():
    """Every test starts without them, so the subprocesses it starts do not inherit them."""
    for name in RANK_VARIABLES:
        os.environ.pop(name, None)


@pytest.fixture(autouse=True)
def keep_process_group(monkeypatch):
    """`ondol train` shuts its process group down on exit; in this process it stays up for the next in-process
    trainer (DeepSpeed keeps its groups for the process: after a new default group they would name a dead one)."""
    monkeypatch.setattr("ondol.train.cli._close_process_group", lambda: None)


def corpus_texts(name: str, n: int | None = None, skip: int = 0) -> list[str]:
    """The texts of documents skip..skip+n of a shared corpus file (e.g. 'ko_reviews'), in file order."""
    with gzip.open(CORPORA / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = itertools.islice(f, skip, None if n is None else skip + n)
        return [json.loads(line)["text"] for line in lines]


def chat_conversations(n: int, turns: int = 1, skip: int = 0) -> list[list[dict]]:
    """n conversations of `turns` consecutive real ko_chat question/answer pairs each (pairs skip.. in file
    order), chained into one multi-turn conversation when turns > 1."""
    with gzip.open(CORPORA / "ko_chat.jsonl.gz", "rt", encoding="utf-8") as f:
        pairs = [json.loads(line)["messages"] for line in itertools.islice(f, skip, skip + n * turns)]
    return [[m for pair in pairs[i:i + turns] for m in pair] for i in range(0, n * turns, turns)]


@pytest.fixture(scope="session")
def corpora() -> Path:
    if not CORPORA.is_dir():
        pytest.fail(f"shared corpora not found at {CORPORA}: clone with ../shared beside the checkout")
    return CORPORA


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory) -> Path:
    """A 4-step run on the golden assets (checkpoints at steps 2 and 4, context 64 tokens), with the tokenizer
    copied into RUN_DIR/tokenizer as `ondol export hf` expects: the model that evaluation tests score."""
    import shutil

    from golden import build_assets, run_losses

    assets = build_assets(tmp_path_factory.mktemp("eval_assets"))
    run = tmp_path_factory.mktemp("eval_run")
    run_losses(run, assets, "train.steps=4", "train.save_every=2", "train.eval_every=2")
    shutil.copytree(assets / "tokenizer", run / "tokenizer")
    return run


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
