"""The model contract: outputs, loss, balancing hooks, save/load, generation, config errors, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ondol.model.config import ModelConfig, load_preset
from ondol.model.generate import generate
from ondol.model.io import load_pretrained, save_pretrained
from ondol.model.transformer import Transformer


def tiny(**overrides) -> ModelConfig:
    return load_preset("tiny", vocab_size=512, **overrides)


def batch(B=2, T=48, V=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    doc_ids = torch.cumsum(torch.rand(B, T, generator=g) < 0.05, dim=1)
    return ids[:, :-1], ids[:, 1:].clone(), doc_ids


def test_forward_contract_and_loss():
    torch.manual_seed(0)
    model = Transformer(tiny(aux_loss_coef=0.01, z_loss_coef=1e-3))
    ids, labels, doc_ids = batch()
    labels[0, :10] = -100
    out = model(ids, labels=labels, doc_ids=doc_ids)
    assert out.logits.shape == (2, 48, 512)
    expected = F.cross_entropy(out.logits.view(-1, 512), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert out.aux_loss.dim() == 0 and out.aux_loss > 0 and out.aux_loss.requires_grad
    assert all(not v.requires_grad and v.dim() == 0 for v in out.metrics.values())
    assert {"moe/max_violation", "moe/seq_aux_loss", "moe/z_loss", "moe/aux_loss"} <= set(out.metrics)
    assert model(ids).loss is None
    (out.loss + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_moe_layers_and_bias_update():
    cfg = tiny()
    model = Transformer(cfg)
    moes = model.moe_layers()
    assert len(moes) == cfg.n_layers - cfg.first_k_dense
    model.train()
    model(batch()[0])
    loads = [m.tokens_per_expert.clone() for m in moes]
    assert all(float(load.sum()) == 2 * 48 * cfg.top_k for load in loads)
    model.update_router_biases()
    for m, load in zip(moes, loads):
        torch.testing.assert_close(m.expert_bias, cfg.bias_update_rate * torch.sign(load.mean() - load))
        assert m.tokens_per_expert.sum() == 0


def test_same_seed_same_losses_bit_for_bit():
    def run() -> list[float]:
        torch.manual_seed(123)
        model = Transformer(tiny())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for step in range(3):
            ids, labels, doc_ids = batch(seed=step)
            out = model(ids, labels=labels, doc_ids=doc_ids)
            (out.loss + out.aux_loss).backward()
            opt.step()
            opt.zero_grad()
            model.update_router_biases()
            losses.append(out.loss.item())
        return losses

    assert run() == run()


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_roundtrip(tmp_path, tied):
    cfg = tiny(tie_embeddings=tied)
    model = Transformer(cfg)
    model.train()
    model(batch()[0])
    model.update_router_biases()  # a non-zero expert bias must survive the round trip
    save_pretrained(model, cfg, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.cfg == cfg
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    model.eval()
    ids = batch()[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_load_refuses_mismatched_weights(tmp_path):
    cfg = tiny()
    save_pretrained(Transformer(cfg), cfg, tmp_path)
    (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text().replace('"n_layers": 4',
                                                                                          '"n_layers": 5'))
    with pytest.raises(ValueError, match="model.safetensors: weights do not match"):
        load_pretrained(tmp_path)


def test_generate_greedy_is_argmax_rollout_and_stops_at_eos():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    prompt = [5, 17, 42]
    new = generate(model, prompt, max_new_tokens=6)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert new == ids[3:]
    assert generate(model, prompt, max_new_tokens=6, eos_id=new[1]) == new[:2]
    # min_new_tokens: eos is masked until then, so the rollout follows the argmax of the other tokens
    held = generate(model, prompt, max_new_tokens=6, eos_id=new[0], min_new_tokens=3)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(3):
            logits = model(torch.tensor([ids])).logits[0, -1]
            logits[new[0]] = float("-inf")
            ids.append(int(logits.argmax()))
    assert held[:3] == ids[3:] and new[0] not in held[:3]
    g = torch.Generator().manual_seed(1)
    sampled = generate(model, prompt, 5, temperature=1.0, top_k=3, generator=g)
    assert len(sampled) == 5


@pytest.mark.parametrize("overrides,key", [
    ({"n_heads": 6, "n_kv_heads": 4}, "model.n_heads must be divisible by model.n_kv_heads"),
    ({"attn_pattern": "LLX"}, "model.attn_pattern"),
    ({"top_k": 9}, "model.top_k"),
    ({"router_score": "relu"}, "model.router_score"),
    ({"head_dim": 33}, "model.head_dim"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        tiny(**overrides)


def test_layer_pattern_forces_last_layer_global():
    assert tiny(n_layers=6).layer_kinds == ["L", "L", "L", "G", "L", "G"]
    assert tiny(n_layers=4, attn_pattern="G").layer_kinds == ["G"] * 4
