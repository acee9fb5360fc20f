"""End to end: the `ondol` command trains a tiny Korean MoE from real text and continues a held-out prompt."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HANGUL = re.compile("[\uac00-\ud7a3]")
# A shortened tiny-ko run: the same stages and code, fewer documents, shorter sequences and fewer steps.
SHORT = ["data.sources.0.max_docs=6000", "data.seq_len=128", "train.steps=150", "train.eval_every=150",
         "train.eval_batches=4", "train.save_every=150", "train.log_every=10", "optim.warmup_steps=15",
         "generate.max_new_tokens=12"]


def ondol(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ondol.launch.cli", *args], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("tiny-ko")
    result = ondol("run", "configs/tiny-ko.yaml", f"run_dir={run_dir}", *SHORT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result


def test_run_trains_and_validation_loss_falls(tiny_run):
    run_dir, result = tiny_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) >= 2
    assert val[-1] < val[0] - 0.5, val  # well below its start, not noise
    assert f"validation loss {val[0]:.3f} -> {val[-1]:.3f}" in result.stdout


def test_run_writes_everything_into_the_run_directory(tiny_run):
    run_dir, _ = tiny_run
    for path in ["config.yaml", "tokenizer/tokenizer.model", "data/manifest.json", "metrics.jsonl", "loss.png",
                 "model/model.safetensors", "checkpoints/latest", "logs/deepspeed-rank0.log"]:
        assert (run_dir / path).exists(), path
    assert not (ROOT / "runs" / "tiny-ko").exists() or (ROOT / "runs" / "tiny-ko") != run_dir


def test_deepspeed_output_stays_off_the_console_and_no_op_is_built(tiny_run):
    run_dir, result = tiny_run
    assert "DeepSpeed" not in result.stdout + result.stderr and "[WARNING]" not in result.stdout
    # DeepSpeed's op probe writes into the run directory; the CPU shared-memory op (inference only) is not built
    assert "built successfully" not in (run_dir / "logs" / "deepspeed-rank0.log").read_text()


def test_version_names_ondol_torch_and_deepspeed():
    from importlib.metadata import version

    out = ondol("--version")
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout == (f"ondol {version('ondol')} (torch {version('torch')}, deepspeed {version('deepspeed')}, "
                          f"Python {sys.version.split()[0]})\n")


def test_run_prints_a_continuation_of_a_korean_held_out_prompt(tiny_run):
    run_dir, result = tiny_run
    prompt = re.search(r"prompt: +(.*)", result.stdout).group(1)
    continuation = re.search(r"continuation: (.*)", result.stdout).group(1)
    assert HANGUL.search(prompt) and continuation.strip(), result.stdout[-1000:]
    # The prompt is the start of a real held-out document, not something the training data saw as a document.
    from ondol.data.shards import first_documents
    from ondol.tokenizer.tokenizer import Tokenizer

    (held_out,) = first_documents(run_dir / "data", "val", Tokenizer.load(run_dir / "tokenizer"), 1)
    assert held_out.startswith(prompt)


def test_generate_command_is_deterministic_and_matches_the_run(tiny_run):
    run_dir, result = tiny_run
    prompt = re.search(r"prompt: +(.*)", result.stdout).group(1)
    continuation = re.search(r"continuation: (.*)", result.stdout).group(1)
    out = ondol("generate", str(run_dir), "--prompt", prompt)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == f"prompt:       {prompt}\ncontinuation: {continuation}\n"  # the prompt's end shows


def test_transformers_generate_from_a_plain_string_equals_ondol_generate(tiny_run, tmp_path):
    """The exported tokenizer starts a text with bos as the training documents did, so `hf.generate(**tok(p))`
    continues a prompt exactly as `ondol generate` (greedy) does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ondol.launch.config import GenerateConfig

    run_dir, result = tiny_run
    prompt = re.search(r"prompt: +(.*)", result.stdout).group(1)
    assert ondol("export", "hf", str(run_dir), str(tmp_path / "hf")).returncode == 0
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    inputs = hf_tok(prompt, return_tensors="pt")
    assert inputs["input_ids"][0, 0] == hf_tok.bos_token_id
    with torch.no_grad():  # ondol generate's defaults: greedy, eos not before generate.min_new_tokens
        new = hf.generate(**inputs, max_new_tokens=12, min_new_tokens=GenerateConfig.min_new_tokens,
                          do_sample=False)[0, inputs["input_ids"].shape[1]:]
    continuation = hf_tok.decode(new, skip_special_tokens=True)
    assert continuation.strip(), continuation  # real tokens, not blanks
    out = ondol("generate", str(run_dir), "generate.max_new_tokens=12", "--prompt", prompt)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == f"prompt:       {prompt}\ncontinuation: {continuation}\n"


def test_whitespace_only_continuation_is_shown(tiny_run, capsys, monkeypatch):
    from ondol.launch import pipeline
    from ondol.launch.cli import main

    monkeypatch.setattr(pipeline, "continue_prompt", lambda cfg, prompt, checkpoint: (prompt, " \n"))
    assert main(["generate", str(tiny_run[0]), "--prompt", "영화"]) == 0
    out = capsys.readouterr()
    assert out.out == "prompt:       영화\ncontinuation:  \n\n" and out.err == "(the continuation is only whitespace: ' \\n')\n"


def test_rerun_reuses_finished_stages(tiny_run):
    run_dir, _ = tiny_run
    again = ondol("run", "configs/tiny-ko.yaml", f"run_dir={run_dir}", *SHORT)
    assert again.returncode == 0, again.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 150  # resumed at the end: no step trained twice


@pytest.mark.parametrize("command", [[], ["run"], ["tokenizer", "train"], ["tokenizer", "eval"], ["data", "prepare"],
                                     ["data", "inspect"], ["train"], ["launch"], ["export", "hf"], ["generate"]])
def test_every_command_has_help(command):
    out = ondol(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: ondol" in out.stdout and len(out.stdout) > 200


def test_config_error_is_one_line_naming_the_key():
    out = ondol("train", "configs/tiny-ko.yaml", "model.n_layer=2")
    assert out.returncode == 2
    assert out.stdout == ""  # DeepSpeed's import-time "Setting accelerator to CPU" warning is dropped
    assert out.stderr.strip() == ("ondol: config error: override 'model.n_layer=2': unknown key 'model.n_layer' "
                                  "(did you mean 'model.n_layers'?)")
