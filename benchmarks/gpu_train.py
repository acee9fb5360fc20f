"""Training speed of `ondol train` on one GPU, beside a bare training loop and transformers' ExaoneMoeForCausalLM.

Trains a model preset (default: the ~1B-total MoE, LLLG attention, window 128) on real Korean batches
(ko_reviews + ko_docs through Ondol's own tokenizer and data pipeline, so routing is as unbalanced as real text
makes it) for a fixed number of steps after warm-up:
  - the `Trainer` step itself (DeepSpeed engine, ZeRO, fp32 master weights, router-bias update), once per
    row of TRAINER_ROWS: the same config keys a user sets (train.compile=true, ...), plus --train-overrides;
  - a bare loop (bf16 parameters, torch AdamW, no DeepSpeed), each variant switching on one more fast path;
  - the same config as transformers' ExaoneMoeForCausalLM in that bare loop, on the same batches.
Prints two tables: tokens/s, achieved TFLOP/s, MFU against the device's dense bf16 peak, peak memory, host
syncs per step, then for the trainer the forward / backward / optimizer (engine.step) split of a step (each
part synchronised, mean of 3 steps) and for the bare loop the profiler's time shares of attention, MoE and the
rest.

    python benchmarks/gpu_train.py                          # CUDA: moe-1b, batch 8 x 2048, bf16, ZeRO 1
    python benchmarks/gpu_train.py --device cpu --preset tiny --batch 2 --seq-len 256 --steps 2 --warmup 1 \
        --docs 3000 --vocab 4096                            # CPU at tiny size (fp32, ZeRO 0)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ondol.data.config import DataConfig, SourceConfig
from ondol.data.loader import TokenLoader
from ondol.data.preparation import prepare
from ondol.model.config import PRESET_DIR, load_preset
from ondol.model.export import hf_config, hf_state_dict
from ondol.model.flops import param_counts, train_flops_per_token
from ondol.model.transformer import Transformer
from ondol.tokenizer.config import TokenizerConfig
from ondol.tokenizer.train import train_tokenizer
from ondol.train.config import TrainConfig
from ondol.train.fast_paths import apply_compile_and_checkpointing
from ondol.train.host_syncs import HostSyncCounter

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}
# Each variant adds one fast path to the one before it, so the table shows each one's effect.
VARIANTS = {
    "sdpa+loop": {"attn_backend": "sdpa", "moe_dispatch": "loop"},
    "flex+loop": {"attn_backend": "flex", "moe_dispatch": "loop"},
    "flex+grouped_mm": {"attn_backend": "flex", "moe_dispatch": "grouped_mm"},
    "+compile": {"attn_backend": "flex", "moe_dispatch": "grouped_mm", "compile": True},
    "+act_ckpt": {"attn_backend": "flex", "moe_dispatch": "grouped_mm", "compile": True, "act_ckpt": True},
}
# `ondol train` rows: config overrides on top of --train-overrides (CUDA defaults: bf16, ZeRO 1; fused AdamW
# and the chunked loss are on by default there).
TRAINER_ROWS = {
    "train": [],
    "train +compile": ["train.compile=true"],
    "train +compile +ckpt": ["train.compile=true", "train.activation_checkpointing=true",
                             "train.checkpointed_blocks=alternate"],
    "train +compile +full ckpt": ["train.compile=true", "train.activation_checkpointing=true"],
}


def korean_batches(args, vocab_size: int, work: Path) -> tuple[list[dict], int]:
    """steps + warmup batches of real Korean text, tokenized and packed by Ondol's own pipeline into `work`
    (tokenizer/ and data/, which the trainer rows read too)."""
    corpora = Path(os.environ.get("ONDOL_CORPORA", ROOT.parent / "shared" / "corpora"))
    sources = [SourceConfig(name="ko_reviews", path=str(corpora / "ko_reviews.jsonl.gz"), max_docs=args.docs),
               SourceConfig(name="ko_docs", path=str(corpora / "ko_docs.jsonl.gz"))]
    tok = train_tokenizer(TokenizerConfig(vocab_size=vocab_size, max_sentences=200_000), sources,
                          work / "tokenizer", seed=0)
    prepare(DataConfig(sources=sources, seq_len=args.seq_len), tok, work / "data", seed=0, progress=False)
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
    label_regions(model)  # before compiling, so that the ranges are traced into the compiled blocks
    if not hf:  # the trainer's own switches (train.compile, train.activation_checkpointing)
        apply_compile_and_checkpointing(model, TrainConfig(
            compile=bool(variant.get("compile")), activation_checkpointing=bool(variant.get("act_ckpt"))))
    return model, cfg


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
    """Host synchronizations one training step makes (on CUDA each stalls the GPU pipeline)."""
    with HostSyncCounter(device) as syncs:
        step(batch) if batch is not None else step()
    if syncs.count:
        print(f"  host syncs: {dict(syncs.sites)}")
    return float(syncs.count)


def trainer_config(overrides: list[str], args, work: Path, device: torch.device):
    """A run config as a user would write it: the preset, this run's tokenizer and data, then the overrides."""
    from ondol.configs import load_config

    run = Path(tempfile.mkdtemp(prefix="train-", dir=work))
    (run / "data").symlink_to(work / "data", target_is_directory=True)
    cuda = device.type == "cuda"
    preset = Path(args.preset) if Path(args.preset).suffix else PRESET_DIR / f"{args.preset}.yaml"
    model = {**yaml.safe_load(preset.read_text(encoding="utf-8")), "vocab_size": 0,
             "max_seq_len": max(args.seq_len, 4096)}
    config = {"run_dir": str(run), "seed": 0, "tokenizer": {"path": str(work / "tokenizer")},
              "data": {"seq_len": args.seq_len}, "model": model,
              "train": {"steps": 1 << 30, "micro_batch_size": args.batch, "eval_bpb_tokens": 0, "resume": "never"},
              "deepspeed": {"zero_stage": 1 if cuda else 0, "precision": "bf16" if cuda else "fp32"},
              "logging": {"progress": False, "wandb_mode": "disabled", "peak_tflops": args.peak_tflops}}
    path = run / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return load_config(path, [*args.train_overrides, *overrides])


def measure_trainer(name: str, overrides: list[str], args, work: Path, device: torch.device) -> dict:
    """The `Trainer` step itself, as `ondol train` runs it (without evaluation, logging and checkpoints)."""
    from ondol.train.trainer import Trainer

    trainer = Trainer(trainer_config(overrides, args, work, device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        trainer.train_step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    sync()
    elapsed = time.perf_counter() - start
    tps = trainer.tokens_per_step * args.steps / elapsed
    row = {"variant": name, "tokens_per_s": tps, "tflops": tps * trainer.flops_per_token / 1e12,
           "loss": float(trainer.interval["sums"][0] / trainer.interval["sums"][2].clamp_min(1)),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
           "syncs_per_step": count_host_syncs(trainer.train_step, None, device)}
    row.update(step_split(trainer, sync))
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def step_split(trainer, sync, steps: int = 3) -> dict:
    """Milliseconds per step in the engine's forward, backward and step (the optimizer), each synchronised,
    and in everything else (batch transfer, router-bias update, Python)."""
    engine, spent = trainer.engine, collections.defaultdict(float)

    def timed(part: str, run):
        def call(*a, **kw):
            sync()
            t = time.perf_counter()
            out = run(*a, **kw)
            sync()
            spent[part] += time.perf_counter() - t
            return out
        return call

    for part in ("forward", "backward", "step"):
        setattr(engine, part, timed(part, getattr(engine, part)))
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync()
    total = time.perf_counter() - start
    for part in ("forward", "backward", "step"):
        delattr(engine, part)
    split = {f"{k}_ms": 1000 * v / steps for k, v in spent.items()}
    split["other_ms"] = 1000 * total / steps - sum(split.values())
    return split


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
    p.add_argument("--trainer-rows", default=",".join(TRAINER_ROWS),
                   help="comma-separated subset of " + ",".join(TRAINER_ROWS) + " (empty: none)")
    p.add_argument("--train-overrides", nargs="*", default=[],
                   help="config overrides for every trainer row, e.g. deepspeed.zero_stage=2 optim.adamw=foreach")
    args = p.parse_args()

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as work:
        run(args, device, Path(work))


def run(args, device: torch.device, work: Path) -> None:
    batches, vocab = korean_batches(args, args.vocab, work)
    base_cfg = load_preset(args.preset, vocab_size=vocab, max_seq_len=max(args.seq_len, 4096))
    counts = param_counts(base_cfg)
    peak = peak_tflops(device, args.peak_tflops)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {gpu} | preset {args.preset}: {counts['total'] / 1e6:,.1f}M total, "
          f"{counts['active'] / 1e6:,.1f}M active | batch {args.batch} x {args.seq_len} | {args.steps} steps "
          f"after {args.warmup} warm-up | peak {peak or 'unknown'} TFLOP/s | torch {torch.__version__}")

    trained = [measure_trainer(n, TRAINER_ROWS[n], args, work, device)
               for n in args.trainer_rows.split(",") if n]
    names = [n for n in args.variants.split(",") if n]
    rows = [measure(n, VARIANTS[n], base_cfg, batches, args, device) for n in names]
    if not args.no_transformers:
        rows.append(measure("transformers", {}, base_cfg, batches, args, device))
    ref = next((r for r in rows if r["variant"] == "transformers" and "skipped" not in r), None)

    def common(r: dict) -> str:
        mfu = f"{100 * r['tflops'] / peak:5.1f}%" if peak else "   n/a"
        vs = f"{r['tokens_per_s'] / ref['tokens_per_s']:6.2f}" if ref else "   n/a"
        return (f"{r['variant']:<26} {r['tokens_per_s']:>10,.0f} {r['tflops']:>8.1f} {mfu:>6} "
                f"{r['peak_mem_gib']:>8.1f} {r['syncs_per_step']:>6.0f} {r['loss']:>8.4f} {vs}")

    columns = f"{'variant':<26} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8} {'syncs':>6} {'loss':>8} " \
              f"{'x HF':>6}"
    if trained:
        head = f"{columns} {'fwd ms':>7} {'bwd ms':>7} {'opt ms':>7} {'other':>7}"
        print(f"\n`ondol train` step ({' '.join(args.train_overrides) or 'default keys'})\n{head}\n" + "-" * len(head))
        for r in trained:
            print(f"{common(r)} {r['forward_ms']:>7.1f} {r['backward_ms']:>7.1f} {r['step_ms']:>7.1f} "
                  f"{r['other_ms']:>7.1f}")
    head = f"{columns} {'attn':>6} {'moe':>6} {'rest':>6}"
    print(f"\nbare loop\n{head}\n" + "-" * len(head))
    for r in rows:
        if "skipped" in r:
            print(f"{r['variant']:<26} skipped: {r['skipped']}")
            continue
        print(f"{common(r)} {100 * r['attention']:>5.1f}% {100 * r['moe']:>5.1f}% {100 * r['rest']:>5.1f}%")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
