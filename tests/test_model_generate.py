"""KV-cached generation and MTP (multi-token prediction) against uncached recomputation and hand-built references,
on a tiny model trained here for a few seconds on real Korean reviews (so that greedy rollouts are not
degenerate and the MTP drafter has learned something)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ondol.data.config import SourceConfig
from ondol.model.config import load_preset
from ondol.model.generate import generate
from ondol.model.transformer import Transformer
from ondol.tokenizer.config import TokenizerConfig
from ondol.tokenizer.tokenizer import Tokenizer
from ondol.tokenizer.train import train_tokenizer
from tests.conftest import CORPORA, corpus_texts

WINDOW = 16  # small, so that prompts plus continuations overflow the sliding window


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok")
    cfg = TokenizerConfig(vocab_size=2048, max_sentences=2000, hangul_coverage=False,
                          character_coverage=0.995)
    train_tokenizer(cfg, [SourceConfig(name="ko_reviews", path=str(CORPORA / "ko_reviews.jsonl.gz"),
                                       max_docs=2000)], out, seed=0)
    return Tokenizer.load(out)


def korean_rows(tok: Tokenizer, n_docs: int, skip: int, T: int) -> torch.Tensor:
    ids = [i for text in corpus_texts("ko_reviews", n_docs, skip=skip) for i in [tok.bos_id, *tok.encode(text)]]
    n = len(ids) // (T + 1)
    return torch.tensor(ids[: n * (T + 1)]).view(n, T + 1)


@pytest.fixture(scope="module")
def trained(tok) -> dict:
    """The tiny preset narrowed to d_model 64 with one MTP depth, 40 AdamW steps on 4 x 64 real tokens."""
    torch.manual_seed(0)
    cfg = load_preset("tiny", vocab_size=tok.vocab_size, window=WINDOW, mtp_layers=1, mtp_loss_weight=0.5,
                      d_model=64, n_heads=2, n_kv_heads=1, ffn_hidden=128, n_experts=4, expert_hidden=64,
                      moe_dispatch="loop")
    model = Transformer(cfg).train()
    rows = korean_rows(tok, 1500, 0, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, mtp = [], []
    for step in range(40):
        batch = rows[(step * 4) % (len(rows) - 4):][:4]
        out = model(batch[:, :-1], labels=batch[:, 1:])
        (out.loss + out.aux_loss + out.mtp_loss).backward()
        opt.step()
        opt.zero_grad()
        model.update_router_biases()
        losses.append(float(out.loss.detach()))
        mtp.append(float(out.metrics["mtp/loss"]))
    prompts = [[tok.bos_id, *tok.encode(" ".join(text.split()[:6]))]
               for text in corpus_texts("ko_reviews", 3, skip=5000)]
    return {"model": model.eval(), "losses": losses, "mtp": mtp, "prompts": prompts}


def test_mtp_training_lowers_both_losses(trained):
    first, last = sum(trained["losses"][:5]) / 5, sum(trained["losses"][-5:]) / 5
    mtp_first, mtp_last = sum(trained["mtp"][:5]) / 5, sum(trained["mtp"][-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert mtp_last < mtp_first - 0.5, (mtp_first, mtp_last)


def test_cached_generation_equals_uncached_on_korean_prompts(trained):
    model = trained["model"]
    for prompt in trained["prompts"]:
        stats = {}
        cached = generate(model, prompt, 48, stats=stats)
        assert cached == generate(model, prompt, 48, use_cache=False)
        assert len(prompt) + len(cached) > 2 * WINDOW and stats["forwards"] == 48
    # logits too: one prefill then one position at a time, against one full forward
    ids = torch.tensor([trained["prompts"][0] + cached])
    cache, _ = model.new_cache()
    with torch.no_grad():
        steps = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, i:i + 1], cache=cache).logits
                                                           for i in range(5, ids.shape[1])]
        torch.testing.assert_close(torch.cat(steps, 1), model(ids).logits, atol=1e-5, rtol=1e-5)
    kept = [layer.k.shape[2] for layer in cache.layers]
    assert kept == [WINDOW - 1 if kind == "L" else ids.shape[1] for kind in model.cfg.layer_kinds]


def test_static_cache_and_compiled_decoding_equal_the_eager_cache(trained):
    model = trained["model"]
    ids = torch.tensor([trained["prompts"][0] + generate(model, trained["prompts"][0], 40)])
    cache = model.new_static_cache()  # a 20-token prompt (longer than the window's ring), then one at a time
    with torch.no_grad():
        steps = [model(ids[:, :20], cache=cache).logits] + [model(ids[:, i:i + 1], cache=cache).logits
                                                            for i in range(20, ids.shape[1])]
        torch.testing.assert_close(torch.cat(steps, 1), model(ids).logits, atol=1e-5, rtol=1e-5)
    assert [layer.k.shape[2] for layer in cache.layers] == [
        WINDOW if kind == "L" else model.cfg.max_seq_len for kind in model.cfg.layer_kinds]
    for prompt in trained["prompts"]:
        assert generate(model, prompt, 48, compile=True) == generate(model, prompt, 48)


def test_cache_past_max_seq_len_matches_the_cropped_context(trained):
    model = trained["model"]
    model.cfg.max_seq_len = 24  # the rollout outgrows it: the context becomes the last 24 tokens
    try:
        prompt = trained["prompts"][1]
        assert generate(model, prompt, 30) == generate(model, prompt, 30, use_cache=False)
    finally:
        model.cfg.max_seq_len = 1024


def test_speculative_decoding_equals_greedy(trained):
    model = trained["model"]
    accepted = 0
    for prompt in trained["prompts"]:
        greedy = generate(model, prompt, 40)
        stats = {}
        assert generate(model, prompt, 40, speculative=True, stats=stats) == greedy
        assert stats["forwards"] == 1 + stats["drafted"]  # one prefill, then one verify forward per draft
        assert stats["forwards"] + stats["accepted"] in (40, 41)  # each accepted draft saves a forward
        accepted += stats["accepted"]
    assert accepted > 0
    with pytest.raises(ValueError, match="generate.speculative=true needs greedy"):
        generate(model, trained["prompts"][0], 4, temperature=1.0, speculative=True)


def test_speculative_with_an_always_right_drafter_accepts_everything(trained, monkeypatch):
    model = trained["model"]
    prompt = trained["prompts"][2]
    greedy = generate(model, prompt, 30)
    ids = prompt + greedy
    state = {"n": 0}  # positions the MTP cache holds; the drafted token is ids[n + 1]

    def oracle(hidden, next_ids, cache):
        state["n"] += next_ids.shape[1]
        logits = torch.zeros(1, model.cfg.vocab_size)
        logits[0, ids[min(state["n"] + 1, len(ids) - 1)]] = 1.0
        return logits

    monkeypatch.setattr(model, "mtp_draft", oracle)
    stats = {}
    assert generate(model, prompt, 30, speculative=True, stats=stats) == greedy
    assert stats["accepted"] == stats["drafted"] == 15


def test_mtp_loss_is_causal_and_matches_cross_entropy_of_its_logits(trained, tok):
    model = Transformer(trained["model"].cfg)
    model.load_state_dict(trained["model"].state_dict())
    rows = korean_rows(tok, 50, 3000, 32)[:2]
    ids, labels = rows[:, :-1], rows[:, 1:].clone()
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o))
    out = model(ids, labels=labels)
    mtp_logits = seen[1]  # the LM head's second call: depth 1
    ref = F.cross_entropy(mtp_logits[:, :-1].reshape(-1, tok.vocab_size), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.mtp_loss, model.cfg.mtp_loss_weight * ref)
    # depth 1 at position t sees tokens up to t+1 only: change the tokens from position j on
    j = 20
    ids2, labels2 = ids.clone(), labels.clone()
    ids2[:, j:] = (ids2[:, j:] + 7) % tok.vocab_size
    labels2[:, j - 1:] = (labels2[:, j - 1:] + 7) % tok.vocab_size
    model(ids2, labels=labels2)
    hook.remove()
    torch.testing.assert_close(seen[3][:, : j - 1], mtp_logits[:, : j - 1])
    assert not torch.allclose(seen[3][:, j - 1], mtp_logits[:, j - 1])


def test_mtp_with_masked_labels_scores_only_their_targets_from_the_real_tokens(trained, tok):
    """Supervised fine-tuning masks labels (-100) outside the assistant's tokens: the MTP depth still sees the real
    tokens (its logits are those of the unmasked row) and its loss is the cross-entropy over the targets left."""
    model = trained["model"]
    rows = korean_rows(tok, 50, 3000, 32)[:2]
    ids, labels = rows[:, :-1], rows[:, 1:]
    masked = labels.masked_fill(torch.arange(labels.shape[1]) % 3 == 0, -100)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(ids, labels=labels)
        out = model(ids, labels=masked)
    hook.remove()
    torch.testing.assert_close(seen[3], seen[1])  # depth 1's logits do not depend on which labels are masked
    ref = F.cross_entropy(seen[1][:, :-1].reshape(-1, tok.vocab_size), masked[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.mtp_loss, model.cfg.mtp_loss_weight * ref)


def test_mtp_gradients_reach_shared_head_embedding_and_trunk(trained, tok):
    model = Transformer(trained["model"].cfg)
    rows = korean_rows(tok, 50, 3000, 32)[:2]
    model(rows[:, :-1], labels=rows[:, 1:]).mtp_loss.backward()
    for name in ("lm_head.weight", "embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "mtp.0.eh_proj.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.norm.weight.grad is None  # the main final norm is not on the MTP path


def test_mtp_leaves_the_main_model_alone(trained, tok):
    """With MTP on, the main model's logits and loss are those of the same weights without MTP."""
    cfg = trained["model"].cfg
    without = Transformer(load_preset("tiny", **{**cfg.to_dict(), "mtp_layers": 0}))
    missing, _ = without.load_state_dict(trained["model"].state_dict(), strict=False)
    assert not missing
    rows = korean_rows(tok, 50, 3000, 32)[:2]
    a = trained["model"](rows[:, :-1], labels=rows[:, 1:])
    b = without(rows[:, :-1], labels=rows[:, 1:])
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert float(b.mtp_loss) == 0.0 and "mtp/loss" not in b.metrics and a.mtp_loss > 0
