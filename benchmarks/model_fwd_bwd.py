"""Forward+backward time of Ondol's model vs transformers' ExaoneMoeForCausalLM with the same config and weights.

Both models get the same weights (through the exporter's name mapping) and the same batch of real Korean text
(UTF-8 bytes of ko_reviews as token ids, so no tokenizer is needed); the table shows each one's loss on that
batch, which must agree, and fwd+bwd times (best and median of alternating rounds), Ondol once per expert
dispatch implementation.

    .venv/bin/python benchmarks/model_fwd_bwd.py                       # tiny + moe-1b (full size: ~20 GiB RAM)
    .venv/bin/python benchmarks/model_fwd_bwd.py --presets moe-1b --set n_layers=4 --batch 1 --seq 256
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from ondol.model.config import load_preset
from ondol.model.export import hf_config, hf_state_dict
from ondol.model.transformer import Transformer

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "ko_reviews.jsonl.gz"


def korean_batch(batch: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    need = batch * (seq + 1)
    data = bytearray()
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            data += json.loads(line)["text"].encode("utf-8") + b"\n"
            if len(data) >= need:
                break
    ids = (torch.tensor(list(data[:need])) % vocab).view(batch, seq + 1)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def measure(step, model: torch.nn.Module) -> tuple[float, float, float]:
    """(loss, wall seconds, process CPU seconds) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step()
    loss.backward()
    return float(loss.detach()), time.perf_counter() - t0, time.process_time() - c0


def bench_preset(name: str, overrides: dict, batch: int, seq: int, repeats: int, dispatches: list[str]) -> list:
    """Both models stay in memory and take turns step by step, so contention hits them alike; after a warm-up
    round. The best wall time of the rounds is the figure least distorted by other processes on shared cores
    (process CPU time is not immune either: in a VM it includes time the host takes away)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = load_preset(name, **overrides)
    ids, labels = korean_batch(batch, seq, cfg.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    hf_cfg = hf_config(cfg, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3})
    config = AutoConfig.for_model(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "torch_dtype")})
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model.state_dict(), cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    impl = getattr(hf.config, "_experts_implementation", None) or "default"

    def ondol_step(dispatch: str):
        def step():
            for moe in model.moe_layers():
                moe.experts.dispatch = dispatch
            return model(ids, labels=labels).loss
        return step

    def hf_step():
        logits = hf(ids).logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))

    contenders = [(f"ondol ({d})", ondol_step(d), model) for d in dispatches]
    contenders.append((f"transformers ({hf.config._attn_implementation}, experts {impl})", hf_step, hf))
    results: dict[str, list] = {label: [] for label, _, _ in contenders}
    for round_ in range(repeats + 1):
        for label, step, module in contenders:
            if round_:
                results[label].append(measure(step, module))
            else:
                measure(step, module)
    rows = []
    for label, runs in results.items():
        rows.append((label, runs[-1][0], min(r[1] for r in runs), statistics.median(r[1] for r in runs),
                     statistics.median(r[2] for r in runs)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "moe-1b"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=4096, help="vocab size (presets take theirs from a tokenizer)")
    parser.add_argument("--dispatch", nargs="+", default=["grouped_mm", "bmm_padded", "loop"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model overrides, e.g. n_layers=4")
    args = parser.parse_args()
    overrides = {"vocab_size": args.vocab}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = type(getattr(load_preset("tiny"), key))(value)
    console = Console()
    table = Table(title=f"fwd+bwd on CPU ({torch.get_num_threads()} threads), batch {args.batch} x {args.seq}, "
                        f"{args.repeats} rounds")
    for col in ("preset", "implementation", "loss", "best wall s", "median wall s", "median CPU s",
                "speed-up (best wall) vs transformers"):
        table.add_column(col)
    for name in args.presets:
        console.print(f"[bold]{name}[/] {overrides} ...")
        rows = bench_preset(name, overrides, args.batch, args.seq, args.repeats, args.dispatch)
        gc.collect()  # free this preset's two models before the next one is built
        hf_best = rows[-1][2]
        for impl, loss, best, wall, cpu in rows:
            table.add_row(name, impl, f"{loss:.6f}", f"{best:.3f}", f"{wall:.3f}", f"{cpu:.3f}", f"{hf_best / best:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
