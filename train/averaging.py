"""`ondol average RUN_DIR --last K`: the mean of the weights of a run's last K complete checkpoints, written as
a model folder (config.json, model.safetensors, SHA256SUMS: what RUN_DIR/model holds) that `ondol eval` and
`ondol generate` read with --checkpoint FOLDER and `ondol export hf FOLDER` exports (a folder inside RUN_DIR
finds the run's tokenizer beside it).

Each checkpoint is checked against the sizes and digests its meta.json recorded before anything is read; the
weights come from its per-rank state shards (train/state_shards.py), one tensor at a time from every
checkpoint, summed in float64 and divided once, so memory stays at K copies of the largest tensor and the
result does not depend on the order of the checkpoints. Averaging checkpoints taken at a constant rate stands in
for a decay (SWA, LAWA); after a decay to the floor the last checkpoint scored better here (README figures).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ondol.errors import ConfigError, ModelError
from ondol.files import write_atomic
from ondol.model.config import ModelConfig
from ondol.model.io import (
    CHECKSUMS,
    CONFIG,
    WEIGHTS,
    read_tensor,
    stored_dtype,
    tensor_index,
    write_checksums,
    write_safetensors,
)
from ondol.train import checkpoint, state_shards

RECORD = "average.json"  # which checkpoints, at which steps, with their weight files' digests


def chosen_checkpoints(run_dir: Path, last: int, verify: bool = True) -> list[Path]:
    """The last `last` complete, intact checkpoints of a run, oldest first."""
    ckpt_dir = run_dir / "checkpoints"
    found = checkpoint.complete_checkpoints(ckpt_dir)
    if len(found) < last:
        names = ", ".join(p.name for p in found) or "none"
        raise ConfigError(f"--last {last}: {ckpt_dir} holds {len(found)} complete checkpoint(s) ({names}); give "
                          "--last at most that, or keep more with train.keep_last when training")
    chosen = found[-last:]
    for folder in chosen:
        if problem := checkpoint.damage(folder, verify):
            raise checkpoint.IncompatibleCheckpoint(f"{problem}: the checkpoint is damaged; average fewer "
                                                    "(--last) or pass --no-verify to read it as it is")
        if not state_shards.has_shards(folder):
            raise ModelError(f"{folder}: written before per-rank weight shards; resume the run once to write "
                             "newer checkpoints, then average those")
    return chosen


def average(run_dir: str | Path, last: int, out: str | Path | None = None, verify: bool = True) -> Path:
    """Write the mean weights of the last `last` checkpoints of `run_dir` to `out` (default
    RUN_DIR/model-average); returns the folder."""
    run_dir = Path(run_dir)
    if last < 1:
        raise ConfigError(f"--last {last}: give a whole number >= 1")
    chosen = chosen_checkpoints(run_dir, last, verify)
    metas = [checkpoint.read_meta(folder) for folder in chosen]
    if any(m["model"] != metas[-1]["model"] for m in metas):
        raise ModelError(f"{run_dir}: the checkpoints {[p.name for p in chosen]} hold different models (their "
                         "meta.json 'model' differ); average checkpoints of one model only")
    indexes = [tensor_index(folder) for folder in chosen]
    names = list(indexes[-1])
    if any(list(index) != names or [i.shape for i in index.values()] != [i.shape for i in indexes[-1].values()]
           for index in indexes):
        raise ModelError(f"{run_dir}: the checkpoints {[p.name for p in chosen]} hold different tensors")
    # the dtype each tensor is stored in (fp32 weights; any other dtype is kept as stored)
    dtypes = {name: stored_dtype(chosen[-1], indexes[-1][name], name) for name in names}

    def mean(name: str) -> torch.Tensor:
        tensors = [read_tensor(folder, index[name], name) for folder, index in zip(chosen, indexes)]
        if not tensors[-1].is_floating_point():
            return tensors[-1]
        total = torch.zeros(tensors[-1].shape, dtype=torch.float64)
        for t in tensors:
            total += t.double()
        return (total / len(tensors)).to(tensors[-1].dtype)

    out = Path(out) if out is not None else run_dir / "model-average"
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / CHECKSUMS, *out.glob("model*.safetensors"), *out.glob("*.index.json")]:
        stale.unlink(missing_ok=True)
    write_safetensors(out / WEIGHTS, [(n, dtypes[n], indexes[-1][n].shape) for n in names], mean)
    write_atomic(out / CONFIG, json.dumps(ModelConfig(**metas[-1]["model"]).to_dict(), indent=2) + "\n")
    record = {"run_dir": str(run_dir), "checkpoints": [p.name for p in chosen], "steps": [m["step"] for m in metas],
              "digests": {p.name: m.get(checkpoint.DIGEST, {}) for p, m in zip(chosen, metas)}}
    write_atomic(out / RECORD, json.dumps(record, indent=1) + "\n")
    write_checksums(out, [CONFIG, WEIGHTS, RECORD])
    return out
