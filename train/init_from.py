"""`train.init_from`: a run that starts from another run's trained weights (supervised fine-tuning, or any later
stage in a run folder of its own) with this run's own, fresh optimizer and learning-rate schedule.

It names a run folder (its final weights, RUN_DIR/model) or a model folder in Ondol's format. The weights are
used only when this run starts (step 0, no checkpoint of its own); a resume continues from this run's
checkpoints. Refused in one line (exit 6): a model whose config differs from this run's `model.*` (keys that may
change on resume aside), weights whose bytes do not match their SHA256SUMS, and weights trained with another
tokenizer than this run's (the ids would mean other pieces), read from the run's data/manifest.json, else its
latest checkpoint. The run keeps a copy of its tokenizer in RUN_DIR/tokenizer (when tokenizer.path is elsewhere),
so that `ondol export hf`, `ondol eval` and `ondol generate` read everything from the run's own folder.
"""

from __future__ import annotations

from pathlib import Path

from ondol.configs import config_dict
from ondol.data.shards import MANIFEST
from ondol.errors import ConfigError
from ondol.files import read_json, write_atomic
from ondol.model.io import CONFIG, load_config, verify_checksums
from ondol.tokenizer.tokenizer import META_FILE
from ondol.train import checkpoint, state_shards


def model_folder(init_from: str) -> tuple[Path, Path]:
    """(the weights' folder, the run folder that trained them)."""
    path = Path(init_from)
    if (path / "model" / CONFIG).is_file():
        return path / "model", path
    if (path / CONFIG).is_file():
        return path, path.parent
    raise ConfigError(f"train.init_from={init_from}: neither a run folder with model/{CONFIG} (a run trained to "
                      f"its end) nor a model folder with {CONFIG}")


def trained_tokenizer(run: Path) -> str | None:
    """The fingerprint of the tokenizer a run trained with: its prepared data's, else its latest checkpoint's."""
    if (run / "data" / MANIFEST).is_file():
        return read_json(run / "data" / MANIFEST, checkpoint.IncompatibleCheckpoint,
                         "prepare that run's data again")["tokenizer"]["fingerprint"]
    latest = checkpoint.latest_checkpoint(run / "checkpoints")
    return None if latest is None else checkpoint.read_meta(latest).get("tokenizer_fingerprint")


def load_initial_weights(engine, optimizer, init_from: str, meta: dict, tokenizer_dir: Path) -> str:
    """Set the engine's weights (and fp32 master weights) from init_from after checking that they fit this run
    (meta: the trainer's, with this run's model config and tokenizer fingerprint); the line to log."""
    folder, run = model_folder(init_from)
    refuse = checkpoint.IncompatibleCheckpoint
    verify_checksums(folder)
    if changed := checkpoint.model_changes(config_dict(load_config(folder)), meta["model"]):
        raise refuse(f"train.init_from={init_from}: its model differs from this run's ({'; '.join(changed)}): "
                     f"set model.* as in {folder / CONFIG}")
    trained = trained_tokenizer(run)
    if trained is None:
        raise refuse(f"train.init_from={init_from}: cannot tell which tokenizer trained it (no {run / 'data'}/"
                     f"{MANIFEST} or checkpoint in {run}): point it at the run folder")
    if trained != meta["tokenizer_fingerprint"]:
        raise refuse(f"train.init_from={init_from}: trained with tokenizer {trained}, but this run's at "
                     f"{tokenizer_dir} is {meta['tokenizer_fingerprint']}: set tokenizer.path={run / 'tokenizer'}")
    state_shards.load(engine, optimizer, folder, adam_steps=None)
    return f"initialised from {folder} (weights only: the optimizer and learning-rate schedule are this run's)"


def keep_tokenizer(tokenizer_dir: Path, run_dir: Path) -> None:
    """Copy the tokenizer's files into RUN_DIR/tokenizer when it is not there (meta.json last: Tokenizer.load
    needs it, so an interrupted copy is redone)."""
    kept = run_dir / "tokenizer"
    if (kept / META_FILE).is_file() or kept.resolve() == tokenizer_dir.resolve():
        return
    kept.mkdir(parents=True, exist_ok=True)
    files = sorted((p for p in tokenizer_dir.iterdir() if p.is_file() and not p.is_symlink()),
                   key=lambda p: p.name == META_FILE)
    for path in files:
        write_atomic(kept / path.name, path.read_bytes())
