"""Crash-safe DeepSpeed checkpoints: RUN_DIR/checkpoints/step_XXXXXXXX/ plus a `latest` pointer.

A checkpoint counts only once its `meta.json` exists. Order of a save: stale folder of the same tag removed,
DeepSpeed writes model/optimizer shards (every rank), each rank writes its RNG states and fsyncs the folder,
barrier, the ranks hash the files (xxh3-128, each rank a share), then rank 0 writes meta.json (with every file's
size and digest) and swaps `latest`, both by temp + fsync + rename. A crash at any point before the rename leaves
`latest` on the previous complete checkpoint; a folder without meta.json is ignored and later removed. A
checkpoint is damaged, skipped with one line so that the previous complete one is used, when its files no longer
match the sizes and digests in its meta.json (truncated, deleted, flipped bytes), when meta.json is unreadable or
records another step than the folder's name, or when the folder or a file in it is a symbolic link: checkpoints
are read only from inside RUN_DIR/checkpoints, and pruning never follows a link.
meta.json also carries what decides compatibility (model shape, tokenizer, data), checked before DeepSpeed
reads anything, so a mismatch is refused with a message instead of a tensor-shape traceback.

Nothing is unpickled with `weights_only=False`: RNG states are stored as tensors and plain values, and
DeepSpeed's own files are read through a checkpoint engine that loads weights-only with an allow-list of the
three DeepSpeed classes its optimizer files contain.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ondol.errors import TrainError
from ondol.files import file_digests, fsync_tree, write_atomic
from ondol.model.config import ModelConfig
from ondol.train import expert_parallel, state_shards

META, LATEST, CLIENT_STATE = "meta.json", "latest", "client_state.pt"
# Each file's digest in meta.json: xxHash, fast enough to check at every resume (a few % of a load), and made to
# catch damaged bytes; it is no signature (whoever can rewrite a checkpoint can rewrite its meta.json)
DIGEST = "xxh3_128"
LAYOUT_KEYS = ("world_size", "expert_parallel_size", "zero_stage")  # how weights and optimizer state are split
_TAG = re.compile(r"^step_(\d{8})$")
# The model keys that may change on resume: how the same function is computed (kernels) and training-only terms
# (balancing, auxiliary losses, initialisation). Every other model key shapes the parameters or defines the
# function they compute (window, rope_theta, max_seq_len, layer pattern, experts, ...) and must match.
RESUMABLE_MODEL_KEYS = ("attn_backend", "moe_dispatch", "bias_update_rate", "aux_loss_coef", "z_loss_coef",
                        "mtp_loss_weight", "init_std")
# Run settings a resume must keep: the seed orders the data, the precision decides DeepSpeed's optimizer state.
RUN_KEYS = (("seed", "seed"), ("precision", "deepspeed.precision"))


class IncompatibleCheckpoint(TrainError):
    """The checkpoint cannot continue this run (different model shape, tokenizer, data or ZeRO layout)."""


class CheckpointNotSaved(TrainError):
    """Writing a checkpoint failed (disk full, quota, permissions): nothing complete was replaced."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(folder: Path) -> bool:
    return (folder / META).is_file()


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _TAG.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def damage(folder: Path, verify: bool = True) -> str | None:
    """What is wrong with a complete checkpoint (None: intact): a symbolic link for the folder, meta.json or a
    file; meta.json unreadable or recording another step than the folder's name; a file missing, or not of the
    size and digest meta.json recorded (digests only when `verify`). Checkpoints from before sizes or
    digests were recorded are checked for what they have."""
    if folder.is_symlink():
        return f"{folder} is a symbolic link (checkpoints are read only from inside {folder.parent})"
    if (folder / META).is_symlink():
        return f"{folder / META} is a symbolic link"
    try:
        meta = read_meta(folder)
    except (ValueError, OSError) as e:
        return f"{folder / META} is unreadable ({e})"
    if not isinstance(meta, dict):
        return f"{folder / META} is not a JSON object"
    named = _TAG.match(folder.name)
    if named and meta.get("step") != int(named.group(1)):
        return f"{folder / META} records step {meta.get('step')}, its folder's name step {int(named.group(1))}"
    files = meta.get("files", {})
    for name, size in files.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or path.is_symlink():
            return f"{path} is a symbolic link or outside {folder}"
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size:,} bytes, {META} recorded {size:,}"
    recorded = sorted((n, d) for n, d in meta.get(DIGEST, {}).items() if verify and n in files)
    for (name, digest), found in zip(recorded, file_digests([folder / name for name, _ in recorded], DIGEST)):
        if found != digest:
            return f"{folder / name} does not have the {DIGEST} digest {META} recorded (its bytes changed)"
    return None


def latest_checkpoint(ckpt_dir: Path, report: Callable[[str], None] | None = None) -> Path | None:
    """The newest intact complete checkpoint (None: nothing to resume). `latest` is followed only when it names a
    direct child of `ckpt_dir`; a damaged checkpoint is skipped with one line passed to `report`."""
    candidates = complete_checkpoints(ckpt_dir)[::-1]
    pointer = ckpt_dir / LATEST
    if pointer.is_file() and not pointer.is_symlink():
        named = pointer.read_text(encoding="utf-8").strip()
        first = [p for p in candidates if _TAG.match(named) and p.name == named]
        candidates = first + [p for p in candidates if p not in first]
    for folder in candidates:
        problem = damage(folder)
        if problem is None:
            return folder
        if report is not None:
            report(f"skipping damaged checkpoint {folder.name}: {problem}")
    return None


def rng_states() -> dict:
    """This process's RNG states as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {"python": [version, list(internal), gauss],
             "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": np_state["state"]["pos"], "has_gauss": np_state["has_gauss"],
                       "gauss": np_state["gauss"]},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                                                                "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _deepspeed_safe_globals() -> list:
    """The classes DeepSpeed pickles into its ZeRO optimizer files besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | Path, map_location=None):
    """torch.load that cannot run code: weights-only, DeepSpeed's few classes allowed by name."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def use_weights_only_loading(engine) -> None:
    """Make `engine.load_checkpoint` read every file weights-only (DeepSpeed's engine passes
    weights_only=False)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location)

    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, meta: dict, rank: int, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    tag = tag_for(step)
    folder = ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove(folder)  # a partial save from a crash, a re-save of the same step, or a link put in its place
    dist.barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        expert_parallel.save_expert_shards(engine.module, folder)  # DeepSpeed leaves expert-parallel weights out
        # the same state as per-rank shards: what a resume on another layout and `ondol export hf` read
        state_shards.save(engine, engine.client_optimizer, folder, rank, dist.get_world_size(), with_optimizer=True)
        if rank == 0:
            torch.save(client_state, folder / CLIENT_STATE)
        torch.save(rng_states(), folder / f"rng_rank{rank}.pt")
        fsync_tree(folder)  # what this rank wrote is on disk before meta.json can say the checkpoint is complete
        dist.barrier()
        files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        digests = _digests(folder, sorted(files), rank, dist.get_world_size())
        if rank == 0:
            record = {**meta, "step": step, "files": files, DIGEST: digests}
            write_atomic(folder / META, json.dumps(record, indent=2) + "\n")
    except (OSError, RuntimeError) as e:  # a full disk or quota: the partial folder goes, the previous stay
        if isinstance(e, RuntimeError) and "PytorchStreamWriter" not in str(e) and "inline_container" not in str(e):
            raise  # torch.save reports a short write as a RuntimeError from its zip writer; any other is a bug
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "a file could not be written whole"
        raise CheckpointNotSaved(f"could not save checkpoint {folder}: {reason}; the previous checkpoints "
                                 f"are kept: free space under {ckpt_dir} (or lower train.keep_last) and run the "
                                 "same command again to resume") from e
    if rank == 0:
        write_atomic(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep_last, keep=folder)
    dist.barrier()
    return folder


def _digests(folder: Path, names: list[str], rank: int, world_size: int) -> dict[str, str]:
    """Collective: the digest of every file, each rank hashing every world_size-th one; the whole on every rank."""
    mine = dict(zip(names[rank::world_size], file_digests([folder / n for n in names[rank::world_size]], DIGEST)))
    shares = [None] * world_size
    dist.all_gather_object(shares, mine)
    return {name: share[name] for share in shares for name in share}


def _remove(folder: Path) -> None:
    """Remove a checkpoint folder; a symbolic link in its place is unlinked, never followed."""
    if folder.is_symlink():
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder)


def _prune(ckpt_dir: Path, keep_last: int, keep: Path) -> None:
    """Keep the newest `keep_last` complete checkpoints; remove older ones and every incomplete leftover. A
    symbolic link is not this run's checkpoint: it is neither counted nor removed."""
    own = [p for p in ckpt_dir.iterdir() if _TAG.match(p.name) and not p.is_symlink()]
    complete = sorted((p for p in own if is_complete(p)), key=lambda p: p.name)
    doomed = [p for p in complete[:-keep_last] if p != keep] + [p for p in own if not is_complete(p)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META).read_text(encoding="utf-8"))


def layout_changed(folder: Path, meta: dict) -> bool:
    """Whether the checkpoint was written on another world size, expert-parallel size or ZeRO stage."""
    saved = {"expert_parallel_size": 1, **read_meta(folder)}
    return any(saved.get(k) != meta.get(k) for k in LAYOUT_KEYS)


def describe_layout(folder: Path) -> str:
    saved = {"expert_parallel_size": 1, **read_meta(folder)}
    return ", ".join(f"{k} {saved.get(k)}" for k in LAYOUT_KEYS)


def model_changes(saved: dict, model: dict) -> list[str]:
    """'model.KEY: old -> new' for each model key outside RESUMABLE_MODEL_KEYS that differs (a key the checkpoint
    predates counts as its default, the behaviour it was trained with)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    changed = []
    for key, value in model.items():
        old = saved.get(key, defaults.get(key))
        if key not in RESUMABLE_MODEL_KEYS and old != value:
            changed.append(f"model.{key}: {old!r} -> {value!r}")
    return changed


def check_compatible(folder: Path, meta: dict, phases_declared: bool = False,
                     allow_seq_len_change: bool = False) -> list[str]:
    """Refuse a checkpoint whose model, tokenizer, data or past phases (train/phases.py: the mixture, sequence
    length and rate of every step trained) differ from this run's, or whose layout (world size, expert-parallel
    size, ZeRO stage) differs where no reshard can bridge it. Returns the deliberate changes it accepts, one line
    each: the phases still ahead, and with `allow_seq_len_change` (or a phase ahead that needs it) a longer
    context: data.seq_len and a larger model.max_seq_len."""
    from ondol.train import phases

    saved = read_meta(folder)
    step = int(saved.get("step", 0))
    plan = [phases.Phase(**p) for p in meta["phases"]]
    old_plan = phases.from_meta(saved, plan)
    seq_len_changes, past = phases.past_changes(old_plan, plan, step, phases_declared)
    accepted = []
    longer = max((p.seq_len for p in plan if p.end > step), default=0) > saved["model"].get("max_seq_len", 0)
    changed = []
    for change in model_changes(saved["model"], meta["model"]):
        old_max, new_max = saved["model"].get("max_seq_len"), meta["model"]["max_seq_len"]
        if change.startswith("model.max_seq_len:") and new_max > old_max and (allow_seq_len_change or longer):
            accepted.append(change)
        else:
            changed.append(change)
    for key, what in (("tokenizer_fingerprint", "tokenizer fingerprint"), ("data_hash", "prepared data hash")):
        if saved.get(key) != meta.get(key):
            changed.append(f"{what}: {saved.get(key)!r} -> {meta.get(key)!r}")
    changed += past
    if allow_seq_len_change:
        accepted += seq_len_changes
    else:
        changed += seq_len_changes
    for key, what in RUN_KEYS:  # checkpoints from before they were recorded are not checked
        if key in saved and saved[key] != meta.get(key):
            changed.append(f"{what}: {saved[key]!r} -> {meta.get(key)!r}")
    if saved.get("optimizer", "adamw") != meta.get("optimizer", "adamw"):  # its state is another optimizer's
        changed.append(f"optim.name: {saved.get('optimizer', 'adamw')!r} -> {meta.get('optimizer', 'adamw')!r}")
    reshardable = (folder / CLIENT_STATE).is_file()  # any stage from the per-rank shards (state_shards)
    for key in ("zero_stage", "expert_parallel_size"):  # both decide how optimizer state is laid out
        if saved.get(key, 1 if key == "expert_parallel_size" else None) != meta.get(key) and not reshardable:
            changed.append(f"deepspeed.{key}: {saved.get(key)} -> {meta.get(key)}")
    if changed:
        hint = (" (or set train.allow_seq_len_change=true to go on at the new length)" if seq_len_changes and
                not allow_seq_len_change else "")
        raise IncompatibleCheckpoint(
            f"cannot resume from {folder}: {'; '.join(changed)}. Restore the original setting{hint}, point "
            f"train.resume at a compatible checkpoint, or start over with train.resume=never")
    if future := phases.future_change(old_plan, plan, step):
        accepted.append(f"phases {future}")
    return accepted


def load(engine, folder: Path, rank: int, seed: int) -> dict:
    """Load weights, optimizer and this rank's RNG states; returns the client state saved with them."""
    use_weights_only_loading(engine)
    sharded = expert_parallel.expert_parallel_layers(engine.module) or list(folder.glob(expert_parallel.SHARD_GLOB))
    _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=False,
                                             custom_load_fn=expert_parallel.checkpoint_load_fn(folder) if sharded
                                             else None)
    if client_state is None:
        raise IncompatibleCheckpoint(f"DeepSpeed could not load {folder} (see its log above)")
    _restore_rng(folder, rank, seed)
    return client_state


def load_resharded(engine, folder: Path, rank: int, seed: int) -> dict:
    """Like `load`, for a checkpoint written on another layout (any ZeRO stage): weights, fp32 master partitions
    and Adam state from the per-rank shards, each rank reading only its own rows; returns the client state."""
    client_state = torch.load(folder / CLIENT_STATE, weights_only=True)
    applied = int(client_state["step"]) - int(client_state["nonfinite"]["total"])  # skipped steps: no Adam step
    state_shards.load(engine, engine.client_optimizer, folder, applied)
    _restore_rng(folder, rank, seed)
    return client_state


def _restore_rng(folder: Path, rank: int, seed: int) -> None:
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_states(torch.load(rng_file, weights_only=True))
    else:  # more ranks than when saved: a fresh, reproducible stream per new rank
        random.seed(seed + rank)
        np.random.seed(seed + rank)
        torch.manual_seed(seed + rank)


def model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The fp32 model weights of a complete checkpoint, read without an engine (for evaluation)."""
    if state_shards.has_shards(folder):
        from ondol.model.io import load_state_dict

        return {k: v.float() for k, v in load_state_dict(folder).items()}
    if list(folder.glob(expert_parallel.SHARD_GLOB)):
        raise IncompatibleCheckpoint(f"{folder} holds expert-parallel shards: evaluate the final weights "
                                     f"(RUN_DIR/model) or resume the run on its expert-parallel layout")
    if read_meta(folder).get("zero_stage") == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in states["module"].items()}
