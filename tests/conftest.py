"""Shared test setup: offline environment and access to the real corpora in ../shared/corpora."""

from __future__ import annotations

import gzip
import itertools
import json
import os
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


def corpus_texts(name: str, n: int | None = None, skip: int = 0) -> list[str]:
    """The texts of documents skip..skip+n of a shared corpus file (e.g. 'ko_reviews'), in file order."""
    with gzip.open(CORPORA / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = itertools.islice(f, skip, None if n is None else skip + n)
        return [json.loads(line)["text"] for line in lines]


@pytest.fixture(scope="session")
def corpora() -> Path:
    if not CORPORA.is_dir():
        pytest.fail(f"shared corpora not found at {CORPORA}: clone with ../shared beside the checkout")
    return CORPORA
