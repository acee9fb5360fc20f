"""Supervised fine-tuning on chat data: chat sources prepared with a loss mask, whole conversations packed with
document masking, the loss on assistant tokens only, and `train.init_from` starting from a pretrained run.

Real text only: ko_chat question/answer pairs (MIT), chained into multi-turn conversations where a test needs
them; the pretrained run is the session's `eval_run` (a 4-step run on the golden assets)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from golden import tiny_config

from ondol.data.chat import END_OF_TURN, chat_ids
from ondol.data.config import SourceConfig
from ondol.data.loader import IGNORE, TokenLoader
from ondol.data.preparation import prepare
from ondol.data.shards import read_manifest
from ondol.data.sources import BadInputError
from ondol.launch.cli import main
from ondol.model.config import load_preset
from ondol.model.transformer import Transformer
from ondol.tokenizer.tokenizer import Tokenizer
from ondol.train.metrics import read_metrics
from tests.conftest import CORPORA, chat_conversations, corpus_texts


def chat_config(run: Path, eval_run: Path, *overrides: str, source: SourceConfig | None = None):
    cfg = tiny_config(run, eval_run.parent, f"tokenizer.path={eval_run / 'tokenizer'}", "train.eval_bpb_tokens=0",
                      *overrides)
    cfg.data.sources = [source or SourceConfig(name="ko_chat", path=str(CORPORA / "ko_chat.jsonl.gz"),
                                               format="chat", max_docs=600)]
    return cfg


def prepared(cfg, eval_run: Path) -> dict:
    return prepare(cfg.data, Tokenizer.load(eval_run / "tokenizer"), Path(cfg.run_dir) / "data", cfg.seed,
                   progress=False)


def assistant_targets(ids: list[int], roles: dict[str, int]) -> list[bool]:
    """Whether each token is one an assistant turn produces (its content and end of turn), found by reading the
    role tokens: the reference the stored mask is checked against."""
    inside, out = False, []
    for i in ids:
        out.append(inside)
        if i == roles["assistant"]:
            inside = True
        elif i == roles[END_OF_TURN]:
            inside = False
    return out


def test_bad_chat_lines_are_counted_by_file_and_line(tmp_path, eval_run):
    good = chat_conversations(3, skip=20)
    lines = [json.dumps({"messages": m}, ensure_ascii=False) for m in good]
    lines += [json.dumps({"text": good[0][0]["content"]}, ensure_ascii=False),  # 4: no messages
              json.dumps({"messages": [{"role": "tool", "content": "x"}, *good[1]]}),  # 5: unknown role
              json.dumps({"messages": [{"role": "user", "content": ["x"]}, good[2][1]]}),  # 6: content a list
              '{"messages": [',  # 7: not JSON
              json.dumps({"messages": good[0][:1]}, ensure_ascii=False)]  # 8: nothing to train on
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = chat_config(tmp_path / "run", eval_run, "data.val_fraction=0",
                      source=SourceConfig(name="chat", path=str(path)))  # format auto: a `messages` list, no text
    manifest = prepared(cfg, eval_run)
    (source,) = manifest["sources"]
    assert source["bad_input"] == {"missing_messages": 1, "unknown_role": 1, "content_not_string": 1,
                                   "malformed_json": 1, "no_assistant_message": 1}
    assert source["chat"]["train"]["conversations"] == 3 == source["read"]
    assert source["bad_input_examples"]["unknown_role"] == [
        f"{path}:5: unknown role: message 1 has role 'tool': use system | user | assistant"]
    assert source["bad_input_examples"]["content_not_string"] == [
        f"{path}:6: content not string: message 1 (user) has content of type list, not a string"]
    cfg.data.strict = True
    with pytest.raises(BadInputError, match=f"^{path}:4: missing messages: no field 'messages'"):
        prepare(cfg.data, Tokenizer.load(eval_run / "tokenizer"), tmp_path / "strict", cfg.seed, progress=False)


def test_manifest_counts_and_loader_rows_of_whole_conversations(tmp_path, eval_run):
    """Counts against the tokenizer's own encoding of the raw pairs; every loader row is whole conversations then
    padding, labelled only on assistant tokens, and the conversations that do not fit are the ones counted."""
    tok = Tokenizer.load(eval_run / "tokenizer")
    seq_len = 24
    cfg = chat_config(tmp_path / "run", eval_run, f"data.seq_len={seq_len}")
    source = prepared(cfg, eval_run)["sources"][0]
    pairs = chat_conversations(600)
    lengths = [2 + sum(2 + len(tok.encode(m["content"])) for m in conv) for conv in pairs]  # bos ... eos
    produced = sum(len(tok.encode(conv[1]["content"])) + 1 for conv in pairs)
    counts = source["chat"]
    assert sum(counts[s]["conversations"] for s in counts) == 600 == source["read"]
    assert sum(counts[s]["assistant_tokens"] for s in counts) == produced
    assert sum(counts[s]["masked_tokens"] for s in counts) == sum(lengths) - produced
    too_long = sum(n > seq_len + 1 for n in lengths)
    assert sum(counts[s]["too_long"] for s in counts) == too_long > 0

    roles = chat_ids(tok)
    loader = TokenLoader(tmp_path / "run" / "data", "train", seq_len, micro_batch_size=1, seed=1)
    assert loader.sources[0].too_long == counts["train"]["too_long"]
    seen = []
    for _ in range(loader.sources[0].count):
        batch = next(loader)
        ids, labels, docs = (batch[k][0].tolist() for k in ("input_ids", "labels", "doc_ids"))
        targets = assistant_targets(ids + [0], roles)[1:]  # token t + 1 is what label t predicts
        assert [label != IGNORE for label in labels] == targets
        assert all(label == ids[t + 1] for t, label in enumerate(labels[:-1]) if label != IGNORE)
        starts = [i for i, t in enumerate(ids) if t == tok.bos_id]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:] + [None]):
            end = ids.index(tok.eos_id, a) + 1 if tok.eos_id in ids[a:] else seq_len + 1  # eos last: a label
            assert b is None or end == b  # whole conversations, back to back
            seen.append(end - a)
            assert len(set(docs[a:end])) == 1 and docs[a] not in docs[:a]  # its own document
        padding = docs[starts[-1] + seen[-1]:]
        assert not set(padding) & set(docs[:starts[-1] + seen[-1]])  # padding is a document of its own
        assert all(label == IGNORE for label in labels[starts[-1] + seen[-1] - 1:])
    assert len(seen) == counts["train"]["conversations"] - counts["train"]["too_long"]
    assert max(seen) <= seq_len + 1 and set(seen) <= {n for n in lengths if n <= seq_len + 1}


def test_packed_sft_loss_is_the_mean_over_assistant_tokens_of_each_conversation_alone(tmp_path, eval_run):
    """The training loss of packed rows of multi-turn conversations (full and chunked loss) against a hand
    computation: each conversation run through the model by itself, -log p summed over its assistant tokens
    (found from the role tokens), divided by their number. Equal only if labels are masked to assistant tokens, padding is left out and document
    masking keeps packed conversations apart. Tolerance: fp32 rounding (RoPE angles at other absolute positions,
    other summation orders), about 1e-6 relative; 1e-5 leaves room."""
    tok = Tokenizer.load(eval_run / "tokenizer")
    roles = chat_ids(tok)
    seq_len = 128
    conversations = chat_conversations(120, turns=2)  # real pairs chained into two-turn conversations
    conversations[0].insert(0, {"role": "system", "content": corpus_texts("ko_mixed", 1, skip=40)[0]})
    path = tmp_path / "multi_turn.jsonl"
    path.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations))
    cfg = chat_config(tmp_path / "run", eval_run, f"data.seq_len={seq_len}", "data.val_fraction=0",
                      source=SourceConfig(name="chat", path=str(path), format="chat"))
    prepared(cfg, eval_run)
    loader = TokenLoader(tmp_path / "run" / "data", "train", seq_len, micro_batch_size=4, seed=3)
    batch = next(loader)
    torch.manual_seed(0)
    model = Transformer(load_preset("tiny", vocab_size=tok.vocab_size, moe_dispatch="loop")).eval()
    with torch.no_grad():
        full = model(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"]).loss
        chunked = model(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"], loss_chunk=48).loss
        total, count, conversations = 0.0, 0, 0
        for row, last in zip(batch["input_ids"].tolist(), batch["labels"][:, -1].tolist()):
            row = row + [last if last != IGNORE else tok.eos_id]
            starts = [i for i, t in enumerate(row) if t == tok.bos_id]
            for s in starts:
                conv = row[s:row.index(tok.eos_id, s) + 1]
                logp = torch.log_softmax(model(torch.tensor([conv[:-1]])).logits[0].double(), -1)
                targets = assistant_targets(conv, roles)[1:]
                picked = [logp[i, t] for i, (t, on) in enumerate(zip(conv[1:], targets)) if on]
                total, count, conversations = total - float(sum(picked)), count + len(picked), conversations + 1
    assert conversations > 4  # rows hold several conversations each
    assert sum(row.count(roles["assistant"]) for row in batch["input_ids"].tolist()) > conversations  # multi-turn
    assert full.item() == pytest.approx(total / count, rel=1e-5)
    assert chunked.item() == pytest.approx(total / count, rel=1e-5)


def test_sft_run_starts_from_the_pretrained_weights_and_answers_through_the_template(tmp_path, eval_run, capsys):
    """`train.init_from` = the pretrained run: the SFT run's step-0 validation loss is the pretrained model's on
    the same held-out conversations (assistant tokens only), training lowers it, `ondol generate --chat` answers
    a held-out question, and the exported folder gives the same greedy answer in transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ondol.model.io import load_pretrained
    from ondol.train.trainer import Trainer

    run = tmp_path / "sft"
    cfg = chat_config(run, eval_run, f"train.init_from={eval_run}", "train.steps=4", "train.eval_every=4",
                      "train.eval_batches=2", "optim.lr=1e-3", "optim.warmup_steps=0")
    prepared(cfg, eval_run)
    Trainer(cfg).fit()
    val = [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    pretrained = load_pretrained(eval_run / "model")
    loader = TokenLoader(run / "data", "val", cfg.data.seq_len, cfg.train.micro_batch_size, seed=cfg.seed)
    with torch.no_grad():
        expected = sum(pretrained(**next(loader)).loss.item() for _ in range(2)) / 2
    assert val[0] == pytest.approx(expected, rel=1e-6)
    assert val[-1] < val[0]

    question = chat_conversations(1, skip=11_000)[0][0]["content"]  # beyond the 600 pairs prepared
    assert main(["generate", str(run), "--chat", "--prompt", question, "generate.max_new_tokens=6",
                 "generate.min_new_tokens=0"]) == 0
    answer = capsys.readouterr().out.split("continuation: ", 1)[1].removesuffix("\n")
    assert main(["export", "hf", str(run), str(tmp_path / "hf")]) == 0
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = Tokenizer.load(eval_run / "tokenizer")
    assert hf_model.generation_config.eos_token_id == [tok.eos_id, tok.token_to_id(END_OF_TURN)]
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = hf_model.generate(**prompt, max_new_tokens=6, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert tok.decode(out.tolist()) == answer


def test_init_from_refuses_weights_trained_with_another_tokenizer(tmp_path, eval_run, capsys):
    other = tmp_path / "other"
    shutil.copytree(eval_run / "model", other / "model")
    (other / "data").mkdir()
    manifest = read_manifest(eval_run / "data")
    manifest["tokenizer"]["fingerprint"] = "0123456789abcdef"
    (other / "data" / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "sft"
    cfg = chat_config(run, eval_run)
    prepared(cfg, eval_run)
    config = tmp_path / "sft.yaml"
    config.write_text(f"defaults: [model/tiny.yaml]\nrun_dir: {run}\ntokenizer: {{path: {eval_run / 'tokenizer'}}}\n"
                      f"data: {{seq_len: 64}}\ntrain: {{init_from: {other}, steps: 1, cpu_threads: 1}}\n")
    assert main(["train", str(config), "logging.progress=false"]) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"ondol: train error: train.init_from={other}: trained with tokenizer 0123456789abcdef, but this "
                       f"run's at {eval_run / 'tokenizer'} is {Tokenizer.load(eval_run / 'tokenizer').fingerprint}: "
                       f"set tokenizer.path={other / 'tokenizer'}")
