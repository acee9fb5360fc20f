"""Training speed of the MoE with hybrid attention on one GPU, beside transformers' ExaoneMoeForCausalLM.

Trains a model preset (default: the ~1B-total MoE, LLLG attention, window 128) in bf16 on real Korean batches
(ko_reviews + ko_docs through Ondol's own tokenizer and data pipeline, so routing is as unbalanced as real text
makes it) for a fixed number of steps after warm-up, once per variant, each variant switching on one more fast
path, then the same config as transformers' ExaoneMoeForCausalLM on the same batches. Prints one table:
tokens/s, achieved TFLOP/s, MFU against the device's dense bf16 peak, peak memory, host syncs per step, and the
time shares of attention, MoE (dispatch + experts) and the rest from the PyTorch profiler.

    python benchmarks/gpu_train.py                          # CUDA: moe-1b, batch 8 x 2048
    python benchmarks/gpu_train.py --device cpu --preset tiny --batch 2 --seq-len 256 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ondol.data.config import DataConfig, SourceConfig
from ondol.data.loader import TokenLoader
from ondol.data.preparation import prepare
from ondol.model.config import load_preset
from ondol.model.export import hf_config, hf_state_dict
from ondol.model.flops import param_counts, train_flops_per_token
from ondol.model.transformer import Transformer
from ondol.tokenizer.config import TokenizerConfig
from ondol.tokenizer.train import train_tokenizer

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}
# Each variant adds one fast path to the one before it, so the table shows each one's effect.
VARIANTS = {
    "sdpa+loop": {"attn_backend": "sdpa", "moe_dispatch": "loop"},
    "flex+loop": {"attn_backend": "flex", "moe_dispatch": "loop"},
    "flex+grouped_mm": {"attn_backend": "flex", "moe_dispatch": "grouped_mm"},
    "+compile": {"attn_backend": "flex", "moe_dispatch": "grouped_mm", "compile": True},
    "+act_ckpt": {"attn_backend": "flex", "moe_dispatch": "grouped_mm", "compile": True, "act_ckpt": True},
}


def korean_batches(args, vocab_size: int, work: Path) -> tuple[list[dict], int]:
    """steps + warmup batches of real Korean text, tokenized and packed by Ondol's own pipeline."""
    corpora = Path(os.environ.get("ONDOL_CORPORA", ROOT.parent / "shared" / "corpora"))
    sources = [SourceConfig(name="ko_reviews", path=str(corpora / "ko_reviews.jsonl.gz"), max_docs=args.docs),
               SourceConfig(name="ko_docs", path=str(corpora / "ko_docs.jsonl.gz"))]
    tok = train_tokenizer(TokenizerConfig(vocab_size=vocab_size, max_sentences=200_000), sources,
                          work / "tokenizer", seed=0)
    prepare(DataConfig(sources=sources, seq_len=args.seq_len), tok, work / "data", seed=0)
    loader = TokenLoader(work / "data", "train", args.seq_len, args.batch, seed=0)
    return [next(loader) for _ in range(args.warmup + args.steps)], tok.vocab_size


def peak_tflops(device: torch.device, given: float) -> float:
    if given:
        return given
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)


def label_regions(model: torch.nn.Module) -> None:
    """Wrap attention and MoE modules in profiler ranges, from outside the model."""
    for module in model.modules():
        kind = type(module).__name__
        label = {"Attention": "attention", "ExaoneMoeAttention": "attention", "MoE": "moe",
                 "ExaoneMoeSparseMoEBlock": "moe"}.get(kind)
        if label:
            module.forward = _in_range(label, module.forward)


def _in_range(label: str, fn):
    def wrapped(*a, **kw):
        with record_function(label):
            return fn(*a, **kw)
    return wrapped


def build(variant: dict, base_cfg, device, hf: bool):
    cfg = replace(base_cfg, **{k: v for k, v in variant.items() if k in ("attn_backend", "moe_dispatch")})
    torch.manual_seed(0)
    model = Transformer(cfg)
    if hf:
        from transformers import ExaoneMoeConfig, ExaoneMoeForCausalLM

        conf = hf_config(cfg, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
        conf.pop("architectures"), conf.pop("model_type")
        hf_model = ExaoneMoeForCausalLM(ExaoneMoeConfig(**conf))
        hf_model.load_state_dict(hf_state_dict(model.state_dict(), cfg))
        model = hf_model
    model = model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if variant.get("act_ckpt"):
        _checkpoint_blocks(model)
    if variant.get("compile"):
        for block in _blocks(model):
            block.compile()
    label_regions(model)
    return model, cfg


def _blocks(model) -> list[torch.nn.Module]:
    return list(model.layers) if isinstance(model, Transformer) else list(model.model.layers)


def _checkpoint_blocks(model) -> None:
    from torch.utils.checkpoint import checkpoint

    def recomputed(forward):
        return lambda *a, **kw: checkpoint(forward, *a, use_reentrant=False, **kw)

    for block in _blocks(model):
        block.forward = recomputed(block.forward)


def step_fn(model, opt, hf: bool):
    def step(batch):
        if hf:
            out = model(input_ids=batch["input_ids"], labels=batch["labels"])
            loss = out.loss
        else:
            out = model(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"])
            loss = out.loss + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not hf:
            model.update_router_biases()
        return loss.detach()
    return step


def measure(name: str, variant: dict, base_cfg, batches, args, device) -> dict:
    hf = name == "transformers"
    if device.type != "cuda" and variant.get("attn_backend") == "flex":
        return {"variant": name, "skipped": "FlexAttention has no backward on CPU"}
    if device.type != "cuda" and variant.get("moe_dispatch") == "grouped_mm":
        return {"variant": name, "skipped": "torch._grouped_mm is a Hopper kernel"}
    model, cfg = build(variant, base_cfg, device, hf)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step = step_fn(model, opt, hf)
    # transformers shifts labels itself, so it gets labels = input_ids (same targets but the last position's);
    # it has no document masking, so it attends across packed documents where Ondol does not.
    use = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in batches]
    if hf:
        use = [{**b, "labels": b["input_ids"]} for b in use]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for b in use[: args.warmup]:
        step(b)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step(b) for b in use[args.warmup:]]
    sync()
    elapsed = time.perf_counter() - start
    tokens = args.batch * args.seq_len * args.steps
    tps = tokens / elapsed
    tflops = tps * train_flops_per_token(cfg, args.seq_len) / 1e12
    row = {"variant": name, "tokens_per_s": tps, "tflops": tflops, "loss": float(losses[-1]),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
           "syncs_per_step": count_host_syncs(step, use[-1], device)}
    row.update(time_shares(step, use[-1], device))
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def count_host_syncs(step, batch, device) -> float:
    """CUDA synchronizations one training step makes (each stalls the GPU pipeline)."""
    if device.type != "cuda":
        return float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return float(sum("synchroniz" in str(w.message) for w in caught))


def time_shares(step, batch, device) -> dict:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    total = sum(getattr(e, "self_" + attr, 0.0) for e in events) or 1.0
    shares = {label: sum(getattr(e, attr, 0.0) for e in events if e.key == label) / total
              for label in ("attention", "moe")}
    shares["rest"] = max(0.0, 1.0 - shares["attention"] - shares["moe"])
    return shares


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="moe-1b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--docs", type=int, default=200_000, help="ko_reviews documents to tokenize for batches")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak; 0: by device name")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--no-transformers", action="store_true")
    args = p.parse_args()

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as work:
        batches, vocab = korean_batches(args, args.vocab, Path(work))
    base_cfg = load_preset(args.preset, vocab_size=vocab, max_seq_len=max(args.seq_len, 4096))
    counts = param_counts(base_cfg)
    peak = peak_tflops(device, args.peak_tflops)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {gpu} | preset {args.preset}: {counts['total'] / 1e6:,.1f}M total, "
          f"{counts['active'] / 1e6:,.1f}M active | batch {args.batch} x {args.seq_len} | {args.steps} steps "
          f"after {args.warmup} warm-up | peak {peak or 'unknown'} TFLOP/s | torch {torch.__version__}")

    names = [n for n in args.variants.split(",") if n]
    rows = [measure(n, VARIANTS[n], base_cfg, batches, args, device) for n in names]
    if not args.no_transformers:
        rows.append(measure("transformers", {}, base_cfg, batches, args, device))
    ref = next((r for r in rows if r["variant"] == "transformers" and "skipped" not in r), None)

    head = f"{'variant':<16} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8} {'syncs':>6} " \
           f"{'attn':>6} {'moe':>6} {'rest':>6} {'loss':>8} {'x HF':>6}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        if "skipped" in r:
            print(f"{r['variant']:<16} skipped: {r['skipped']}")
            continue
        mfu = f"{100 * r['tflops'] / peak:5.1f}%" if peak else "   n/a"
        vs = f"{r['tokens_per_s'] / ref['tokens_per_s']:6.2f}" if ref else "   n/a"
        print(f"{r['variant']:<16} {r['tokens_per_s']:>10,.0f} {r['tflops']:>8.1f} {mfu:>6} "
              f"{r['peak_mem_gib']:>8.1f} {r['syncs_per_step']:>6.0f} {100 * r['attention']:>5.1f}% "
              f"{100 * r['moe']:>5.1f}% {100 * r['rest']:>5.1f}% {r['loss']:>8.4f} {vs}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
