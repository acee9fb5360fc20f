"""`ondol eval --tasks` through lm-evaluation-harness on local task files, scored against a hand computation.

The items are in KoBEST's COPA and HellaSwag formats, built for these tests from real Korean sentences of
../shared/corpora (premises, contexts and choices are corpus reviews; only the field names and COPA's fixed
question words 원인/결과 come from the task format). A tiny model is near chance; the test checks the scoring.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install 'ondol[eval]')")

from ondol.launch.cli import main
from ondol.train.evaluation import document_start, load_model
from tests.conftest import corpus_texts

SENTENCES = [t for t in corpus_texts("ko_reviews", 400, skip=55_000) if 10 <= len(t) <= 60][:30]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def copa_items() -> list[dict]:
    s = SENTENCES
    return [{"premise": s[3 * i], "question": "원인" if i % 2 else "결과", "alternative_1": s[3 * i + 1],
             "alternative_2": s[3 * i + 2], "label": i % 2} for i in range(6)]


def hellaswag_items() -> list[dict]:
    s = SENTENCES[18:]
    return [{"context": s[6 * i], **{f"ending_{k}": s[6 * i + k] for k in range(1, 5)}, "label": i % 4}
            for i in range(2)]


def hand_loglikelihood(model, tok, start: int, context: str, continuation: str) -> float:
    """log p(continuation | context) by one forward of the whole text: the continuation's tokens are those of
    the joined text past the context's own tokens (lm-eval's split for causal models)."""
    whole = [start, *tok.encode(context + continuation)]
    n = 1 + len(tok.encode(context))
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    return sum(float(logp[p - 1, whole[p]]) for p in range(n, len(whole)))


def test_local_copa_and_hellaswag_match_a_hand_computation(eval_run, tmp_path, capsys):
    from ondol.configs import load_config, tokenizer_dir
    from ondol.tokenizer.tokenizer import Tokenizer

    copa = write_jsonl(tmp_path / "copa.jsonl", copa_items())
    hella = write_jsonl(tmp_path / "hella.jsonl", hellaswag_items())
    rc = main(["eval", str(eval_run), "--tasks", "kobest_copa,kobest_hellaswag", "--task-data",
               f"kobest_copa={copa}", "--task-data", f"kobest_hellaswag={hella}", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    tasks = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["tasks"]

    cfg = load_config(eval_run / "config.yaml")
    tok = Tokenizer.load(tokenizer_dir(cfg))
    model, start = load_model(eval_run), document_start(tok, cfg.data.bos)
    connector = {"원인": " 왜냐하면", "결과": " 그래서"}  # KoBEST COPA's prompt (lm-eval's kobest/utils.py)
    right = []
    for item in copa_items():
        context = f"{item['premise']} {connector[item['question']]}"
        scores = [hand_loglikelihood(model, tok, start, context, " " + item[f"alternative_{k}"]) for k in (1, 2)]
        right.append(scores.index(max(scores)) == item["label"])
    assert tasks["kobest_copa"]["acc"] == pytest.approx(sum(right) / len(right))

    right, right_norm = [], []
    for item in hellaswag_items():
        endings = [item[f"ending_{k}"] for k in range(1, 5)]
        scores = [hand_loglikelihood(model, tok, start, f"문장: {item['context']}", " " + e) for e in endings]
        norm = [s / len(e) for s, e in zip(scores, endings)]  # lm-eval: per character of the choice
        right.append(scores.index(max(scores)) == item["label"])
        right_norm.append(norm.index(max(norm)) == item["label"])
    assert tasks["kobest_hellaswag"]["acc"] == pytest.approx(sum(right) / len(right))
    assert tasks["kobest_hellaswag"]["acc_norm"] == pytest.approx(sum(right_norm) / len(right_norm))


def test_bad_task_input_is_one_line(eval_run, tmp_path, capsys):
    copa = write_jsonl(tmp_path / "copa.jsonl", copa_items())
    cases = [(["--tasks", "kobest_copa", "--task-data", f"kobest_copa={tmp_path / 'none.jsonl'}"], "none.jsonl"),
             (["--tasks", "kobest_nosuch", "--task-data", f"kobest_nosuch={copa}"], "kobest_nosuch"),
             (["--tasks", "kobest_copa", "--task-data", "kobest_copa"], "TASK=FILE")]
    for args, needle in cases:
        rc = main(["eval", str(eval_run), *args])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
