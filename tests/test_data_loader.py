"""TokenLoader on prepared real text: windows, doc ids, mixture shares, exact resume, world-size independence."""

import json
from functools import partial

import numpy as np
import pytest
import torch

from ondol.data.config import DataConfig
from ondol.data.loader import TokenLoader
from ondol.data.preparation import prepare
from ondol.data.shards import read_manifest, split_shards
from tests.test_data_prepare import corpus_source, small_tokenizer

SEQ = 64


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Three real sources of very different sizes (ko_docs is small, so it wraps many epochs)."""
    root = tmp_path_factory.mktemp("loader")
    tok = small_tokenizer(root / "tok")
    cfg = DataConfig(sources=[corpus_source("ko_reviews", 4000, weight=0.5), corpus_source("ko_docs", 4, weight=0.3),
                              corpus_source("en_docs", 3, weight=0.2)], val_fraction=0.1, shard_tokens=20_000)
    prepare(cfg, tok, root / "data", seed=0, progress=False)
    return root / "data", tok


def streams(data_dir, split):
    """Each source's tokens as bytes of int64 (all its shards), for finding a row's origin by search."""
    return {name: [np.asarray(s.tokens, dtype=np.int64).tobytes() for s in shards]
            for name, shards in split_shards(data_dir, split).items()}


def origin(row: torch.Tensor, source_streams: dict) -> set[str]:
    needle = row.numpy().astype(np.int64).tobytes()
    return {name for name, shards in source_streams.items()
            if any(_find_aligned(b, needle) for b in shards)}


def _find_aligned(haystack: bytes, needle: bytes) -> bool:
    i = haystack.find(needle)
    while i != -1 and i % 8:
        i = haystack.find(needle, i + 1)
    return i != -1


def batches(loader, n):
    return [next(loader) for _ in range(n)]


def test_rows_are_shard_windows_with_shifted_labels_and_doc_ids(prepared):
    data_dir, tok = prepared
    loader = TokenLoader(data_dir, "train", SEQ, 4, seed=1)
    source_streams = streams(data_dir, "train")
    for _ in range(10):
        batch = next(loader)
        assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == {
            k: (torch.int64, (4, SEQ)) for k in ("input_ids", "labels", "doc_ids")}
        for b in range(4):
            full = torch.cat([batch["input_ids"][b], batch["labels"][b, -1:]])
            assert torch.equal(batch["labels"][b, :-1], batch["input_ids"][b, 1:])
            assert origin(full, source_streams) == {loader.last_sources[b]}
            # independent doc ids: every document ends in eos, so a new one starts after each eos
            after_eos = torch.cat([torch.zeros(1, dtype=torch.int64),
                                   (batch["input_ids"][b, :-1] == tok.eos_id).long()])
            assert torch.equal(batch["doc_ids"][b], torch.cumsum(after_eos, 0))


def test_mixture_token_shares_match_weights(prepared):
    data_dir, _ = prepared
    for weights in (None, {"ko_reviews": 0.1, "ko_docs": 0.9}):
        loader = TokenLoader(data_dir, "train", SEQ, 8, seed=2, weights=weights)
        source_streams = streams(data_dir, "train")
        expected = weights or {"ko_reviews": 0.5, "ko_docs": 0.3, "en_docs": 0.2}
        tokens = dict.fromkeys(expected, 0)
        for _ in range(150):
            batch = next(loader)
            for b in range(8):
                (name,) = origin(torch.cat([batch["input_ids"][b], batch["labels"][b, -1:]]), source_streams)
                tokens[name] += len(batch["labels"][b])
        total = sum(tokens.values())
        for name, w in expected.items():
            assert abs(tokens[name] / total - w / sum(expected.values())) < 0.01, (name, tokens)


def test_each_epoch_visits_every_sequence_once_in_a_new_order(prepared):
    data_dir, _ = prepared
    loader = TokenLoader(data_dir, "train", SEQ, 1, seed=3, weights={"ko_docs": 1.0})
    shards = split_shards(data_dir, "train")["ko_docs"]
    windows = sorted(np.asarray(s.tokens[j * SEQ:j * SEQ + SEQ + 1], dtype=np.int64).tobytes()
                     for s in shards for j in range((len(s.tokens) - 1) // SEQ))
    epochs = []
    for _ in range(2):
        rows = [next(loader) for _ in windows]
        epochs.append([torch.cat([r["input_ids"][0], r["labels"][0, -1:]]).numpy().tobytes() for r in rows])
        assert sorted(epochs[-1]) == windows
    assert epochs[0] != epochs[1]


def test_resume_is_exact_mid_epoch_and_across_epoch_boundaries(prepared):
    data_dir, _ = prepared
    weights = {"ko_reviews": 0.2, "ko_docs": 0.8, "en_docs": 0.0}
    make = partial(TokenLoader, data_dir, "train", SEQ, 8, seed=4, weights=weights)
    reference = batches(make(), 100)
    assert 100 * 8 * 0.8 > 2 * make().sources[1].count  # ko_docs wraps into its third epoch
    for stop in (3, 37, 80):
        first = make()
        batches(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
        resumed = make()
        resumed.load_state_dict(state)
        for want, got in zip(reference[stop:], batches(resumed, 100 - stop)):
            for key in want:
                assert torch.equal(want[key], got[key])


def test_global_order_is_the_same_for_1_2_and_4_ranks_and_resumes_on_another_size(prepared):
    data_dir, _ = prepared
    B = 2

    def global_rows(world, steps, state=None):
        loaders = [TokenLoader(data_dir, "train", SEQ, B, rank=r, world_size=world, seed=5) for r in range(world)]
        for loader in loaders:
            if state:
                loader.load_state_dict(state)
        rows = []
        for _ in range(steps):
            for loader in loaders:  # rank r's k-th batch holds global rows [k*W*B + r*B, k*W*B + (r+1)*B)
                rows.extend(next(loader)["input_ids"])
        return rows, loaders[0].state_dict()

    one, _ = global_rows(1, 16)
    for world in (2, 4):
        rows, _ = global_rows(world, 16 // world)
        assert all(torch.equal(a, b) for a, b in zip(rows, one)) and len(rows) == len(one)
    head, state = global_rows(2, 3)  # 12 rows on 2 ranks, then resume on 4 ranks
    tail, _ = global_rows(4, 1, state)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, one[:20]))


def test_validation_order_is_fixed_and_sequential(prepared):
    data_dir, _ = prepared
    a = batches(TokenLoader(data_dir, "val", SEQ, 4, seed=1, weights={"ko_reviews": 1}), 5)
    b = batches(TokenLoader(data_dir, "val", SEQ, 4, seed=99, weights={"ko_reviews": 1}), 5)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    (shard, *_) = split_shards(data_dir, "val")["ko_reviews"]
    rows = torch.cat([x["input_ids"] for x in a])
    for j, row in enumerate(rows):
        assert row.tolist() == shard.tokens[j * SEQ:(j + 1) * SEQ].tolist()


def test_validation_leaves_out_sources_without_a_sequence_and_says_so(prepared, caplog):
    data_dir, _ = prepared
    val_tokens = {s["name"]: s["tokens"]["val"] for s in read_manifest(data_dir)["sources"]}
    short = sorted(name for name, n in val_tokens.items() if n < SEQ + 1)
    assert short, "the fixture should hold a source too small for a validation sequence"
    loader = TokenLoader(data_dir, "val", SEQ, 2)
    assert sorted(loader.weights) == sorted(set(val_tokens) - set(short))
    assert f"no val sequences of {SEQ + 1} tokens in {', '.join(n for n in val_tokens if n in short)}" in caplog.text


def test_loader_errors_are_clear(prepared, tmp_path):
    data_dir, _ = prepared
    with pytest.raises(FileNotFoundError, match="no manifest.json in .*: run `ondol data prepare CONFIG`"):
        TokenLoader(tmp_path, "train", SEQ, 2)
    with pytest.raises(ValueError, match=r"weights name unknown sources \['ko_review'\]"):
        TokenLoader(data_dir, "train", SEQ, 2, weights={"ko_review": 1.0})
    with pytest.raises(ValueError, match="no train sequences of 100001 tokens in source"):
        TokenLoader(data_dir, "train", 100_000, 2)
    with pytest.raises(ValueError, match="each share must be at least 1/10000"):
        TokenLoader(data_dir, "train", SEQ, 2, weights={"ko_reviews": 1.0, "ko_docs": 1e-6})
    loader = TokenLoader(data_dir, "train", SEQ, 2, seed=1)
    with pytest.raises(ValueError, match="saved with seq_len=128 but this loader has seq_len=64"):
        loader.load_state_dict({**loader.state_dict(), "seq_len": 128})
    with pytest.raises(ValueError, match="rank 2 must lie in"):
        TokenLoader(data_dir, "train", SEQ, 2, rank=2, world_size=2)


# ---- phases: the mixture and sequence length switch at a global index ---------------------------------------
def _rows(loader, n):
    """The next n global sequences of a one-rank loader: (source, input_ids + last label) each."""
    out = []
    while len(out) < n:
        batch = next(loader)
        out += [(name, torch.cat([batch["input_ids"][b], batch["labels"][b, -1:]]))
                for b, name in enumerate(loader.last_sources)]
    return out


def test_the_mixture_switches_at_the_exact_index_to_the_declared_shares(prepared):
    """Phase 1 mixes ko_reviews 1 : ko_docs 3, phase 2 (from global sequence 400 = step 50 of 8 sequences) brings
    en_docs in and drops ko_docs. The smooth round robin repeats every 4 (then 2) sequences, so every block of
    them holds exactly the declared shares; each row's source is checked against the text it came from."""
    from ondol.data.loader import MixPhase

    data_dir, _ = prepared
    k = 400
    loader = TokenLoader(data_dir, "train", SEQ, 8, seed=6, phases=[
        MixPhase(0, {"ko_reviews": 1, "ko_docs": 3}, SEQ), MixPhase(k, {"ko_reviews": 1, "en_docs": 1}, SEQ)])
    rows = _rows(loader, 2 * k)
    source_streams = streams(data_dir, "train")
    for name, row in rows[k - 16:k + 16]:  # the labels around the switch are where the text comes from
        assert origin(row, source_streams) == {name}
    for start in range(0, k, 4):
        block = [name for name, _ in rows[start:start + 4]]
        assert sorted(block) == ["ko_docs", "ko_docs", "ko_docs", "ko_reviews"], start
    for start in range(k, 2 * k, 2):
        assert sorted(name for name, _ in rows[start:start + 2]) == ["en_docs", "ko_reviews"], start
    assert loader.realised_shares() == (1, {"ko_reviews": 0.5, "en_docs": 0.5})


def test_a_sources_draws_continue_across_phases_and_across_a_seq_len_change(prepared):
    """ko_reviews' rows of a phased run are those a ko_reviews-only loader draws, in order: its draws in phase 2
    follow its draws in phase 1; at twice the length they continue at the same place of its tokens, draw
    ceil(D * 64 / 128) of the 128-token windows."""
    from ondol.data.loader import MixPhase

    data_dir, _ = prepared
    phases = [MixPhase(0, {"ko_reviews": 1, "ko_docs": 1}, SEQ), MixPhase(96, {"ko_reviews": 3, "en_docs": 1}, SEQ),
              MixPhase(192, {"ko_reviews": 1}, 2 * SEQ)]
    rows = _rows(TokenLoader(data_dir, "train", SEQ, 8, seed=7, phases=phases), 256)
    alone = _rows(TokenLoader(data_dir, "train", SEQ, 8, seed=7, weights={"ko_reviews": 1}), 256)
    short = [row for name, row in rows[:192] if name == "ko_reviews"]
    assert len(short) == 48 + 72
    assert all(torch.equal(a, b) for a, (_, b) in zip(short, alone))
    long_alone = _rows(TokenLoader(data_dir, "train", 2 * SEQ, 8, seed=7, weights={"ko_reviews": 1}), 128)
    first = -(-len(short) * SEQ // (2 * SEQ))  # 60
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rows[192:], long_alone[first:first + 64]))
    assert rows[192][1].shape == (2 * SEQ + 1,) and rows[191][1].shape == (SEQ + 1,)


def test_a_phased_loader_resumes_exactly_at_and_around_a_switch_and_may_change_only_the_future(prepared):
    from ondol.data.loader import MixPhase

    data_dir, _ = prepared
    phases = [MixPhase(0, {"ko_reviews": 0.2, "ko_docs": 0.8}, SEQ), MixPhase(80, {"en_docs": 1, "ko_docs": 1}, 32)]
    make = partial(TokenLoader, data_dir, "train", SEQ, 8, seed=8, phases=phases)
    reference = batches(make(), 20)
    for stop in (9, 10, 11):  # the switch is at batch 10
        first = make()
        batches(first, stop)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        for want, got in zip(reference[stop:], batches(resumed, 20 - stop)):
            assert all(torch.equal(want[key], got[key]) for key in want)
    first = make()
    batches(first, 10)
    state = first.state_dict()
    later = TokenLoader(data_dir, "train", SEQ, 8, seed=8, phases=[phases[0], MixPhase(120, {"en_docs": 1}, 32)])
    later.load_state_dict(state)  # the second phase had not begun: it may move and change
    assert later.seq_len == SEQ and next(later)["input_ids"].shape == (8, SEQ)
    batches(first, 1)
    with pytest.raises(ValueError, match="saved with phases .* before position 88"):
        later.load_state_dict(first.state_dict())
