"""Generation with a KV cache and MTP self-speculative decoding, and the training cost of one MTP layer.

Three tables (CPU, best of --repeats, since the cores may be shared):
  1. cache:       greedy generation of --cache-lengths tokens on the tiny preset, recomputing the context for every
                  token (use_cache=False, Ondol before the cache) against the KV cache, eager and compiled
                  (compile=True; its one-time compile warm-up is printed under the table); outputs must agree.
  2. speculative: greedy vs MTP self-speculative decoding with a run trained with model.mtp_layers=1
                  (--run RUN_DIR, e.g. `ondol run configs/tiny-ko.yaml model.mtp_layers=1`) on held-out
                  Korean prompts: acceptance rate, main-model forwards, wall time; outputs must agree.
  3. training:    forward+backward+AdamW step time of the moe-1b geometry (--train-layers of its 16, so that
                  it fits beside other jobs; --train-tokens per step) with and without one MTP layer,
                  against the ratio of their training FLOPs (model.flops).

  .venv/bin/python benchmarks/generation.py --run runs/tiny-ko-mtp
  .venv/bin/python benchmarks/generation.py --skip-training
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ondol.model.config import load_preset
from ondol.model.flops import train_flops_per_token
from ondol.model.generate import generate
from ondol.model.transformer import Transformer


def best_time(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def cache_table(args) -> Table:
    torch.manual_seed(0)
    model = Transformer(load_preset("tiny", vocab_size=4096)).eval()
    prompt = torch.randint(0, 4096, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    table = Table(title=f"tiny preset: greedy generation after a {args.prompt_tokens}-token prompt")
    for col in ("new tokens", "no cache (before) s", "no cache tokens/s", "KV cache s", "KV cache tokens/s",
                "speedup", "compiled s", "compiled tokens/s", "speedup", "same output"):
        table.add_column(col)
    t0 = time.perf_counter()
    generate(model, prompt, 2, compile=True)  # compiles the one-token step once per process
    table.caption = f"compile warm-up (first compiled call, once per process): {time.perf_counter() - t0:.1f} s"
    for n in args.cache_lengths:
        t_ref, ref = best_time(lambda n=n: generate(model, prompt, n, use_cache=False), args.repeats)
        t_kv, got = best_time(lambda n=n: generate(model, prompt, n), args.repeats)
        t_c, got_c = best_time(lambda n=n: generate(model, prompt, n, compile=True), args.repeats)
        table.add_row(str(n), f"{t_ref:.2f}", f"{n / t_ref:.0f}", f"{t_kv:.2f}", f"{n / t_kv:.0f}",
                      f"{t_ref / t_kv:.1f}x", f"{t_c:.2f}", f"{n / t_c:.0f}", f"{t_ref / t_c:.1f}x",
                      str(got == ref == got_c))
    return table


def speculative_table(args) -> Table:
    from ondol.configs import data_dir, load_config, model_dir, tokenizer_dir
    from ondol.data.shards import first_documents
    from ondol.model.io import load_pretrained
    from ondol.tokenizer.tokenizer import Tokenizer

    cfg = load_config(Path(args.run) / "config.yaml", [])
    model = load_pretrained(model_dir(cfg)).eval()
    tok = Tokenizer.load(tokenizer_dir(cfg))
    texts = first_documents(data_dir(cfg), "val", tok, args.prompts)  # held out, as `ondol run` prompts
    prompts = [[tok.bos_id, *tok.encode(" ".join(t.split()[:5]))] for t in texts]
    table = Table(title=f"{args.run}: greedy vs MTP self-speculative, {args.prompts} held-out prompts x "
                        f"{args.new_tokens} tokens")
    for col in ("mode", "seconds", "main forwards", "drafted", "accepted", "acceptance", "speedup",
                "same output"):
        table.add_column(col)
    totals = {}
    for mode in ("greedy", "speculative"):
        seconds, outputs, counts = 0.0, [], {"forwards": 0, "drafted": 0, "accepted": 0}
        for prompt in prompts:
            stats = {}
            spec = mode == "speculative"
            t, out = best_time(lambda p=prompt, s=stats, spec=spec: generate(model, p, args.new_tokens,
                                                                             speculative=spec, stats=s),
                               args.repeats)
            seconds += t
            outputs.append(out)
            for k in counts:
                counts[k] += stats[k]
        totals[mode] = (seconds, outputs)
        same = "-" if mode == "greedy" else str(outputs == totals["greedy"][1])
        rate = f"{counts['accepted'] / counts['drafted']:.1%}" if counts["drafted"] else "-"
        table.add_row(mode, f"{seconds:.2f}", str(counts["forwards"]), str(counts["drafted"]),
                      str(counts["accepted"]), rate, f"{totals['greedy'][0] / seconds:.2f}x", same)
    return table


def training_table(args) -> Table:
    table = Table(title=f"moe-1b geometry, {args.train_layers} layers, vocab 32,768, on CPU: one training step "
                        f"of {args.train_tokens} tokens")
    for col in ("model", "seconds/step", "time ratio", "FLOPs/token", "FLOPs ratio"):
        table.add_column(col)
    base = load_preset("moe-1b", vocab_size=32768, n_layers=args.train_layers)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32768, (1, args.train_tokens + 1), generator=g)
    rows = {}
    for name, cfg in (("no MTP", base), ("1 MTP layer", dataclasses.replace(base, mtp_layers=1))):
        torch.manual_seed(0)
        model = Transformer(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            out = model(ids[:, :-1], labels=ids[:, 1:])
            (out.loss + out.aux_loss + out.mtp_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up: allocations, AdamW state
        rows[name] = (best_time(step, args.repeats)[0], train_flops_per_token(cfg, args.train_tokens))
        del model, opt
    t0, f0 = rows["no MTP"]
    for name, (t, f) in rows.items():
        table.add_row(name, f"{t:.2f}", f"{t / t0:.3f}", f"{f:.3g}", f"{f / f0:.3f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-lengths", type=lambda v: [int(x) for x in v.split(",")], default=[64, 128, 256],
                        help="new-token counts of the cache table (comma-separated)")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt (speculative table)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run", help="a run trained with model.mtp_layers>=1 (speculative table)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--train-tokens", type=int, default=512)
    parser.add_argument("--train-layers", type=int, default=4,
                        help="layers of the moe-1b geometry (16, the preset, needs ~18 GB per model with AdamW)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on shared cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    console.print(cache_table(args))
    if args.run:
        console.print(speculative_table(args))
    if not args.skip_training:
        console.print(training_table(args))


if __name__ == "__main__":
    main()
