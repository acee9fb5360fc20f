"""`ondol eval`: bits per byte per source, checked against a naive scorer and against transformers on the
exported model; bad input is one line."""

from __future__ import annotations

import gzip
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml

from ondol.launch.cli import main
from ondol.model.config import load_preset
from ondol.model.transformer import Transformer
from ondol.train.evaluation import token_logprobs, windows
from tests.conftest import corpus_texts


def ondol_eval(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["eval", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("length,first", [(5, 1), (65, 1), (66, 1), (300, 1), (300, 120), (40, 39)])
def test_windows_score_every_position_once_with_at_least_context_minus_stride(length, first):
    context, stride = 64, 32
    scored = []
    for start, end, score_from in windows(length, first, context, stride):
        assert end - 1 - start <= context and start <= score_from - 1
        scored += range(score_from, end)
        assert all(p - start >= min(p, context - stride) for p in range(score_from, end))
    assert scored == list(range(first, length))


def test_batched_scoring_equals_one_forward_per_window():
    """Right-padded batches of windows give each sequence the log-likelihood of a plain loop of forwards."""
    torch.manual_seed(0)
    model = Transformer(load_preset("tiny", vocab_size=300, moe_dispatch="loop")).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    seqs = [(torch.randint(0, 300, (n,), generator=g).tolist(), first) for n, first in
            ((3, 1), (40, 1), (64, 1), (65, 1), (150, 1), (150, 100), (20, 15))]
    got = token_logprobs(model, seqs, context=64, stride=24, batch_tokens=200)
    for (ids, first), s in zip(seqs, got):
        want = 0.0
        for start, end, score_from in windows(len(ids), first, 64, 24):
            logp = F.log_softmax(model(torch.tensor([ids[start:end - 1]])).logits[0].double(), -1)
            want += sum(float(logp[p - start - 1, ids[p]]) for p in range(score_from, end))
        assert s.logprob == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert s.tokens == len(ids) - first


def test_bits_per_byte_matches_transformers_on_the_exported_model(eval_run, tmp_path, capsys):
    """Reviews and two encyclopedia documents longer than the context, scored by transformers (its own tokenizer
    and the model from `ondol export hf`) in windows of 64 tokens advancing by 32, against `ondol eval --data`
    per file and overall: within 0.5% (fp32: far closer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    docs = [d for d in corpus_texts("ko_docs", 40, skip=900) if 300 <= len(d) <= 600][:2]
    files = {"reviews": corpus_texts("ko_reviews", 12, skip=50_000), "docs": docs}
    args = []
    for name, texts in files.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                                        for t in texts), encoding="utf-8")
        args += ["--data", tmp_path / f"{name}.jsonl"]
    assert ondol_eval(capsys, eval_run, *args, "--json", tmp_path / "eval.json")[0] == 0
    result = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["sources"]
    assert main(["export", "hf", str(eval_run), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    bits, nbytes = {}, {}
    for name, texts in files.items():
        bits[name] = nbytes[name] = 0.0
        for text in texts:
            ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
            done = 1
            for end in (65, *range(65 + 32, len(ids) + 32, 32)):
                end = min(end, len(ids))
                if end <= done:
                    break
                start = max(0, end - 65)
                with torch.no_grad():
                    logp = F.log_softmax(hf(torch.tensor([ids[start:end - 1]])).logits[0].double(), -1)
                bits[name] -= sum(float(logp[p - start - 1, ids[p]]) for p in range(done, end)) / math.log(2)
                done = end
            nbytes[name] += len(text.encode("utf-8"))
    assert len(tok(docs[0], add_special_tokens=False)["input_ids"]) > 2 * 64  # several windows
    for name in files:
        assert result[name]["bytes"] == nbytes[name]
        assert result[name]["bits_per_byte"] == pytest.approx(bits[name] / nbytes[name], rel=5e-3)
    total = sum(bits.values()) / sum(nbytes.values())
    assert result["all"]["bits_per_byte"] == pytest.approx(total, rel=5e-3)


def test_a_checkpoint_scores_like_the_final_weights_it_equals(eval_run, tmp_path, capsys):
    """The last checkpoint (DeepSpeed's model states) holds the weights of RUN_DIR/model (safetensors)."""
    corpus = tmp_path / "reviews.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                              for t in corpus_texts("ko_reviews", 20, skip=50_000)), encoding="utf-8")
    a = ondol_eval(capsys, eval_run, "--data", corpus, "--json", tmp_path / "a.json")
    b = ondol_eval(capsys, eval_run, "--data", corpus, "--checkpoint", "step_4", "--json", tmp_path / "b.json")
    c = ondol_eval(capsys, eval_run, "--data", corpus, "--checkpoint", "step_2", "--json", tmp_path / "c.json")
    assert a[0] == b[0] == c[0] == 0 and "reviews" in a[1] and "bits/byte" in a[1]
    rows = [json.loads((tmp_path / f"{k}.json").read_text())["sources"]["reviews"] for k in "abc"]
    assert rows[0]["documents"] == 20
    assert rows[0]["bits_per_byte"] == pytest.approx(rows[1]["bits_per_byte"], rel=1e-6)
    assert rows[0]["bits_per_byte"] != pytest.approx(rows[2]["bits_per_byte"], rel=1e-4)


def _edit_config(run, **top_level) -> None:
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **top_level}, allow_unicode=True))


def test_a_copied_run_reads_only_its_own_folder(eval_run, tmp_path, capsys, monkeypatch):
    """eval, generate and export hf take the RUN_DIR given as the run: a copy whose config.yaml records the
    original's folder (or a relative run_dir), its original deleted, run from another folder, scores and
    continues exactly as the run it was copied from."""
    corpus = tmp_path / "reviews.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                              for t in corpus_texts("ko_reviews", 20, skip=50_000)), encoding="utf-8")
    assert ondol_eval(capsys, eval_run, "--data", corpus, "--json", tmp_path / "reference.json")[0] == 0
    assert main(["generate", str(eval_run), "generate.max_new_tokens=8"]) == 0
    continuation = capsys.readouterr().out
    original, moved, elsewhere = tmp_path / "original", tmp_path / "moved", tmp_path / "elsewhere"
    shutil.copytree(eval_run, original)  # the data symlink is copied as a folder: the run holds everything
    _edit_config(original, run_dir=str(original), tokenizer={"path": str(original / "tokenizer")})
    shutil.copytree(original, moved)
    shutil.rmtree(original)
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    assert ondol_eval(capsys, moved, "--data", corpus, "--json", tmp_path / "moved.json")[0] == 0
    scores = [json.loads((tmp_path / f"{k}.json").read_text())["sources"]["reviews"] for k in ("reference", "moved")]
    assert scores[0] == scores[1]
    assert main(["generate", str(moved), "generate.max_new_tokens=8"]) == 0
    assert capsys.readouterr().out == continuation
    assert main(["export", "hf", str(moved), str(tmp_path / "hf")]) == 0
    assert f"exported {moved} ->" in capsys.readouterr().out
    _edit_config(moved, run_dir="runs/tiny-ko")
    assert main(["generate", str(moved), "generate.max_new_tokens=8"]) == 0
    assert capsys.readouterr().out == continuation
    assert main(["generate", str(eval_run / "config.yaml"), "generate.max_new_tokens=8"]) == 0  # a config file
    assert capsys.readouterr().out == continuation

    manifest = json.loads((moved / "data" / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0123456789abcdef"  # data prepared with another tokenizer
    (moved / "data" / "manifest.json").write_text(json.dumps(manifest))
    rc, _, err = ondol_eval(capsys, moved, "--data", corpus)
    assert rc == 3 and "was prepared with tokenizer 0123456789abcdef" in err and len(err.splitlines()) == 1, err


def test_bad_input_is_one_line(eval_run, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl.gz"
    with gzip.open(empty, "wt", encoding="utf-8"):
        pass
    cases = [(("--checkpoint", "step_3"), "step_00000003", 2), (("--data", tmp_path / "missing.jsonl"), "missing.jsonl", 3),
             (("--data", empty), "no documents", 3), (("--checkpoint", "latest"), "step_N", 2)]
    for args, needle, code in cases:
        rc, _, err = ondol_eval(capsys, eval_run, *args)
        assert rc == code and needle in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = ondol_eval(capsys, tmp_path / "nowhere")
    assert rc == 2 and "config.yaml" in err and len(err.strip().splitlines()) == 1


def test_in_loop_bits_per_byte_is_logged_per_source_and_equals_ondol_eval(eval_run, tmp_path, capsys):
    """metrics.jsonl has bits per byte per source at every evaluation; at the last step it equals `ondol eval` of
    the final weights on the same held-out documents (all of ko_reviews' validation text fits the budget)."""
    from ondol.train.metrics import read_metrics

    evals = [r for r in read_metrics(eval_run / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all({"bpb/ko_reviews", "bpb/ko_docs", "bpb/all"} <= set(r) for r in evals)
    assert evals[-1]["bpb/all"] < evals[0]["bpb/all"]
    assert ondol_eval(capsys, eval_run, "--json", tmp_path / "eval.json")[0] == 0
    reviews = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["sources"]["ko_reviews"]
    assert evals[-1]["bpb/ko_reviews"] == pytest.approx(reviews["bits_per_byte"], rel=1e-5)
    assert (eval_run / "loss.png").stat().st_size > 0


def test_data_is_streamed_with_max_docs_and_max_bytes_caps(eval_run, tmp_path, capsys):
    """--max-docs and --max-bytes score exactly the first documents of a file (the reference: those documents
    written to a file of their own, scored whole), reading the 617,741-document corpus only as far as needed."""
    from tests.conftest import CORPORA

    texts = corpus_texts("ko_reviews", 40)
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    corpus = CORPORA / "ko_reviews.jsonl.gz"
    assert ondol_eval(capsys, eval_run, "--data", first, "--json", tmp_path / "reference.json")[0] == 0
    assert ondol_eval(capsys, eval_run, "--data", corpus, "--max-docs", "40", "--json", tmp_path / "docs.json")[0] == 0
    reference = json.loads((tmp_path / "reference.json").read_text())["sources"]["first"]
    capped = json.loads((tmp_path / "docs.json").read_text())["sources"]["ko_reviews"]
    assert capped == reference and capped["documents"] == 40

    budget = sum(len(t.encode("utf-8")) for t in texts[:17]) - 1  # reached by the 17th document
    assert ondol_eval(capsys, eval_run, "--data", corpus, "--max-bytes", str(budget), "--json",
                      tmp_path / "bytes.json")[0] == 0
    capped = json.loads((tmp_path / "bytes.json").read_text())["sources"]["ko_reviews"]
    assert capped["documents"] == 17 and capped["bytes"] == budget + 1
    with pytest.raises(SystemExit) as stop:
        main(["eval", str(eval_run), "--data", str(corpus), "--max-docs", "0"])
    assert stop.value.code == 2 and "--max-docs: must be a whole number >= 1, not '0'" in capsys.readouterr().err


def test_streamed_scoring_holds_one_chunk_of_documents_at_a_time(eval_run):
    from ondol.tokenizer.tokenizer import Tokenizer
    from ondol.train.evaluation import bits_per_byte, load_model, streamed_bits_per_byte

    model, tok = load_model(eval_run), Tokenizer.load(eval_run / "tokenizer")
    texts = corpus_texts("ko_reviews", 50, skip=100)
    pulled, seen = [], []

    def documents():
        for t in texts:
            pulled.append(t)
            yield "ko_reviews", t

    rows = streamed_bits_per_byte(model, tok, documents(), 64, True, chunk_docs=16,
                                  progress=lambda n: seen.append((n, len(pulled))))
    assert seen == [(16, 16), (16, 32), (16, 48), (2, 50)]  # never more than a chunk read ahead of scoring
    whole = bits_per_byte(model, tok, {"ko_reviews": texts}, 64, True)
    assert rows["ko_reviews"]["documents"] == 50
    assert rows["ko_reviews"]["bits_per_byte"] == pytest.approx(whole["ko_reviews"]["bits_per_byte"], rel=1e-5)
