"""Export from per-rank shards: tensors reassembled from expert slices spread over four files, written as
transformers shards one tensor at a time; peak memory bounded by the largest tensor, not the model.

(Export of a real EP 4 run against the single-process model, in transformers: tests/test_expert_parallel.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ondol.model.config import ModelConfig
from ondol.model.export import hf_state_dict
from ondol.model.io import CONFIG, TensorInfo, shard_name, write_index
from ondol.model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
# ~190 MB of fp32 weights; the largest tensors (embedding, LM head) are 16 MB each
CFG = ModelConfig(vocab_size=16384, d_model=256, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=64,
                  attn_pattern="LLLG", window=64, ffn_hidden=1024, n_experts=16, top_k=2, n_shared_experts=1,
                  expert_hidden=512, first_k_dense=1, max_seq_len=256, mtp_layers=0)
# Export's peak memory is one tensor read in fp32, the memory-mapped file pages it was read from (RSS while
# mapped), and its cast copy: measured 29 MiB over the baseline here for a 16 MiB largest tensor (61-68 MiB
# without the child's fixed mmap threshold, when glibc keeps freed tensors in its heap).
# The bound allows 2x the largest tensor plus this fixed overhead (allocator slack, headers, the bf16 copy).
OVERHEAD_BYTES = 32 * 2**20
CHILD = """
import json, sys, torch
from pathlib import Path
from ondol.model.export import export_weights
from ondol.model.io import load_config

def status(key):
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key))) * 1024

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_config(folder)
Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
base = status("VmRSS:")
export_weights(folder, cfg, out, torch.bfloat16, max_shard_gb=0.05)
print(json.dumps({"base": base, "peak": status("VmHWM:")}))
"""


def write_four_rank_shards(sd: dict[str, torch.Tensor], folder: Path) -> None:
    """The layout 4 expert-parallel ranks write: each layer's experts in 4 slices, dense tensors spread."""
    files: dict[int, dict[str, torch.Tensor]] = {r: {} for r in range(4)}
    index = {}
    for i, (name, t) in enumerate(sd.items()):
        if ".mlp.experts." in name:
            n = t.shape[0] // 4
            for r in range(4):
                files[r][name] = t[r * n:(r + 1) * n].clone()
            index[name] = TensorInfo(list(t.shape), [(shard_name("model", r, 4), r * n) for r in (2, 0, 3, 1)])
        else:
            files[i % 4][name] = t.contiguous()
            index[name] = TensorInfo(list(t.shape), [(shard_name("model", i % 4, 4), 0)])
    folder.mkdir()
    for r, tensors in files.items():
        save_file(tensors, str(folder / shard_name("model", r, 4)))
    write_index(folder, index)
    (folder / CONFIG).write_text(json.dumps(CFG.to_dict()), encoding="utf-8")


def test_export_of_shards_is_exact_and_memory_is_bounded_by_the_largest_tensor(tmp_path):
    model = Transformer(CFG, seed=0)
    sd = {k: v for k, v in model.state_dict().items()}
    write_four_rank_shards(sd, tmp_path / "shards")
    largest = max(t.numel() * t.element_size() for t in sd.values())
    total = sum(t.numel() * t.element_size() for t in sd.values())
    expected = {k: v.to(torch.bfloat16) for k, v in hf_state_dict(sd, CFG).items()}
    del model, sd

    out = tmp_path / "hf"
    # A fixed mmap threshold returns every large free to the system at once; glibc's default raises the threshold
    # after the first large free and keeps later ones in the heap, so RSS would count memory export already freed.
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "shards"), str(out)], cwd=ROOT,
                          env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)},
                          capture_output=True, text=True, timeout=300, check=True)
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    over = rss["peak"] - rss["base"]
    print(f"export peak RSS over baseline {over / 2**20:.1f} MiB; largest tensor {largest / 2**20:.1f} MiB; "
          f"model {total / 2**20:.1f} MiB")
    assert over < 2 * largest + OVERHEAD_BYTES, (over, largest)
    assert over < total / 2  # far from holding the model

    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1 and weight_map.keys() == expected.keys()
    got = {}
    for file in sorted(set(weight_map.values())):  # read back with safetensors itself
        shard = load_file(out / file)
        assert all(weight_map[k] == file for k in shard)
        got.update(shard)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v), k
