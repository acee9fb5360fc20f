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
from pathlib import Path

import torch
from safetensors.torch import save_file

from ondol.errors import ModelError
from ondol.files import atomic_path, write_atomic
from ondol.model.config import ModelConfig
from ondol.model.io import load_pretrained


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
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
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


def hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Ondol parameter names -> transformers names (norms renamed by placement, expert bias into the gate)."""
    norms = ({"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"} if cfg.norm_placement == "pre"
             else {"attn_norm": "post_attention_layernorm", "mlp_norm": "post_feedforward_layernorm"})
    out = {}
    for name, t in sd.items():
        if name.startswith("mtp."):
            continue
        if name == "lm_head.weight":
            if cfg.tie_embeddings:
                continue
            new = name
        elif name.startswith("layers."):
            parts = name.split(".")
            if parts[2] in norms:
                parts[2] = norms[parts[2]]
            elif parts[2:] == ["mlp", "expert_bias"]:
                parts[2:] = ["mlp", "gate", "e_score_correction_bias"]
            new = "model." + ".".join(parts)
        else:
            new = "model." + name
        out[new] = t.detach().float().contiguous().cpu()
    return out


def export_hf(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write RUN_DIR/model (Ondol format) and RUN_DIR/tokenizer as a transformers model folder in `out_dir`."""
    run_dir, out = Path(run_dir), Path(out_dir)
    model = load_pretrained(run_dir / "model")
    cfg = model.cfg
    check_exportable(cfg)
    tok_dir = run_dir / "tokenizer"
    if not (tok_dir / "meta.json").is_file():
        raise FileNotFoundError(f"{tok_dir}: no tokenizer (meta.json) in the run directory; train one with "
                                "`ondol tokenizer` or copy the run's tokenizer folder there")
    from ondol.tokenizer.hf_export import write_model_tokenizer
    from ondol.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise ExportError(f"{tok_dir}: tokenizer vocab {tok.vocab_size} exceeds model.vocab_size "
                          f"{cfg.vocab_size}; export the tokenizer the model was trained with")
    special = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as tmp:  # every file whole or not replaced; config.json last
        save_file(hf_state_dict(model.state_dict(), cfg), str(tmp), metadata={"format": "pt"})
    if cfg.mtp_layers:
        import transformers

        print(f"export: the {cfg.mtp_layers} MTP depth(s) are not in {out}: transformers "
              f"{transformers.__version__}'s ExaoneMoe has no MTP module; they stay in {run_dir / 'model'} "
              "(Ondol's format, used by `ondol generate generate.speculative=true`)")
    with atomic_path(out / "tokenizer.model") as tmp:  # the SentencePiece model, for Ondol and sentencepiece
        shutil.copyfile(tok_dir / "tokenizer.model", tmp)
    add_bos = training_added_bos(run_dir)
    note = write_model_tokenizer((tok_dir / "tokenizer.model").read_bytes(), tok.meta, out, add_bos,
                                 cfg.max_seq_len)
    if note:
        print(f"export: {note}")
    write_atomic(out / "generation_config.json", json.dumps(special, indent=2) + "\n")
    write_atomic(out / "config.json", json.dumps(hf_config(cfg, special), indent=2) + "\n")
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
