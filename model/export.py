"""Export a trained Ondol model to a transformers folder: ExaoneMoeForCausalLM (pre-norm, MoE or dense) or
Exaone4ForCausalLM (post-norm dense), with safetensors weights and the run's tokenizer files.

Ondol computes the same function as transformers' EXAONE code for every setting it exports; what transformers
cannot express is refused (`ExportError`), never silently approximated:
  - attention sinks, QK-norm off, a softmax router, MoE without shared experts, post-norm MoE;
  - RoPE on global layers, except in an all-global post-norm model (transformers applies RoPE to sliding layers
    only when a window is set, and to every layer when none is; ExaoneMoe always has a window).
Training-only options (document masking, per-document positions, balancing, aux/z losses) do not change a
single-sequence forward and export as is. The expert bias becomes `e_score_correction_bias`.
MTP depths (model.mtp_layers) are left out, with a console note: transformers' ExaoneMoe has no MTP module (it
ignores `mtp.*` weights on load, and its config has no num_nextn_predict_layers); they stay in RUN_DIR/model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ondol.errors import ConfigError, ModelError
from ondol.files import atomic_path, write_atomic
from ondol.model.config import ModelConfig
from ondol.model.io import (
    CHECKSUMS,
    CONFIG,
    INDEX,
    WEIGHTS,
    load_config,
    read_tensor,
    tensor_bytes,
    tensor_index,
    verify_checksums,
    write_checksums,
    write_safetensors,
)

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HF_INDEX = "model.safetensors.index.json"
CHECKPOINT_META = "meta.json"  # what marks a complete checkpoint folder (train/checkpoint.py)

class ExportError(ModelError):
    """The model uses an option the transformers architecture cannot express."""


def check_exportable(cfg: ModelConfig) -> str:
    """The transformers architecture for `cfg`, or ExportError naming the option to change."""
    moe = cfg.n_experts > 0 and cfg.first_k_dense < cfg.n_layers
    refusals = [
        (cfg.attn_sinks, "model.attn_sinks=true: EXAONE attention in transformers has no sinks"),
        (not cfg.qk_norm, "model.qk_norm=false: EXAONE attention in transformers always applies QK-norm"),
        (moe and cfg.router_score != "sigmoid", "model.router_score=softmax: ExaoneMoe routes with sigmoid scores"),
        (moe and cfg.n_shared_experts < 1,
         "model.n_shared_experts=0: ExaoneMoe always has a shared expert"),
        (moe and cfg.norm_placement == "post", "model.norm_placement=post with experts: ExaoneMoe is pre-norm"),
        (cfg.rope_on_global and "L" in cfg.layer_kinds,
         "model.rope_on_global=true with sliding layers: transformers' EXAONE uses NoPE on global layers"),
        (cfg.rope_on_global and cfg.norm_placement == "pre",
         "model.rope_on_global=true with pre-norm: ExaoneMoe always sets a window, so global layers are NoPE"),
    ]
    for refused, why in refusals:
        if refused:
            raise ExportError(f"cannot export to transformers: {why}")
    return "Exaone4ForCausalLM" if cfg.norm_placement == "post" else "ExaoneMoeForCausalLM"


def hf_config(cfg: ModelConfig, special_ids: dict[str, int]) -> dict:
    arch = check_exportable(cfg)
    kinds = cfg.layer_kinds
    conf = {
        "architectures": [arch],
        "model_type": "exaone4" if arch == "Exaone4ForCausalLM" else "exaone_moe",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": ({"rope_type": "default", "rope_theta": cfg.rope_theta} if cfg.rope_scaling == "none" else
                            {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                             "original_max_position_embeddings": cfg.rope_original_max_seq_len}),
        "attention_dropout": 0.0,
        # No sliding layer and RoPE everywhere: transformers' "no window" mode. Otherwise a window is set and
        # global layers are NoPE, which is exactly Ondol's rope_on_global=false.
        "sliding_window": None if cfg.rope_on_global else cfg.window,
        "sliding_window_pattern": len(cfg.attn_pattern),
        "layer_types": ["sliding_attention" if k == "L" else "full_attention" for k in kinds],
        "torch_dtype": "float32",
        **special_ids,
    }
    if arch == "ExaoneMoeForCausalLM":
        conf.update({
            "mlp_layer_types": ["sparse" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.n_layers)],
            "first_k_dense_replace": cfg.first_k_dense if cfg.n_experts else cfg.n_layers,
            "moe_intermediate_size": cfg.expert_hidden,
            "num_experts": max(cfg.n_experts, 1),
            "num_experts_per_tok": cfg.top_k if cfg.n_experts else 1,
            "num_shared_experts": cfg.n_shared_experts,
            "norm_topk_prob": cfg.norm_topk,
            "routed_scaling_factor": cfg.routed_scaling,
            "n_group": 1,
            "topk_group": 1,
        })
    return conf


def hf_name(name: str, cfg: ModelConfig) -> str | None:
    """The transformers name of an Ondol tensor (norms renamed by placement, expert bias into the gate); None for
    what transformers has no place for (MTP depths, a tied LM head)."""
    if name.startswith("mtp.") or (name == "lm_head.weight" and cfg.tie_embeddings):
        return None
    if name == "lm_head.weight":
        return name
    if not name.startswith("layers."):
        return "model." + name
    norms = ({"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"} if cfg.norm_placement == "pre"
             else {"attn_norm": "post_attention_layernorm", "mlp_norm": "post_feedforward_layernorm"})
    parts = name.split(".")
    if parts[2] in norms:
        parts[2] = norms[parts[2]]
    elif parts[2:] == ["mlp", "expert_bias"]:
        parts[2:] = ["mlp", "gate", "e_score_correction_bias"]
    return "model." + ".".join(parts)


def hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A whole Ondol state dict under transformers names, fp32 (for in-memory comparisons)."""
    return {new: t.detach().float().contiguous().cpu() for name, t in sd.items()
            if (new := hf_name(name, cfg)) is not None}


def _locate(source: Path) -> tuple[Path, ModelConfig, Path]:
    """(weights folder, model config, run directory) of a run directory, its model folder, or a checkpoint."""
    if not source.is_dir():
        what = "is a file (a config?)" if source.is_file() else "not found"
        raise ConfigError(f"{source}: {what}: give the run directory (the config's run_dir, e.g. runs/tiny-ko) or "
                          "one of its checkpoints, RUN_DIR/checkpoints/step_N")
    if (source / "model" / CONFIG).is_file():
        return source / "model", load_config(source / "model"), source
    if (source / CONFIG).is_file():
        return source, load_config(source), source.parent
    if (source / CHECKPOINT_META).is_file():
        if not (source / INDEX).is_file() and not (source / WEIGHTS).is_file():
            raise ModelError(f"{source}: a checkpoint written before per-rank weight shards; export the "
                                    "run's final weights (RUN_DIR) or resume it once and export a newer checkpoint")
        meta = json.loads((source / CHECKPOINT_META).read_text(encoding="utf-8"))
        return source, ModelConfig(**meta["model"]), source.parent.parent
    raise ModelError(f"{source}: not a run directory (model/config.json), a model folder (config.json) or "
                            f"a complete checkpoint ({CHECKPOINT_META}); for a checkpoint give "
                            "RUN_DIR/checkpoints/step_N")


def _verify_source(weights: Path, checkpoint_damage: Callable[[Path], str | None] | None) -> None:
    """ModelError if the weights folder (a checkpoint, or one with SHA256SUMS) is not what was written."""
    if not (weights / CHECKPOINT_META).is_file():
        verify_checksums(weights)
        return
    if checkpoint_damage is not None and (problem := checkpoint_damage(weights)):
        raise ModelError(f"{weights}: {problem}: the checkpoint is damaged; export another one (or the final "
                         "weights), or pass --no-verify to export it as it is")


def _plan_shards(specs: list[tuple[str, torch.dtype, list[int]]], max_bytes: int) -> list[list]:
    """Consecutive tensors grouped into shards of at most max_bytes (a larger tensor alone in its shard)."""
    shards, size = [[]], 0
    for spec in specs:
        n = tensor_bytes(spec[1], spec[2])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def export_hf(source: str | Path, out_dir: str | Path, dtype: str = "fp32", max_shard_gb: float = 5.0,
              verify: bool = True, overwrite: bool = False,
              checkpoint_damage: Callable[[Path], str | None] | None = None) -> Path:
    """Write a run's final weights (RUN_DIR or RUN_DIR/model) or one of its complete checkpoints
    (RUN_DIR/checkpoints/step_N), with the run's tokenizer, as a transformers model folder in `out_dir`.

    Streams one tensor at a time from Ondol's shards (any world and expert-parallel size) into safetensors shards
    of at most max_shard_gb in `dtype` (fp32 or bf16): `model.safetensors`, or `model-0000K-of-0000N.safetensors`
    with `model.safetensors.index.json`. Peak memory is about twice the largest tensor, whatever the model size.
    SHA256SUMS lists every file written. Unless `verify` is off, the source's bytes are checked first against
    the digests its SHA256SUMS recorded or, for a checkpoint, by `checkpoint_damage` (the trainer's check of
    its meta.json: train.checkpoint.damage, which `ondol export hf` passes). A non-empty `out_dir` is refused unless
    `overwrite` (its files are then replaced one by one, each whole).
    """
    source, out = Path(source), Path(out_dir)
    weights, cfg, run_dir = _locate(source)
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} is a file: give a folder for the export")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ModelError(f"{out} is not an empty folder: give a new folder, or add --overwrite to replace the "
                         "export in it")
    if verify:
        _verify_source(weights, checkpoint_damage)
    check_exportable(cfg)
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"cannot export as {dtype!r}: choose one of {sorted(EXPORT_DTYPES)}")
    torch_dtype = EXPORT_DTYPES[dtype]
    tok_dir = run_dir / "tokenizer"
    if not (tok_dir / "meta.json").is_file():
        raise ModelError(f"{tok_dir}: no tokenizer (meta.json) in the run directory; train one with "
                                "`ondol tokenizer` or copy the run's tokenizer folder there")
    from ondol.data.chat import END_OF_TURN
    from ondol.tokenizer.hf_export import write_model_tokenizer
    from ondol.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise ExportError(f"{tok_dir}: tokenizer vocab {tok.vocab_size} exceeds model.vocab_size "
                          f"{cfg.vocab_size}; export the tokenizer the model was trained with")
    special = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    export_weights(weights, cfg, out, torch_dtype, max_shard_gb)
    if cfg.mtp_layers:
        import transformers

        print(f"export: the {cfg.mtp_layers} MTP depth(s) are not in {out}: transformers "
              f"{transformers.__version__}'s ExaoneMoe has no MTP module; they stay in {weights} "
              "(Ondol's format, used by `ondol generate generate.speculative=true`)")
    with atomic_path(out / "tokenizer.model") as tmp:  # the SentencePiece model, for Ondol and sentencepiece
        shutil.copyfile(tok_dir / "tokenizer.model", tmp)
    add_bos = training_added_bos(run_dir)
    note = write_model_tokenizer((tok_dir / "tokenizer.model").read_bytes(), tok.meta, out, add_bos,
                                 cfg.max_seq_len)
    if note:
        print(f"export: {note}")
    # generation also stops at the end of an assistant's turn (data/chat.py), when the tokenizer has chat tokens
    end_of_turn = tok.special_tokens.get(END_OF_TURN)
    stops = {"eos_token_id": [tok.eos_id, end_of_turn]} if end_of_turn is not None else {}
    write_atomic(out / "generation_config.json", json.dumps(special | stops, indent=2) + "\n")
    conf = {**hf_config(cfg, special), "torch_dtype": "bfloat16" if dtype == "bf16" else "float32"}
    write_atomic(out / "config.json", json.dumps(conf, indent=2) + "\n")
    write_checksums(out, [p.name for p in out.iterdir() if p.is_file() and p.name != CHECKSUMS])
    return out


def training_added_bos(run_dir: Path) -> bool:
    """Whether the run's training documents started with bos: its data manifest says; a run directory without
    prepared data gets data.bos's default, with a note."""
    from ondol.data.config import DataConfig
    from ondol.data.shards import read_manifest

    if (run_dir / "data" / "manifest.json").is_file():
        return bool(read_manifest(run_dir / "data")["bos"])
    print(f"export: {run_dir / 'data'} has no manifest: the tokenizer adds bos as data.bos={DataConfig.bos} "
          "does by default")
    return DataConfig.bos


def export_weights(weights: Path, cfg: ModelConfig, out: Path, dtype: torch.dtype, max_shard_gb: float) -> None:
    """The weights of an Ondol folder (one file or per-rank shards) under transformers names in `dtype`,
    streamed one tensor at a time into shards of at most max_shard_gb (plus their index when more than one)."""
    out.mkdir(parents=True, exist_ok=True)
    index = tensor_index(weights)
    ondol_name = {hf: name for name in index if (hf := hf_name(name, cfg)) is not None}
    specs = [(hf, dtype, index[name].shape) for hf, name in ondol_name.items()]
    shards = _plan_shards(specs, int(max_shard_gb * 2**30))
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    def produce(hf: str) -> torch.Tensor:
        name = ondol_name[hf]
        return read_tensor(weights, index[name], name).to(dtype)

    for file, shard in zip(files, shards):  # every file whole or not replaced; config.json last
        write_safetensors(out / file, shard, produce, metadata={"format": "pt"})
    if len(files) > 1:
        total = sum(tensor_bytes(dt, shape) for _, dt, shape in specs)
        weight_map = {spec[0]: file for file, shard in zip(files, shards) for spec in shard}
        write_atomic(out / HF_INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2) + "\n")
    for stale in [*out.glob("model*.safetensors"), *out.glob(HF_INDEX)]:  # an earlier export's other sharding
        if stale.name not in files and not (stale.name == HF_INDEX and len(files) > 1):
            stale.unlink()
