"""Ondol's own weight format: RUN_DIR/model/ (read by export and generate) and the weights in a checkpoint.

A folder holds config.json and either one `model.safetensors` (a single writer) or per-rank shards
`model-RRRRR-of-WWWWW.safetensors` plus `model.index.json`: every rank of a multi-rank run writes only what it
owns, and no process ever holds the whole model to save it. The index names, for each tensor of the standard
(unsharded) state dict, its full shape and the pieces that make it up: [file, first row] for slices along dim 0
(a layer's experts split over expert-parallel ranks), or one piece [file, 0] for a whole tensor.
`tensor_index` / `read_tensor` read either layout one tensor at a time (each read opens and closes its files, so
no memory map outlives it and memory stays bounded by the tensor read).
A folder may carry SHA256SUMS (`sha256sum -c` reads it; `ondol export hf` writes one): loading it checks every
file it lists, so a same-size corruption is refused instead of loaded.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ondol.errors import ModelError
from ondol.files import atomic_path, file_digest, write_atomic
from ondol.model.config import ModelConfig
from ondol.model.transformer import Transformer

WEIGHTS, CONFIG, INDEX, CHECKSUMS = "model.safetensors", "config.json", "model.index.json", "SHA256SUMS"
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def tensor_bytes(dtype: torch.dtype, shape: list[int]) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def shard_name(prefix: str, rank: int, world: int) -> str:
    return f"{prefix}-{rank + 1:05d}-of-{world:05d}.safetensors"


@dataclass
class TensorInfo:
    shape: list[int]
    pieces: list[tuple[str, int]]  # (file, first row along dim 0)


def write_index(folder: str | Path, tensors: dict[str, TensorInfo], name: str = INDEX) -> None:
    """The index of a sharded folder (written once every shard is on disk: its presence marks them complete)."""
    body = {"format": "ondol-shards-v1",
            "tensors": {k: {"shape": v.shape, "pieces": [list(p) for p in v.pieces]} for k, v in tensors.items()}}
    write_atomic(Path(folder) / name, json.dumps(body, indent=1) + "\n")


def tensor_index(folder: str | Path, name: str = INDEX, single: str = WEIGHTS) -> dict[str, TensorInfo]:
    """Shape and pieces of every tensor in a folder, in the stored order, from its index or its single file."""
    folder = Path(folder)
    if (folder / name).is_file():
        body = json.loads((folder / name).read_text(encoding="utf-8"))
        return {k: TensorInfo(v["shape"], [tuple(p) for p in v["pieces"]]) for k, v in body["tensors"].items()}
    if not (folder / single).is_file():
        raise FileNotFoundError(f"{folder}: neither {single} nor {name}; point at a folder written by Ondol "
                                "(RUN_DIR/model or RUN_DIR/checkpoints/step_N)")
    with safe_open(str(folder / single), framework="pt") as f:
        return {k: TensorInfo(list(f.get_slice(k).get_shape()), [(single, 0)]) for k in f.keys()}  # noqa: SIM118


def read_tensor(folder: str | Path, info: TensorInfo, name: str, rows: tuple[int, int] | None = None
                ) -> torch.Tensor:
    """Tensor `name` (only rows [a, b) of dim 0, if given) assembled from its pieces."""
    folder = Path(folder)
    if rows is None and len(info.pieces) == 1:
        with safe_open(str(folder / info.pieces[0][0]), framework="pt") as f:
            return f.get_tensor(name)
    a, b = rows if rows is not None else (0, info.shape[0])
    out, covered = None, 0
    for file, start in sorted(info.pieces, key=lambda p: p[1]):
        with safe_open(str(folder / file), framework="pt") as f:
            part = f.get_slice(name)
            lo, hi = max(a, start), min(b, start + part.get_shape()[0])
            if lo >= hi:
                continue
            piece = part[lo - start:hi - start]
            if out is None:
                out = torch.empty([b - a, *info.shape[1:]], dtype=piece.dtype)
            out[lo - a:hi - a] = piece
            covered += hi - lo
            del piece
    if out is None or covered != b - a:
        raise ValueError(f"{folder}: the pieces of {name} do not cover rows [{a}, {b}) (shards missing?)")
    return out


def stored_dtype(folder: str | Path, info: TensorInfo, name: str) -> torch.dtype:
    """The dtype tensor `name` is stored in, from its first piece's safetensors header (no data is read)."""
    with safe_open(str(Path(folder) / info.pieces[0][0]), framework="pt") as f:
        return {v: k for k, v in DTYPES.items()}[f.get_slice(name).get_dtype()]


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder, whole (for single-process use: evaluation, generation, tests)."""
    return {k: read_tensor(folder, info, k) for k, info in tensor_index(folder).items()}


def write_safetensors(path: str | Path, specs: Iterable[tuple[str, torch.dtype, list[int]]],
                      produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written tensor by tensor: the header from `specs` (name, dtype, shape) first, then
    each tensor's bytes as `produce(name)` returns it, so at most one tensor is in memory (safetensors'
    save_file needs them all at once). The file appears only when complete (temp + fsync + rename)."""
    specs = list(specs)
    header, offset = {}, 0
    for name, dtype, shape in specs:
        size = tensor_bytes(dtype, shape)
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dtype, shape in specs:
            t = produce(name)
            if t.dtype != dtype or list(t.shape) != list(shape):
                raise ValueError(f"{path}: {name} is {t.dtype} {list(t.shape)}, its header says {dtype} {shape}")
            f.write(t.contiguous().view(torch.uint8).numpy().data)
            del t


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


def write_checksums(folder: str | Path, names: Iterable[str]) -> None:
    """FOLDER/SHA256SUMS for the named files, in sha256sum's format."""
    folder = Path(folder)
    write_atomic(folder / CHECKSUMS, "".join(f"{file_digest(folder / n, 'sha256')}  {n}\n" for n in sorted(names)))


def verify_checksums(folder: str | Path) -> None:
    """Check every file FOLDER/SHA256SUMS lists (nothing to check without one); ModelError names the first that
    differs."""
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        return
    for line in (folder / CHECKSUMS).read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file() or path.is_symlink():
            raise ModelError(f"{folder / CHECKSUMS} lists {name!r}, not a file in {folder}: export the model again")
        if file_digest(path, "sha256") != digest:
            raise ModelError(f"{path} does not match its SHA-256 in {folder / CHECKSUMS} (its bytes changed): "
                             "export the model again, or copy it again from its source")


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


def load_pretrained(model_dir: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Transformer:
    if verify:
        verify_checksums(model_dir)
    cfg = load_config(model_dir)
    model = Transformer(cfg, seed=0)
    missing, unexpected = model.load_state_dict(load_state_dict(model_dir), strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{Path(model_dir) / WEIGHTS}: weights do not match config.json "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval()
