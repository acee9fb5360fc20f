"""Crash-safe DeepSpeed checkpoints: RUN_DIR/checkpoints/step_XXXXXXXX/ plus a `latest` pointer.

A checkpoint counts only once its `meta.json` exists. Order of a save: stale folder of the same tag removed,
DeepSpeed writes model/optimizer shards (every rank), each rank writes its RNG states, barrier, then rank 0
writes meta.json (fsync) and swaps `latest` by atomic rename. A crash at any point before the rename leaves
`latest` on the previous complete checkpoint; a folder without meta.json is ignored and later removed.
meta.json also carries what decides compatibility (model shape, tokenizer, data), checked before DeepSpeed
reads anything, so a mismatch is refused with a message instead of a tensor-shape traceback.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ondol.train import expert_parallel

META, LATEST = "meta.json", "latest"
_TAG = re.compile(r"^step_(\d{8})$")
# Fields whose change alters parameter shapes or their meaning; anything else may change on resume.
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "n_experts",
              "top_k", "n_shared_experts", "expert_hidden", "first_k_dense", "tie_embeddings", "qk_norm",
              "attn_sinks", "attn_pattern", "norm_placement", "router_score")


class IncompatibleCheckpoint(RuntimeError):
    """The checkpoint cannot continue this run (different model shape, tokenizer, data or ZeRO layout)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def is_complete(folder: Path) -> bool:
    return (folder / META).is_file()


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _TAG.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The folder `latest` names if it is complete, else the newest complete one (None: nothing to resume)."""
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        named = ckpt_dir / pointer.read_text(encoding="utf-8").strip()
        if _TAG.match(named.name) and is_complete(named):
            return named
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def rng_states() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict, meta: dict, rank: int, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    tag = tag_for(step)
    folder = ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # a partial save from a crash, or a re-save of the same step
            shutil.rmtree(folder)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    expert_parallel.save_expert_shards(engine.module, folder)  # DeepSpeed leaves expert-parallel weights out
    torch.save(rng_states(), folder / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        _write_atomic(folder / META, json.dumps({**meta, "step": step}, indent=2) + "\n")
        _write_atomic(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep_last, keep=folder)
    dist.barrier()
    return folder


def _prune(ckpt_dir: Path, keep_last: int, keep: Path) -> None:
    """Keep the newest `keep_last` complete checkpoints; remove older ones and every incomplete leftover."""
    complete = complete_checkpoints(ckpt_dir)
    doomed = [p for p in complete[:-keep_last] if p != keep]
    doomed += [p for p in ckpt_dir.iterdir() if _TAG.match(p.name) and not is_complete(p)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META).read_text(encoding="utf-8"))


def check_compatible(folder: Path, meta: dict) -> None:
    """Refuse a checkpoint whose model shape, tokenizer, data or ZeRO layout differs from this run's."""
    saved = read_meta(folder)
    changed = [f"model.{k}: {saved['model'].get(k)!r} -> {meta['model'].get(k)!r}" for k in SHAPE_KEYS
               if saved["model"].get(k) != meta["model"].get(k)]
    for key, what in (("tokenizer_fingerprint", "tokenizer"), ("data_hash", "prepared data"),
                      ("seq_len", "data.seq_len")):
        if saved.get(key) != meta.get(key):
            changed.append(f"{what}: {saved.get(key)!r} -> {meta.get(key)!r}")
    for key in ("zero_stage", "expert_parallel_size"):  # both decide how optimizer state is laid out
        if saved.get(key, 1 if key == "expert_parallel_size" else None) != meta.get(key):
            changed.append(f"deepspeed.{key}: {saved.get(key)} -> {meta.get(key)}")
    if changed:
        raise IncompatibleCheckpoint(
            f"cannot resume from {folder}: {'; '.join(changed)}. Restore the original setting, point "
            f"train.resume at a compatible checkpoint, or start over with train.resume=never")


def load(engine, folder: Path, rank: int, seed: int) -> dict:
    """Load weights, optimizer and this rank's RNG states; returns the client state saved with them."""
    sharded = expert_parallel.expert_parallel_layers(engine.module) or list(folder.glob(expert_parallel.SHARD_GLOB))
    _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=False,
                                             custom_load_fn=expert_parallel.checkpoint_load_fn(folder) if sharded
                                             else None)
    if client_state is None:
        raise IncompatibleCheckpoint(f"DeepSpeed could not load {folder} (see its log above)")
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_states(torch.load(rng_file, weights_only=False))
    else:  # more ranks than when saved: a fresh, reproducible stream per new rank
        random.seed(seed + rank)
        np.random.seed(seed + rank)
        torch.manual_seed(seed + rank)
    return client_state


def model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The fp32 model weights of a complete checkpoint, read without an engine (for evaluation)."""
    if list(folder.glob(expert_parallel.SHARD_GLOB)):
        raise IncompatibleCheckpoint(f"{folder} holds expert-parallel shards: evaluate the final weights "
                                     f"(RUN_DIR/model) or resume the run on its expert-parallel layout")
    if read_meta(folder).get("zero_stage") == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in states["module"].items()}
