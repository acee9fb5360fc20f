"""Durable writes (ondol.files), killed with SIGKILL at random moments: the target is always the old complete
file or the new complete one, never torn; the same for a whole `ondol export hf` folder."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_export import make_run, tokenizer_dir  # noqa: F401 (the fixture is used by name)

from ondol.files import atomic_path, write_atomic

ROOT = Path(__file__).resolve().parents[1]
SIZE = 4 << 20

REWRITER = """
import sys
from pathlib import Path
from ondol.files import write_atomic
target = Path(sys.argv[1])
for i in range(1, 10**6):
    write_atomic(target, bytes([i % 256]) * int(sys.argv[2]))
"""


def test_write_atomic_replaces_whole_files_and_keeps_the_mode(tmp_path):
    target = tmp_path / "manifest.json"
    write_atomic(target, "첫")  # text is written as UTF-8
    write_atomic(target, b"{}\n")
    assert target.read_bytes() == b"{}\n"
    assert target.stat().st_mode & 0o777 == 0o644  # the temporary file's 0600 does not leak into the result
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"{}\n" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_signal_just_after_the_temporary_file_appears_leaves_none(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, raised the same way) handled right after the temporary file is created, before anything
    is written to it: the file is removed, as for a signal at any later moment."""
    real_open = os.open

    def open_then_interrupted(file, flags, *args, **kwargs):
        fd = real_open(file, flags, *args, **kwargs)
        if Path(file).parent == tmp_path and flags & os.O_CREAT:
            os.close(fd)
            raise KeyboardInterrupt
        return fd

    monkeypatch.setattr(os, "open", open_then_interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "model.safetensors"):
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_final_weights_get_the_mode_open_would_give_under_the_umask(tmp_path, umask):
    from ondol.model.config import load_preset
    from ondol.model.io import save_pretrained
    from ondol.model.transformer import Transformer

    cfg = load_preset("tiny", vocab_size=256, n_layers=1)
    old = os.umask(umask)
    try:
        save_pretrained(Transformer(cfg), cfg, tmp_path / "model")
        (tmp_path / "plain").write_text("")  # what the user's other outputs get
    finally:
        os.umask(old)
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "model" / name).stat().st_mode & 0o777 == expected, name


def test_write_atomic_killed_six_times_leaves_old_or_new_never_torn(tmp_path):
    target = tmp_path / "shard.bin"
    write_atomic(target, bytes([0]) * SIZE)
    rng = random.Random()
    for _ in range(6):  # at a random moment after the rewriter's imports (~0.2 s), in any phase of a write
        proc = subprocess.Popen([sys.executable, "-c", REWRITER, str(target), str(SIZE)], cwd=ROOT)
        time.sleep(rng.uniform(0.3, 1.0))
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = target.read_bytes()
        assert len(data) == SIZE and data == data[:1] * SIZE  # one complete version


def test_export_killed_while_writing_keeps_a_complete_folder(tmp_path, tokenizer_dir):  # noqa: F811
    from ondol.model.export import export_hf

    run, _ = make_run(tmp_path, tokenizer_dir)
    out = tmp_path / "hf"
    export_hf(run, out)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    code = f"from ondol.model.export import export_hf; export_hf({str(run)!r}, {str(out)!r}, overwrite=True)"
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
        while proc.poll() is None and not list(out.glob(".*.tmp")):  # kill while a file is being written
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if not p.name.startswith(".")}
        assert after == before  # the same model exported again: every file whole, equal to the complete export
