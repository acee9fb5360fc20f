"""What the CUDA training path relies on, checked on CPU: Adam state rebuilt on resume as torch's AdamW builds it,
no gradient buffers for an evaluation loss, no attention backend with avoidable host syncs or wrong sink
gradients, and blocks that torch.compile traces as one graph each."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ondol.model import attention_backends
from ondol.model.attention_backends import FlexBackend, MaskSpec, SDPABackend, select_backend
from ondol.model.config import ModelConfig, load_preset
from ondol.model.layers import rope_cos_sin
from ondol.model.loss import chunked_linear_cross_entropy
from ondol.model.transformer import Transformer
from ondol.train.state_shards import adam_step_state


@pytest.mark.parametrize("flags", [{"fused": True}, {"foreach": True}, {"foreach": False}],
                         ids=["fused", "foreach", "single"])  # capturable runs on accelerators only
def test_resumed_adam_step_is_the_state_torch_creates(flags):
    p = torch.nn.Parameter(torch.randn(3, 4))
    p.grad = torch.randn(3, 4)
    opt = torch.optim.AdamW([p], **flags)
    opt.step()
    ref = opt.state[p]["step"]
    got = adam_step_state(p, 1, bool(opt.defaults["fused"]), opt.defaults["capturable"])
    assert (got.device, got.dtype, got.shape, float(got)) == (ref.device, ref.dtype, ref.shape, float(ref))


def test_resumed_adam_step_follows_the_parameter_device_where_the_kernel_reads_it():
    """On CUDA the fused kernel rejects a host `step`; here a meta parameter stands for a device one."""
    p = torch.empty(3, 4, device="meta")
    assert adam_step_state(p, 5, fused=True, capturable=False).device.type == "meta"
    assert adam_step_state(p, 5, fused=False, capturable=True).device.type == "meta"
    assert adam_step_state(p, 5, fused=False, capturable=False).device.type == "cpu"  # torch's foreach rule


class OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_chunked_loss_builds_gradients_only_when_autograd_wants_them(mode):
    g = torch.Generator().manual_seed(0)
    N, D, V = 40, 16, 97
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = -100
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "grad": torch.enable_grad}[mode]
    with context(), OutputShapes() as ops:
        loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk=16)
    weight_grads = ops.shapes.count((V, D))  # the fp32 weight-gradient buffer and each chunk's part of it
    assert (weight_grads > 0) == (mode == "grad")
    assert loss.requires_grad == (mode == "grad")
    ref = F.cross_entropy(hidden.detach() @ weight.detach().t(), labels, ignore_index=-100)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-6)


def test_auto_attention_never_picks_flash(monkeypatch):
    """flash's varlen masks read document lengths on the host every forward; `auto` must not choose it."""
    monkeypatch.setattr(attention_backends, "flash_available", lambda: True)
    cuda = torch.device("cuda")
    assert isinstance(select_backend("auto", cuda, torch.bfloat16), FlexBackend)
    assert isinstance(select_backend("auto", torch.device("cpu"), torch.bfloat16), SDPABackend)
    assert select_backend("flash", cuda, torch.bfloat16).name == "flash"


def test_sinks_on_flash_are_refused_naming_the_keys(tmp_path):
    from ondol.configs import load_config
    from ondol.errors import ConfigError

    with pytest.raises(ValueError, match=r"model.attn_sinks=true .* model.attn_backend=flash"):
        ModelConfig(attn_sinks=True, attn_backend="flash")
    ModelConfig(attn_sinks=True, attn_backend="auto")
    config = attention_backends.__file__.rsplit("/model/", 1)[0] + "/configs/tiny-ko.yaml"
    with pytest.raises(ConfigError, match="model.attn_sinks=true") as err:
        load_config(config, ["model.attn_sinks=true", "model.attn_backend=flash"])
    assert "\n" not in str(err.value)


def _block_inputs(model: Transformer, dtype: torch.dtype):
    cfg, T = model.cfg, 16
    ids = torch.arange(2 * T).view(2, T) % cfg.vocab_size
    x = model.embed_tokens(ids).to(dtype)
    backend = model.backend(x.device, dtype)
    docs = (torch.arange(T) >= T // 2).long().expand(2, T)  # two packed documents per row
    masks = {kind: backend.prepare(MaskSpec(T, cfg.window if kind == "L" else None, docs), x.device)
             for kind in "LG"}
    return x, rope_cos_sin(torch.arange(T)[None], model.inv_freq, dtype), masks, backend


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_blocks_compile_without_graph_breaks(dtype):
    """Dense, MoE (grouped_mm experts) and MTP blocks each trace to one graph, as train.compile compiles them."""
    cfg = load_preset("tiny", vocab_size=256, mtp_layers=1, moe_dispatch="grouped_mm")
    torch.manual_seed(0)
    model = Transformer(cfg).to(dtype).train()
    x, rope, masks, backend = _block_inputs(model, dtype)
    blocks = {"dense": model.layers[0], "moe": model.layers[cfg.first_k_dense], "mtp": model.mtp[0].block}
    assert not hasattr(blocks["dense"].mlp, "experts") and hasattr(blocks["moe"].mlp, "experts")
    torch._dynamo.reset()
    for name, block in blocks.items():
        explained = torch._dynamo.explain(block)(x, rope, masks, backend)
        assert (explained.graph_break_count, explained.graph_count) == (0, 1), (name, explained.break_reasons)
