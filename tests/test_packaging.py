"""Packaging and layering: one import root `ondol`, imports that point one way, a configs layer that stays light,
and a wheel that installs and runs beside PyPI's unrelated `tokenizer` package."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("configs", "data", "launch", "model", "tokenizer", "train")
# Every module's layer: an import may go to the same package or to a lower layer, never up. The configs layer
# (ondol.configs and each package's config.py) sits under everything; each package's CLI module sits over all
# the packages' code, and the `ondol` command itself (ondol.launch.cli) over the CLIs.
CORE_RANK = {"data": 1, "tokenizer": 2, "model": 3, "train": 4, "launch": 5}
CLI_RANK, COMMAND_RANK = 6, 7


def module_files() -> dict[str, Path]:
    """Every module the distribution installs, by its dotted name under `ondol`."""
    modules = {"ondol": ROOT / "__init__.py"}
    modules.update({f"ondol.{path.stem}": path for path in sorted(ROOT.glob("*.py")) if path.name != "__init__.py"})
    for package in SUBPACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(("ondol", *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


MODULES = module_files()


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, at any depth (function-level imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; write `from ondol.... import`"
            # `from ondol.model import io` imports the module ondol.model.io
            found += [(node.lineno, f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES
                       else node.module) for a in node.names]
    return found


def ondol_graph() -> dict[str, set[str]]:
    return {name: {m for _, m in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def rank(module: str) -> int:
    parts = module.split(".")
    if module == "ondol.launch.cli":
        return COMMAND_RANK
    if module in ("ondol", "ondol.configs", "ondol.files", "ondol.errors") or parts[-1] == "config":
        return 0
    if parts[-1] in ("cli", "__main__"):
        return CLI_RANK
    return CORE_RANK[parts[1]]


def test_every_import_goes_through_the_ondol_root():
    """No module imports Ondol's packages by their repository folder names (`data`, `model`, ...)."""
    offenders = [f"{path.relative_to(ROOT)}:{line}: import {name}"
                 for path in [*MODULES.values(), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]
                 for line, name in imports_of(path) if name.split(".")[0] in SUBPACKAGES]
    assert offenders == []


def test_no_import_cycle():
    graph = ondol_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_imports_point_down_the_layers():
    upward = [f"{module} (layer {rank(module)}) imports {dep} (layer {rank(dep)})"
              for module, deps in ondol_graph().items() for dep in sorted(deps)
              if rank(dep) > rank(module)
              or (rank(dep) == rank(module) == CLI_RANK and dep.split(".")[1] != module.split(".")[1])]
    assert upward == []


def test_cycle_and_layer_checks_catch_a_planted_violation(monkeypatch):
    """The checks above fail when a package imports the command back (the circle they guard against)."""
    graph = ondol_graph()
    graph["ondol.data.cli"].add("ondol.launch.cli")
    monkeypatch.setattr(sys.modules[__name__], "ondol_graph", lambda: graph)
    with pytest.raises(pytest.fail.Exception, match="import cycle: .*ondol.data.cli -> ondol.launch.cli"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="ondol.data.cli .* imports ondol.launch.cli"):
        test_imports_point_down_the_layers()


def test_config_modules_are_plain_dataclasses():
    """Each package's config.py imports the standard library, yaml and other config modules only."""
    stdlib = set(sys.stdlib_module_names) | {"__future__", "yaml"}
    offenders = [f"{path.relative_to(ROOT)}:{line}: import {name}"
                 for module, path in MODULES.items() if module.endswith(".config")
                 for line, name in imports_of(path)
                 if name.split(".")[0] not in stdlib and not (name in MODULES and rank(name) == 0)]
    assert offenders == []


def test_configs_import_is_light():
    """`import ondol.configs` (what every command does first) loads no torch, numpy, sentencepiece or the
    packages' code: only the standard library, omegaconf with what it needs, and the config modules."""
    probe = ("import sys; before = set(sys.modules); import ondol.configs; "
             "import json; print(json.dumps(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", probe], capture_output=True, text=True,
                         check=True, cwd=ROOT.parent)
    loaded = json.loads(out.stdout)
    # attr: omegaconf imports it when installed (attrs classes as configs); lm-eval's dependencies install it
    allowed = set(sys.stdlib_module_names) | {"ondol", "omegaconf", "yaml", "_yaml", "antlr4", "cython_runtime",
                                              "attr"}
    outside = sorted({m for m in loaded if m.split(".")[0] not in allowed
                      and not m.startswith(("__editable__", "_cython_"))})  # editable finder, yaml's C loader
    assert outside == []
    beyond_configs = sorted(m for m in loaded if m in MODULES and rank(m) > 0 and m.count(".") > 1)
    assert beyond_configs == []  # only the configs layer and the (empty) package __init__ files
    cumulative_us = next(int(line.split("|")[1]) for line in out.stderr.splitlines()
                         if line.rstrip().endswith("| ondol.configs"))
    print(f"import ondol.configs: {cumulative_us / 1e6:.3f} s cumulative")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True)
    (whl,) = out.glob("ondol-*.whl")
    return whl


def test_wheel_holds_one_top_level_package_with_its_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"ondol", wheel.name.split("-py")[0] + ".dist-info"}
    for package in SUBPACKAGES:
        assert f"ondol/{package}/__init__.py" in names
    assert {"ondol/configs/tiny-ko.yaml", "ondol/configs/model/tiny.yaml", "ondol/launch/cli.py"} <= set(names)
    assert not [n for n in names if n.startswith(("ondol/tests", "ondol/benchmarks")) or "golden" in n]


def test_installed_wheel_runs_beside_pypi_tokenizer(wheel, tmp_path, corpora):
    """A fresh venv with the wheel (its dependencies come from this environment, which also holds PyPI's
    `tokenizer`): both packages import, and `ondol run CONFIG` trains from a folder outside the clone, the
    config's presets coming from the installed package."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, text=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")

    probe = ("import ondol, ondol.tokenizer.tokenizer, tokenizer; "
             "print(ondol.__file__); print(tokenizer.__file__); print(hasattr(tokenizer, 'split_into_sentences'))")
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True,
                         cwd=tmp_path).stdout.split()
    assert Path(out[0]).is_relative_to(site)  # the wheel's ondol, not the clone
    assert Path(out[1]).parent.parent == Path(sysconfig.get_paths()["purelib"])  # PyPI's Icelandic tokenizer
    assert out[2] == "True"

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "configs" / "tiny-ko.yaml", work / "tiny-ko.yaml")  # no model/ presets beside it
    short = ["run_dir=run", "data.sources.0.max_docs=1500", "data.sources.1.max_docs=300",
             "tokenizer.vocab_size=2048", "tokenizer.character_coverage=0.995",
             "tokenizer.max_sentences=20000", "train.steps=6", "train.eval_every=6",
             "train.eval_batches=1", "train.save_every=6", "train.log_every=3", "optim.warmup_steps=2",
             "generate.max_new_tokens=4", "logging.progress=false"]
    env = {**os.environ, "ONDOL_CORPORA": str(corpora), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([str(venv / "bin" / "ondol"), "run", "tiny-ko.yaml", *short], cwd=work, env=env,
                            capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "validation loss" in result.stdout and (work / "run" / "model" / "model.safetensors").is_file()
