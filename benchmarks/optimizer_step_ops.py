"""Host cost of one optimizer step on CPU: host syncs per training step and aten ops in the optimizer step, for
the CUDA defaults emulated in bf16 (fused AdamW, chunked loss, grouped_mm experts) at ZeRO 0, 1 and 2, before
(`deepspeed.zero_checks=deepspeed`: DeepSpeed's own norm and checks) and after (`=device`, train/zero_step.py),
on the tiny model and on moe-1b's layer shapes at a few depths, so the op count can be read against the number
of parameter tensors. No time is measured: what a GPU would launch and wait for is counted. bf16 at ZeRO 0 ran
DeepSpeed's FP16_UnfusedOptimizer before (figures in benchmarks/README.md); it now runs stage 1 (no key brings the
old path back).

Syncs: train/host_syncs.HostSyncCounter over a whole `Trainer.train_step` (forward, backward, optimizer step,
router-bias update) after one warm-up step. Ops: aten ops dispatched inside the boundary `engine.step()` (clip,
checks, AdamW, copies back; ZeRO 2's gradient bucketing runs in the backward and is not counted), split into
kernels (ops that compute) and views (metadata only, no launch).

  .venv/bin/python benchmarks/optimizer_step_ops.py                        # tiny 2/4/8 layers, moe-1b 2/4
  .venv/bin/python benchmarks/optimizer_step_ops.py --presets tiny:2 tiny:4 --work-dir /tmp/opt
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
CUDA_DEFAULTS = ("deepspeed.precision=bf16", "optim.adamw=fused", "train.loss=chunked", "train.loss_chunk_tokens=128",
                 "model.moe_dispatch=grouped_mm", "logging.peak_tflops=1")  # no bf16 matmul probe for MFU
PATHS = {  # row name -> (overrides, overrides after) for a before -> after row, (overrides, None) for one path
    "fp32 ZeRO 0 foreach (the CPU default)": (("deepspeed.zero_stage=0", "optim.adamw=foreach",
                                                "deepspeed.precision=fp32"), None),
    "bf16 ZeRO 0 (runs DeepSpeed's stage 1)": (("deepspeed.zero_stage=0",), None),
    "bf16 ZeRO 1": (("deepspeed.zero_stage=1", "deepspeed.zero_checks=deepspeed"),
                    ("deepspeed.zero_stage=1", "deepspeed.zero_checks=device")),
    "bf16 ZeRO 2": (("deepspeed.zero_stage=2", "deepspeed.zero_checks=deepspeed"),
                    ("deepspeed.zero_stage=2", "deepspeed.zero_checks=device")),
}


def model_overrides(preset: str) -> list[str]:
    """`tiny:4` or `moe-1b:2`: configs/model/<name>.yaml with that many layers."""
    name, layers = preset.split(":")
    shape = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text(encoding="utf-8"))
    shape["n_layers"] = int(layers)
    return [f"model.{k}={v}" for k, v in shape.items()]


def step_counts(run: Path, assets: Path, overrides: tuple[str, ...]) -> dict:
    """Parameter tensors, host syncs in one training step, kernels and views in its optimizer step."""
    from golden import link_data, tiny_config

    from ondol.train.host_syncs import count_training_step
    from ondol.train.trainer import Trainer

    link_data(run, assets)
    trainer = Trainer(tiny_config(run, assets, "train.steps=3", "train.log_every=10", *overrides))
    syncs, ops = count_training_step(trainer)
    assert bool(trainer.optimizer.applied), "the counted step was skipped as non-finite"
    counts = {"tensors": sum(1 for _ in trainer.engine.module.parameters()), "syncs": syncs.count,
              "kernels": sum(ops.kernels.values()), "views": sum(ops.views.values()),
              "optimizer": type(trainer.engine.optimizer).__name__}
    trainer.engine.destroy()
    del trainer
    gc.collect()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny:2", "tiny:4", "tiny:8", "moe-1b:2", "moe-1b:4"],
                        help="configs/model/NAME.yaml:LAYERS")
    parser.add_argument("--work-dir", help="reuse a folder for the tokenizer and data (default: a temp dir)")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))  # the golden run's tiny assets
    from golden import build_assets

    table = Table(title="one optimizer step on CPU: host syncs per training step, aten kernels (+ views) in "
                        "engine.step(); before -> after = deepspeed.zero_checks deepspeed -> device")
    for col in ("model", "tensors", "path", "optimizer", "syncs", "kernels", "views"):
        table.add_column(col, justify="left" if col in ("model", "path", "optimizer") else "right")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        assets = build_assets(work / "assets")
        for preset in args.presets:
            for i, (name, (before, after)) in enumerate(PATHS.items()):
                shapes = (*model_overrides(preset), *CUDA_DEFAULTS)
                old = step_counts(work / "run", assets, (*shapes, *before))
                new = step_counts(work / "run", assets, (*shapes, *after)) if after else None
                pairs = [f"{old[k]}" if new is None else f"{old[k]} -> {new[k]}" for k in ("syncs", "kernels", "views")]
                table.add_row(preset if i == 0 else "", str(old["tensors"]) if i == 0 else "", name,
                              old["optimizer"], *pairs)
            table.add_section()
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
