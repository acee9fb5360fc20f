"""The trainer's fast paths on CPU: compiled and checkpointed blocks, the chunked loss and fused AdamW give the
losses of the eager full-logits foreach run; a training step makes at most one host sync; the chunked loss
equals the naive full-logits loss and its gradients.

Runs are the golden tiny config (tests/golden.py) for a few steps, on the tokenizer and data the trainer tests
build once per session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import corpus_texts
from golden import link_data, run_losses, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from ondol.model.loss import chunked_linear_cross_entropy
from ondol.train.config import TrainConfig
from ondol.train.engine import fused_adamw
from ondol.train.fast_paths import (
    apply_compile_and_checkpointing,
    checkpointed_layers,
    loss_chunk_tokens,
)
from ondol.train.host_syncs import HostSyncCounter, count_training_step

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("train.steps=3", "train.eval_every=3", "train.eval_batches=1", "train.save_every=3")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The folder test_train.py's session fixture builds (it runs first; build_assets reuses finished work)."""
    from golden import build_assets

    return build_assets(tmp_path_factory.getbasetemp() / "train_assets0")


@pytest.fixture(scope="module")
def eager(assets, tmp_path_factory) -> list[float]:
    return run_losses(tmp_path_factory.mktemp("eager"), assets, *STEPS)


COMPILED = ("train.compile=true", "train.activation_checkpointing=true", "train.checkpointed_blocks=alternate", "train.loss=chunked",
            "train.loss_chunk_tokens=100")


@pytest.mark.parametrize("fast", [
    ("train.activation_checkpointing=true", "train.loss=chunked", "train.loss_chunk_tokens=48", "optim.adamw=fused"),
    ("train.activation_checkpointing=selective", "train.checkpointed_blocks=alternate"),
    pytest.param(COMPILED, marks=pytest.mark.slow),  # minutes of compiling on 2 cores; the dense test below
], ids=["checkpointed-chunked-fused", "selective-alternate", "compiled-alternate-chunked"])
def test_fast_paths_give_the_eager_losses(assets, eager, tmp_path, fast):
    """Same data, same initial weights: only the order of floating-point sums may differ."""
    losses = run_losses(tmp_path, assets, *STEPS, *fast)
    assert len(losses) == len(eager) == 3
    assert losses == pytest.approx(eager, rel=1e-5)


def test_compiled_checkpointed_dense_model_gives_the_eager_losses(assets, tmp_path):
    """train.compile with alternate-block checkpointing and the compiled chunked loss, on a dense model (few graphs
    to compile; the MoE model's run above is marked slow)."""
    dense = ("model.n_experts=0", "train.steps=2", "train.eval_every=2", "train.eval_batches=1",
             "train.save_every=2")
    eager = run_losses(tmp_path / "eager", assets, *dense)
    compiled = run_losses(tmp_path / "compiled", assets, *dense, *COMPILED)
    assert len(compiled) == len(eager) == 2
    assert compiled == pytest.approx(eager, rel=1e-5)


# The CPU path's matmuls and attention kernel, named here independently of the policy's list
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm",
           "aten::_scaled_dot_product_flash_attention_for_cpu")


class MatmulCounter(TorchDispatchMode):
    """Counts the matmul and attention ops that run (aten ops below autograd, so recomputes are seen too)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.name() in MATMULS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dispatch", ["grouped_mm", "bmm_padded"])
def test_selective_checkpointing_recomputes_no_matmul(dispatch):
    """The tiny MoE model (dense and MoE blocks, an MTP depth) on real text: full and selective checkpointing
    give the uncheckpointed loss, gradients and expert loads bit for bit; the backward under selective runs
    exactly the uncheckpointed backward's matmuls (none recomputed), under full each block's forward matmuls
    once more (attention's SDPA kernel counted with them)."""
    from ondol.model.config import load_preset
    from ondol.model.transformer import Transformer

    cfg = load_preset("tiny", vocab_size=512, mtp_layers=1, moe_dispatch=dispatch)
    text = "\n".join(corpus_texts("ko_reviews", 50)).encode("utf-8")
    ids = torch.tensor(list(text[: 2 * 65])).view(2, 65) % cfg.vocab_size
    runs = {}
    for mode in ("none", "full", "selective"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        apply_compile_and_checkpointing(model, TrainConfig(activation_checkpointing=mode))
        with MatmulCounter() as forward:
            out = model(ids[:, :-1], labels=ids[:, 1:])
        with MatmulCounter() as backward:
            (out.loss + out.mtp_loss).backward()
        loads = torch.stack([m.tokens_per_expert for m in model.moe_layers()])
        grads = [p.grad for p in model.parameters()]
        runs[mode] = (out.loss.detach(), grads, loads, forward.count, backward.count)
    loss, grads, loads, forward_ops, backward_ops = runs["none"]
    for mode in ("full", "selective"):
        loss_c, grads_c, loads_c, forward_c, _ = runs[mode]
        assert torch.equal(loss_c, loss) and torch.equal(loads_c, loads) and forward_c == forward_ops
        assert all(torch.equal(a, b) for a, b in zip(grads_c, grads)), mode
    assert runs["selective"][4] == backward_ops
    # Full recomputes every forward matmul but those outside the blocks (the LM head twice, the MTP
    # projection), each block's last one perhaps not (non-reentrant checkpointing stops its recompute once it
    # has every tensor the backward needs, which depends on what the block saves after its last matmul).
    blocks = cfg.n_layers + cfg.mtp_layers
    assert backward_ops + forward_ops - 3 - blocks <= runs["full"][4] <= backward_ops + forward_ops - 3


class CompiledRegionCounter(TorchDispatchMode):
    """Counts the torch.compile'd regions that run (wrapped as inductor_compiled_code ops)."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # else dynamo would not run compiled code under this mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.name() == "inductor_compiled_code"
        return func(*args, **(kwargs or {}))


@pytest.mark.slow  # compiles (seconds on 2 shared cores); no faster test has a compiled region under SAC
def test_selective_checkpointing_keeps_a_compiled_region_of_an_eager_block():
    """FlexAttention runs on CUDA as a compiled kernel inside eager blocks, compiled as
    model/attention_backends.py does (wrap_inductor_compiled_regions). Here a compiled stand-in on CPU: under
    selective checkpointing the backward runs the region once (its own backward), under full twice (its
    forward again); same gradients."""
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from ondol.train.fast_paths import selective_policy

    attention = torch.compile(lambda q, k: torch.softmax(q @ k.t(), -1) @ k,
                              options={"wrap_inductor_compiled_regions": True})

    def block(x, w):
        h = torch.sin(x @ w)
        return attention(h, h).cos()

    selective = functools.partial(create_selective_checkpoint_contexts, selective_policy)
    forwards = {"none": block, "full": functools.partial(checkpoint, block, use_reentrant=False),
                "selective": functools.partial(checkpoint, block, use_reentrant=False, context_fn=selective)}
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 8, generator=g), torch.randn(8, 8, generator=g)
    runs = {}
    for mode, forward in forwards.items():
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = forward(xg, wg).sum()
        with CompiledRegionCounter() as backward:
            grads = torch.autograd.grad(out, (xg, wg))
        runs[mode] = (grads, backward.count)
    for mode in ("full", "selective"):
        assert all(torch.equal(a, b) for a, b in zip(runs[mode][0], runs["none"][0])), mode
    assert (runs["none"][1], runs["selective"][1], runs["full"][1]) == (1, 1, 2)


def test_a_training_step_makes_at_most_one_host_sync(assets, tmp_path):
    """The CUDA path (grouped_mm experts, fused AdamW), one rank, ZeRO 0: the only sync left is the
    finite-gradient check that decides whether the update is applied."""
    from ondol.train.trainer import Trainer

    link_data(tmp_path, assets)
    trainer = Trainer(tiny_config(tmp_path, assets, "train.steps=2", "train.log_every=10",
                                  "model.moe_dispatch=grouped_mm", "optim.adamw=fused"))
    assert trainer.optimizer.defaults["fused"] and [g["name"] for g in trainer.optimizer.param_groups] == [
        "decay", "no_decay"]
    trainer.train_step()
    with HostSyncCounter(torch.device("cpu")) as syncs:
        trainer.train_step()
    assert trainer.optimizer.applied
    assert syncs.count <= 1, syncs.sites


BF16_CUDA_DEFAULTS = ("deepspeed.precision=bf16", "optim.adamw=fused", "train.loss=chunked",
                      "train.loss_chunk_tokens=128", "model.moe_dispatch=grouped_mm", "train.steps=2", "train.log_every=10",
                      "logging.peak_tflops=1")  # no bf16 matmul probe for MFU: ~30 s on a shared CPU


def _step_counts(trainer) -> tuple[int, int]:
    """Host syncs in a training step after the first, and aten kernels (views not counted) in its optimizer step."""
    syncs, ops = count_training_step(trainer)
    assert trainer.optimizer.applied
    assert syncs.count <= 1, syncs.sites
    return sum(1 for _ in trainer.engine.module.parameters()), sum(ops.kernels.values())


def test_bf16_zero_0_1_2_steps_make_one_sync_and_launch_as_many_kernels_for_any_depth(assets, tmp_path):
    """The CUDA defaults emulated on CPU in bf16 (fused AdamW, chunked loss, grouped_mm): at ZeRO 0, 1 and 2 one
    host sync a step (whether the update was applied), and the optimizer step's kernel count does not grow with
    the parameter tensors: 4 layers launch less than one kernel more per added tensor than 2 layers. DeepSpeed's
    own ZeRO 1/2 step (deepspeed.zero_checks=deepspeed) launches ~15 more per tensor and syncs 4 times; its bf16
    ZeRO 0 optimizer (FP16_UnfusedOptimizer, no longer used) ~20 and once per tensor."""
    from ondol.train.trainer import Trainer

    link_data(tmp_path, assets)
    counts = {}
    for stage, layers in ((0, 2), (1, 4), (2, 2)):
        trainer = Trainer(tiny_config(tmp_path, assets, *BF16_CUDA_DEFAULTS, f"deepspeed.zero_stage={stage}",
                                      f"model.n_layers={layers}"))
        assert type(trainer.engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"
        counts[stage] = _step_counts(trainer)
        trainer.engine.destroy()
    (tensors_2, kernels_2), (tensors_4, kernels_4) = counts[2], counts[1]
    assert tensors_4 - tensors_2 >= 20
    assert abs(kernels_4 - kernels_2) < tensors_4 - tensors_2, counts


def test_the_sync_counter_sees_what_would_stall_a_gpu():
    x = torch.tensor([1, 0, 2, 1])
    with HostSyncCounter(torch.device("cpu")) as syncs:
        torch.bincount(x, minlength=3)
        bool(x.sum() > 0)
        x.max().item()
        x.repeat_interleave(x, output_size=4)  # sized by the caller: no sync
        torch.zeros(3, dtype=torch.long).scatter_add_(0, x, torch.ones_like(x))
    assert syncs.count == 3, syncs.sites


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_the_full_logits_loss_and_gradients(dtype):
    g = torch.Generator().manual_seed(0)
    N, D, V = 70, 32, 101
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (0.2 * torch.randn(V, D, generator=g)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100

    def grads(loss_fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = loss_fn(h, w)
        (3.0 * loss).backward()
        return loss.detach().float(), h.grad.float(), w.grad.float()

    ref = grads(lambda h, w: F.cross_entropy((h @ w.t()).float(), labels, ignore_index=-100))
    got = grads(lambda h, w: chunked_linear_cross_entropy(h, w, labels, chunk=16))  # 70 = 4 x 16 + 6
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **tol)


def test_fast_path_selection():
    assert checkpointed_layers(5, TrainConfig()) == []
    assert checkpointed_layers(5, TrainConfig(activation_checkpointing=True)) == [0, 1, 2, 3, 4]
    assert checkpointed_layers(5, TrainConfig(activation_checkpointing=True, checkpointed_blocks="alternate")) == [0, 2, 4]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (fused_adamw("auto", cpu), fused_adamw("auto", cuda), fused_adamw("foreach", cuda)) == (False, True, False)
    assert fused_adamw("fused", cpu)
    auto = TrainConfig(loss_chunk_tokens=512)
    assert (loss_chunk_tokens(auto, cpu, 0), loss_chunk_tokens(auto, cuda, 2), loss_chunk_tokens(auto, cuda, 3)) \
        == (0, 512, 0)
    with pytest.raises(ValueError, match="train.loss=chunked does not work with deepspeed.zero_stage=3"):
        loss_chunk_tokens(TrainConfig(loss="chunked"), cuda, 3)
    with pytest.raises(ValueError, match="train.checkpointed_blocks must be all or alternate"):
        TrainConfig(checkpointed_blocks="some")


def test_activation_checkpointing_values(capsys):
    """true/false keep meaning full/none (old configs); a bad value is one line naming the key, exit code 2"""
    from ondol.configs import load_config
    from ondol.launch.cli import main

    config = str(ROOT / "configs" / "tiny-ko.yaml")
    for value, mode in (("true", "full"), ("false", "none"), ("none", "none"), ("full", "full"),
                        ("selective", "selective")):
        override = f"train.activation_checkpointing={value}"
        assert load_config(config, [override]).train.activation_checkpointing == mode
    assert load_config(config).train.activation_checkpointing == "none"
    k_exaone = load_config(ROOT / "configs" / "k-exaone-236b.yaml")  # activation_checkpointing: true
    assert k_exaone.train.activation_checkpointing == "full"
    assert main(["plan", config, "train.activation_checkpointing=some"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.activation_checkpointing must be none, full or selective" in err
    assert "some" in err
