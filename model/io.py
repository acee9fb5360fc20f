"""Ondol's own weight format: RUN_DIR/model/{model.safetensors, config.json} (read by export and generate)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ondol.files import atomic_path, write_atomic
from ondol.model.config import ModelConfig
from ondol.model.transformer import Transformer

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_pretrained(model: Transformer, cfg: ModelConfig, out_dir: str | Path,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the weights (fp32 as trained; a tied LM head is stored once) and the model config.

    `state_dict` lets a sharded trainer (ZeRO-3) pass the consolidated weights instead of the module's own.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict() if state_dict is None else state_dict
    if cfg.tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    with atomic_path(out / WEIGHTS) as tmp:  # each file whole or not replaced; the config last
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp))
    write_atomic(out / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")
    return out


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point at a folder written by model.io.save_pretrained "
                                "(RUN_DIR/model)")
    raw = json.loads(path.read_text(encoding="utf-8"))
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown model config keys {unknown} (written by a newer Ondol?)")
    return ModelConfig(**raw)


def load_pretrained(model_dir: str | Path, device: str | torch.device = "cpu") -> Transformer:
    cfg = load_config(model_dir)
    model = Transformer(cfg)
    sd = load_file(str(Path(model_dir) / WEIGHTS), device=str(device))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{Path(model_dir) / WEIGHTS}: weights do not match config.json "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval()
