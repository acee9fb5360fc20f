"""Training speed of `ondol train` on one GPU, beside a bare training loop and transformers' ExaoneMoeForCausalLM.

Two workloads, each trained on real Korean batches (ko_reviews + ko_docs through Ondol's own tokenizer and data
pipeline, so routing is as unbalanced as real text makes it) with 4 micro-batches of gradient accumulation per
optimizer step, as configs/k-exaone-236b.yaml:
  - moe-1b: the ~1B-total MoE preset, batch 8 x 2048;
  - k-exaone-shaped: K-EXAONE-236B's layer shapes (d_model 6,144, 64/8 heads of 128, top-8 of 2,048-wide
    experts + 1 shared, window 128, LLLG, the real 153,600 vocabulary), batch 1 x 4096, with 2 layers of 16
    experts and no MTP so that weights, gradients and Adam state fit one 80 GB GPU; its memory is planned with
    `ondol plan`'s own model (train/memory.py) and printed first.
Rows, each in its own process (so nothing a row leaves behind, e.g. a DeepSpeed engine, holds memory in the next;
peak memory is each row's own):
  - the `Trainer` step itself (DeepSpeed engine, ZeRO, fp32 master weights, router-bias update), once per
    row of TRAINER_ROWS: the same config keys a user sets (train.compile=true, ...), plus --train-overrides;
  - a bare loop (bf16 parameters, torch AdamW, no DeepSpeed), each variant switching on one more fast path;
  - the same config as transformers' ExaoneMoeForCausalLM in that bare loop, on the same batches.
Prints per workload two tables: tokens/s, achieved TFLOP/s, MFU against the device's dense bf16 peak, peak
memory, host syncs per optimizer step, then for the trainer the forward / backward / optimizer (engine.step)
split of a step (each part synchronised, mean of 3 steps) and for the bare loop the profiler's time shares of
attention, MoE and the rest.

    python benchmarks/gpu_train.py --work gpu-work        # CUDA: both workloads, default rows (reuses gpu-work)
    python benchmarks/gpu_train.py --cpu-smoke            # the same code on CPU at tiny shapes (a minute or two)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
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

from ondol.configs import load_config
from ondol.data.config import DataConfig, SourceConfig
from ondol.data.loader import TokenLoader
from ondol.data.preparation import prepare
from ondol.launch.plan import plan_for_config, table
from ondol.model.config import PRESET_DIR, load_preset
from ondol.model.export import hf_config, hf_state_dict
from ondol.model.flops import param_counts, train_flops_per_token
from ondol.model.transformer import Transformer
from ondol.tokenizer.config import TokenizerConfig
from ondol.tokenizer.tokenizer import Tokenizer
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
GRAD_ACCUM = 4  # micro-batches per optimizer step, as configs/k-exaone-236b.yaml
# name: model preset, overrides, micro-batch, sequence length, and the rows a plain run measures (chosen so that
# the whole default run takes about 7 minutes on one H100: see benchmarks/README.md).
WORKLOADS = {
    "moe-1b": {"preset": "moe-1b", "model": {}, "batch": 8, "seq_len": 2048,
               "trainer_rows": "train +compile", "variants": "+compile", "transformers": True},
    "k-exaone-shaped": {"preset": "k-exaone-236b",
                        "model": {"n_layers": 2, "n_experts": 16, "first_k_dense": 0, "mtp_layers": 0},
                        "batch": 1, "seq_len": 4096,
                        "trainer_rows": "train +compile", "variants": "", "transformers": False},
}
# --cpu-smoke: every workload at the tiny preset's shapes, the vocabulary still above the tokenizer's where the
# workload sets its own (as K-EXAONE's 153,600 is above the benchmark tokenizer's 32,768).
SMOKE = {"preset": "tiny", "batch": 2, "seq_len": 128}
SMOKE_ARGS = {"device": "cpu", "steps": 1, "warmup": 1, "docs": 3000, "vocab": 4096,
              "trainer_rows": "train", "variants": "sdpa+loop"}


def workload(args, name: str) -> dict:
    if not args.cpu_smoke:
        return WORKLOADS[name]
    vocab = {"vocab_size": 4 * args.vocab} if load_preset(WORKLOADS[name]["preset"]).vocab_size else {}
    return {**WORKLOADS[name], **SMOKE, "model": vocab}


def prepare_work(args, work: Path) -> None:
    """Ondol's own tokenizer (work/tokenizer) and prepared data (work/data) from ko_reviews + ko_docs; a folder
    that has both already (--work from an earlier run) is used as it is. Shards do not depend on seq_len."""
    if (work / "tokenizer").is_dir() and (work / "data").is_dir():
        print(f"reusing the tokenizer and data in {work}")
        return
    corpora = Path(os.environ.get("ONDOL_CORPORA", ROOT.parent / "shared" / "corpora"))
    sources = [SourceConfig(name="ko_reviews", path=str(corpora / "ko_reviews.jsonl.gz"), max_docs=args.docs),
               SourceConfig(name="ko_docs", path=str(corpora / "ko_docs.jsonl.gz"))]
    tok = train_tokenizer(TokenizerConfig(vocab_size=args.vocab, max_sentences=200_000), sources,
                          work / "tokenizer", seed=0)
    prepare(DataConfig(sources=sources, seq_len=WORKLOADS["moe-1b"]["seq_len"]), tok, work / "data", seed=0,
            progress=False)


def korean_batches(args, w: dict, work: Path) -> list[list[dict]]:
    """warmup + steps optimizer steps of GRAD_ACCUM micro-batches of real Korean text from the prepared data."""
    loader = TokenLoader(work / "data", "train", w["seq_len"], w["batch"], seed=0)
    return [[next(loader) for _ in range(GRAD_ACCUM)] for _ in range(args.warmup + args.steps)]


def model_config(w: dict, work: Path):
    """The workload's model; vocabulary: the preset's own (K-EXAONE's 153,600), else the tokenizer's."""
    cfg = load_preset(w["preset"], **w["model"], max_seq_len=max(w["seq_len"], 4096))
    return cfg if cfg.vocab_size else replace(cfg, vocab_size=Tokenizer.load(work / "tokenizer").vocab_size)


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
    """One optimizer step over a list of micro-batches (gradients accumulated, the loss averaged)."""
    def step(micro_batches):
        total = 0.0
        for batch in micro_batches:
            if hf:
                loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            else:
                out = model(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"])
                loss = out.loss + out.aux_loss
            (loss / len(micro_batches)).backward()
            total += loss.detach() / len(micro_batches)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not hf:
            model.update_router_biases()
        return total
    return step


def measure(name: str, variant: dict, base_cfg, batches, args, device, w: dict) -> dict:
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
    use = [[{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in group] for group in batches]
    if hf:
        use = [[{**b, "labels": b["input_ids"]} for b in group] for group in use]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for group in use[: args.warmup]:
        step(group)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step(group) for group in use[args.warmup:]]
    sync()
    elapsed = time.perf_counter() - start
    tps = w["batch"] * w["seq_len"] * GRAD_ACCUM * args.steps / elapsed
    row = {"variant": name, "tokens_per_s": tps, "tflops": tps * train_flops_per_token(cfg, w["seq_len"]) / 1e12,
           "loss": float(losses[-1]),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
           "syncs_per_step": count_host_syncs(step, use[-1], device)}
    row.update(time_shares(step, use[-1], device))
    return row


def count_host_syncs(step, batch, device) -> float:
    """Host synchronizations one training step makes (on CUDA each stalls the GPU pipeline)."""
    with HostSyncCounter(device) as syncs:
        step(batch) if batch is not None else step()
    if syncs.count:
        print(f"  host syncs: {dict(syncs.sites)}")
    return float(syncs.count)


def trainer_config(overrides: list[str], args, work: Path, w: dict, device: torch.device):
    """A run config as a user would write it: the workload's model, this run's tokenizer and data, then the
    overrides."""
    run = Path(tempfile.mkdtemp(prefix="train-", dir=work))
    (run / "data").symlink_to(work / "data", target_is_directory=True)
    cuda = device.type == "cuda"
    preset = Path(w["preset"]) if Path(w["preset"]).suffix else PRESET_DIR / f"{w['preset']}.yaml"
    model = {**yaml.safe_load(preset.read_text(encoding="utf-8")), **w["model"],
             "vocab_size": model_config(w, work).vocab_size, "max_seq_len": max(w["seq_len"], 4096)}
    config = {"run_dir": str(run), "seed": 0, "tokenizer": {"path": str(work / "tokenizer")},
              "data": {"seq_len": w["seq_len"]}, "model": model,
              "train": {"steps": 1 << 30, "micro_batch_size": w["batch"], "grad_accum": GRAD_ACCUM,
                        "eval_bpb_tokens": 0, "resume": "never"},
              "deepspeed": {"zero_stage": 1 if cuda else 0, "precision": "bf16" if cuda else "fp32"},
              "logging": {"progress": False, "wandb_mode": "disabled", "peak_tflops": args.peak_tflops}}
    path = run / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return load_config(path, [*args.train_overrides, *overrides])


def measure_trainer(name: str, overrides: list[str], args, work: Path, device: torch.device, w: dict) -> dict:
    """The `Trainer` step itself, as `ondol train` runs it (without evaluation, logging and checkpoints)."""
    from ondol.train.trainer import Trainer

    trainer = Trainer(trainer_config(overrides, args, work, w, device))
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
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32768, help="the benchmark tokenizer's vocabulary")
    p.add_argument("--docs", type=int, default=200_000, help="ko_reviews documents to tokenize for batches")
    p.add_argument("--work", help="folder for the tokenizer and data, reused when both are there (default: a "
                                  "temporary one)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak; 0: by device name")
    p.add_argument("--variants", help="bare-loop rows, comma-separated subset of " + ",".join(VARIANTS)
                   + " (default: each workload's own; empty: none)")
    p.add_argument("--transformers", choices=("on", "off"), help="transformers' row (default: each workload's)")
    p.add_argument("--trainer-rows", help="comma-separated subset of " + ",".join(TRAINER_ROWS)
                   + " (default: each workload's own; empty: none)")
    p.add_argument("--train-overrides", nargs="*", default=[],
                   help="config overrides for every trainer row, e.g. deepspeed.zero_stage=2 optim.adamw=foreach")
    p.add_argument("--cpu-smoke", action="store_true", help="the same code on CPU at tiny shapes, one step per row")
    p.add_argument("--row", nargs=3, metavar=("WORKLOAD", "KIND", "NAME"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cpu_smoke:
        for key, value in SMOKE_ARGS.items():
            setattr(args, key, value)
    device = torch.device(args.device)
    if args.row:  # a child: one row, printed as the last line of its output
        print(ROW_MARK + json.dumps(run_row(args, device, Path(args.work), *args.row)), flush=True)
        return
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch).resolve()
        work.mkdir(parents=True, exist_ok=True)
        prepare_work(args, work)
        for name in args.workloads.split(","):
            report(args, device, work, name)


ROW_MARK = "ROW "


def run_row(args, device: torch.device, work: Path, name: str, kind: str, row: str) -> dict:
    w = workload(args, name)
    if kind == "trainer":
        return measure_trainer(row, TRAINER_ROWS[row], args, work, device, w)
    return measure(row, VARIANTS.get(row, {}), model_config(w, work), korean_batches(args, w, work), args, device, w)


def in_own_process(args, work: Path, name: str, kind: str, row: str) -> dict:
    """One row in a fresh process: whatever it allocates (a DeepSpeed engine, compiled graphs, the CUDA caching
    allocator's blocks) is gone before the next row starts, and its peak memory is its own."""
    argv = [sys.executable, __file__, *sys.argv[1:], "--work", str(work), "--row", name, kind, row]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    result = {"variant": row, "skipped": "its process failed (output above)"}
    for line in child.stdout:
        if line.startswith(ROW_MARK):
            result = json.loads(line[len(ROW_MARK):])
        else:
            print(line, end="", flush=True)
    child.wait()
    return result


def report(args, device: torch.device, work: Path, name: str) -> None:
    """One workload: its memory plan, then each row in its own process, then the tables."""
    w = workload(args, name)
    cfg = model_config(w, work)
    counts = param_counts(cfg)
    peak = peak_tflops(device, args.peak_tflops)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n== {name} | device {gpu} | {counts['total'] / 1e6:,.1f}M total, {counts['active'] / 1e6:,.1f}M "
          f"active, vocabulary {cfg.vocab_size:,} | {GRAD_ACCUM} x {w['batch']} x {w['seq_len']} tokens per step | "
          f"{args.steps} steps after {args.warmup} warm-up | peak {peak or 'unknown'} TFLOP/s | "
          f"torch {torch.__version__}")
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    plan = plan_for_config(trainer_config(args.train_overrides, args, work, w, device), 1, 1)
    print("memory of the `ondol train` rows as `ondol plan` computes it (train/memory.py):")
    print("\n".join("  " + line for line in table(plan, gpu_gib)))

    def chosen(given: str | None, own: str) -> list[str]:
        return [n for n in (own if given is None else given).split(",") if n]

    trained = [in_own_process(args, work, name, "trainer", n) for n in chosen(args.trainer_rows, w["trainer_rows"])]
    rows = [in_own_process(args, work, name, "bare", n) for n in chosen(args.variants, w["variants"])]
    if w["transformers"] if args.transformers is None else args.transformers == "on":
        rows.append(in_own_process(args, work, name, "bare", "transformers"))
    ref = next((r for r in rows if r["variant"] == "transformers" and "skipped" not in r), None)

    def common(r: dict) -> str:
        mfu = f"{100 * r['tflops'] / peak:5.1f}%" if peak else "   n/a"
        vs = f"{r['tokens_per_s'] / ref['tokens_per_s']:6.2f}" if ref else "   n/a"
        return (f"{r['variant']:<26} {r['tokens_per_s']:>10,.0f} {r['tflops']:>8.1f} {mfu:>6} "
                f"{r['peak_mem_gib']:>8.1f} {r['syncs_per_step']:>6.0f} {r['loss']:>8.4f} {vs}")

    columns = f"{'variant':<26} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8} {'syncs':>6} {'loss':>8} " \
              f"{'x HF':>6}"
    tables = [(f"`ondol train` step ({' '.join(args.train_overrides) or 'default keys'})", trained,
               f"{columns} {'fwd ms':>7} {'bwd ms':>7} {'opt ms':>7} {'other':>7}",
               lambda r: f"{r['forward_ms']:>7.1f} {r['backward_ms']:>7.1f} {r['step_ms']:>7.1f} {r['other_ms']:>7.1f}"),
              ("bare loop", rows, f"{columns} {'attn':>6} {'moe':>6} {'rest':>6}",
               lambda r: f"{100 * r['attention']:>5.1f}% {100 * r['moe']:>5.1f}% {100 * r['rest']:>5.1f}%")]
    for title, found, head, extra in tables:
        if not found:
            continue
        print(f"\n{name}: {title}\n{head}\n" + "-" * len(head))
        for r in found:
            print(f"{r['variant']:<26} skipped: {r['skipped']}" if "skipped" in r else f"{common(r)} {extra(r)}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
