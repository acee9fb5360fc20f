"""`ondol export hf`: transformers loads the folder and computes Ondol's logits and greedy generations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ondol.data.chat import chat_template, encode_conversations
from ondol.data.config import SourceConfig
from ondol.launch.cli import main
from ondol.model.config import load_preset
from ondol.model.generate import generate
from ondol.model.io import save_pretrained
from ondol.model.transformer import Transformer
from ondol.tokenizer.config import TokenizerConfig
from ondol.tokenizer.tokenizer import Tokenizer
from ondol.tokenizer.train import train_tokenizer
from tests.conftest import CORPORA, chat_conversations, corpus_texts


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    cfg = TokenizerConfig(vocab_size=3456, max_sentences=3000)
    source = SourceConfig(name="ko_reviews", path=str(CORPORA / "ko_reviews.jsonl.gz"), max_docs=3000)
    train_tokenizer(cfg, [source], out, seed=0)
    return out


def make_run(tmp_path: Path, tokenizer_dir: Path, **overrides) -> tuple[Path, Transformer]:
    tok = Tokenizer.load(tokenizer_dir)
    cfg = load_preset("tiny", vocab_size=tok.vocab_size, **overrides)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # non-trivial norms and expert biases, so a wrong mapping cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
        for moe in model.moe_layers():
            moe.expert_bias.normal_(0, 0.02)
    run = tmp_path / "run"
    save_pretrained(model, cfg, run / "model")
    (run / "tokenizer").mkdir()
    for f in tokenizer_dir.iterdir():
        (run / "tokenizer" / f.name).write_bytes(f.read_bytes())
    return run, model.eval()


def cli_export(run: Path, out: Path) -> int:
    return main(["export", "hf", str(run), str(out)])


def korean_ids(tokenizer_dir: Path, n_tokens: int) -> list[int]:
    tok = Tokenizer.load(tokenizer_dir)
    text = " ".join(corpus_texts("ko_docs", 3, skip=10))
    ids = tok.encode(text)[:n_tokens]
    assert len(ids) == n_tokens
    return ids


VARIANTS = {
    "moe": ({}, "ExaoneMoeForCausalLM"),
    "dense_post_norm_tied": ({"n_experts": 0, "norm_placement": "post", "tie_embeddings": True}, "Exaone4ForCausalLM"),
    "dense_pre_norm": ({"n_experts": 0}, "ExaoneMoeForCausalLM"),
    "all_global_nope": ({"attn_pattern": "G", "routed_scaling": 2.5, "norm_topk": False}, "ExaoneMoeForCausalLM"),
    "all_global_rope_post_norm": ({"attn_pattern": "G", "rope_on_global": True, "n_experts": 0, "norm_placement": "post"},
                                  "Exaone4ForCausalLM"),
    "yarn_all_global_rope_post_norm": ({"attn_pattern": "G", "rope_on_global": True, "n_experts": 0,
                                        "norm_placement": "post", "rope_scaling": "yarn", "rope_factor": 4.0,
                                        "rope_original_max_seq_len": 256}, "Exaone4ForCausalLM"),
    "yarn_moe_sliding_rope": ({"rope_scaling": "yarn", "rope_factor": 8.0, "rope_original_max_seq_len": 128},
                              "ExaoneMoeForCausalLM"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_logits_match(tmp_path, tokenizer_dir, variant):
    overrides, arch = VARIANTS[variant]
    run, model = make_run(tmp_path, tokenizer_dir, **overrides)
    out = tmp_path / "hf"
    assert cli_export(run, out) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    ids = torch.tensor([korean_ids(tokenizer_dir, 150)])  # longer than the 64-token window
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-4)


def test_tokenizer_and_greedy_generation_match(tmp_path, tokenizer_dir):
    run, model = make_run(tmp_path, tokenizer_dir)
    out = tmp_path / "hf"
    assert cli_export(run, out) == 0
    text = corpus_texts("ko_reviews", 1, skip=5000)[0]
    tok = Tokenizer.load(tokenizer_dir)
    assert AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = korean_ids(tokenizer_dir, 56)  # 56 + 20 tokens cross the 64-token window
    with torch.no_grad():
        hf_new = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    assert generate(model, prompt, max_new_tokens=20) == hf_new


def test_mtp_is_left_out_with_a_note_and_transformers_has_no_mtp(tmp_path, tokenizer_dir, capsys):
    from safetensors.torch import load_file
    from transformers import ExaoneMoeConfig, ExaoneMoeForCausalLM

    # when transformers gains an MTP module, export should write it instead of leaving it out
    assert not hasattr(ExaoneMoeConfig(), "num_nextn_predict_layers")
    assert r"mtp.*" in ExaoneMoeForCausalLM._keys_to_ignore_on_load_unexpected
    run, model = make_run(tmp_path, tokenizer_dir, mtp_layers=1)
    out = tmp_path / "hf"
    assert cli_export(run, out) == 0
    assert "the 1 MTP depth(s) are not in" in capsys.readouterr().out
    assert not [k for k in load_file(out / "model.safetensors") if "mtp" in k]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([korean_ids(tokenizer_dir, 100)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("overrides,message", [
    ({"attn_sinks": True}, "model.attn_sinks=true"),
    ({"router_score": "softmax"}, "model.router_score=softmax"),
    ({"norm_placement": "post"}, "model.norm_placement=post with experts"),
    ({"rope_on_global": True}, "model.rope_on_global=true with sliding layers"),
    ({"rope_on_global": True, "attn_pattern": "G"}, "model.rope_on_global=true with pre-norm"),
])
def test_inexpressible_options_are_refused(tmp_path, tokenizer_dir, capsys, overrides, message):
    run, _ = make_run(tmp_path, tokenizer_dir, **overrides)
    assert cli_export(run, tmp_path / "hf") == 5
    assert message in capsys.readouterr().err
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_exported_tokenizer_adds_bos_and_carries_context_special_tokens_and_chat_template(tmp_path, tokenizer_dir,
                                                                                       capsys):
    run, model = make_run(tmp_path, tokenizer_dir)
    out = tmp_path / "hf"
    assert cli_export(run, out) == 0
    assert (f"export: {run / 'data'} has no manifest: the tokenizer adds bos as data.bos=True does by default\n"
            in capsys.readouterr().out)
    tok = Tokenizer.load(tokenizer_dir)
    hf_tok = AutoTokenizer.from_pretrained(out)
    prompt = " ".join(corpus_texts("ko_reviews", 1, skip=7000)[0].split()[:6])
    assert hf_tok(prompt)["input_ids"] == [tok.bos_id, *tok.encode(prompt)]  # bos, and no eos after a prompt
    assert hf_tok.model_max_length == model.cfg.max_seq_len
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token, hf_tok.unk_token) == (
        "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>")
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf_tok.chat_template == chat_template(bos=True)
    chat = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_dict=True)
    assert chat["input_ids"] == [tok.bos_id, tok.token_to_id("<|user|>"), *tok.encode(prompt),
                                 tok.token_to_id("<|end|>"), tok.token_to_id("<|assistant|>")]


def test_exported_chat_template_gives_ondols_ids_and_loss_mask_for_multi_turn_conversations(tmp_path,
                                                                                           tokenizer_dir):
    """transformers' apply_chat_template on the exported tokenizer against Ondol's encode_conversations (what
    `ondol data prepare` writes): the same ids, and its assistant-token mask is Ondol's loss mask. Real ko_chat
    pairs chained into 4-turn conversations, one opened by a real Korean sentence as the system message."""
    run, _ = make_run(tmp_path, tokenizer_dir)
    assert cli_export(run, tmp_path / "hf") == 0
    tok, hf_tok = Tokenizer.load(tokenizer_dir), AutoTokenizer.from_pretrained(tmp_path / "hf")
    conversations = chat_conversations(6, turns=4, skip=300)
    conversations[0].insert(0, {"role": "system", "content": corpus_texts("ko_mixed", 1, skip=40)[0]})
    for conv in conversations:
        pairs = [(m["role"], m["content"]) for m in conv]
        ids, mask = encode_conversations(tok, [pairs], bos=True)[0]
        prompt, _ = encode_conversations(tok, [pairs[:-1]], bos=True, generation_prompt=True)[0]
        hf = hf_tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert hf["input_ids"] == ids
        assert hf["assistant_masks"] == mask
        assert sum(mask) == sum(len(tok.encode(m["content"])) + 1 for m in conv if m["role"] == "assistant")
        assert hf_tok.apply_chat_template(conv[:-1], add_generation_prompt=True, return_dict=True)["input_ids"] \
            == prompt


def test_export_without_role_tokens_says_there_is_no_chat_template(tmp_path, tokenizer_dir, capsys):
    run, _ = make_run(tmp_path, tokenizer_dir)
    meta = json.loads((run / "tokenizer" / "meta.json").read_text())
    meta["special_tokens"].pop("<|system|>")  # as with tokenizer.special_tokens=[] (ids are unchanged here)
    (run / "tokenizer" / "meta.json").write_text(json.dumps(meta))
    assert cli_export(run, tmp_path / "hf") == 0
    out = capsys.readouterr().out
    assert ("export: no chat template: the tokenizer lacks the role token(s) <|system|> (tokenizer.special_tokens) "
            "that Ondol's template is written with\n") in out
    assert "chat_template" not in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
