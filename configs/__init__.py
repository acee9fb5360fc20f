"""The run configuration: every component's typed config composed into one, loaded from YAML.

A run YAML may start with `defaults: [model/tiny.yaml, ...]`: each listed file (relative to this folder or
to the run file) is merged into the section named by its folder before the run file itself, then the
command-line dotlist overrides (`model.n_layers=4`). Unknown keys and wrong types are errors that name the
key, the file, and the closest valid key.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ondol.data.config import DataConfig
from ondol.errors import ConfigError
from ondol.launch.config import GenerateConfig, LaunchConfig
from ondol.model.config import ModelConfig
from ondol.tokenizer.config import TokenizerConfig
from ondol.train.config import (
    DeepSpeedConfig,
    LoggingConfig,
    OptimConfig,
    TrainConfig,
    check_sequence_parallel,
)

CONFIG_DIR = Path(__file__).resolve().parent
REPO_DIR = CONFIG_DIR.parent  # the clone; the default corpora_dir (../shared/corpora) is relative to it


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    seed: int = 1234
    corpora_dir: str = "${oc.env:ONDOL_CORPORA,../shared/corpora}"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def __post_init__(self) -> None:  # checks across sections (each section checks its own keys)
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) is above model.max_seq_len "
                             f"({self.model.max_seq_len}): lower data.seq_len or raise model.max_seq_len")
        if self.optim.name == "muon" and self.deepspeed.zero_stage == 3:  # train/optim.py's layouts
            raise ValueError("optim.name=muon supports deepspeed.zero_stage 0, 1 or 2, not 3: set "
                             "deepspeed.zero_stage=2 (optimizer state and gradients sharded) or optim.name=adamw")
        if self.optim.name == "muon" and (self.deepspeed.extra.get("zero_optimization") or {}).get("offload_optimizer"):
            raise ValueError("optim.name=muon does not support deepspeed.extra.zero_optimization.offload_optimizer "
                             "(its step gathers momentum on the device): remove it or use optim.name=adamw")
        if self.optim.qk_clip > 0 and self.deepspeed.zero_stage == 3:  # train/qk_clip.py: fp32 fragments
            raise ValueError("optim.qk_clip supports deepspeed.zero_stage 0, 1 or 2, not 3: set "
                             "deepspeed.zero_stage=2 or optim.qk_clip=0")
        if self.optim.qk_clip > 0 and self.model.attn_backend == "flash":
            raise ValueError("optim.qk_clip needs each head's largest attention logit, which flash-attn does not "
                             "return: set model.attn_backend=auto (flex on CUDA) or optim.qk_clip=0")
        check_sequence_parallel(self.deepspeed.sequence_parallel_size, self.model, self.data.seq_len)
        names = {s.name for s in self.data.sources}
        for i, phase in enumerate(self.train.phases):
            if phase.seq_len > self.model.max_seq_len:
                raise ValueError(f"train.phases[{i}].seq_len ({phase.seq_len}) is above model.max_seq_len "
                                 f"({self.model.max_seq_len}): lower it or raise model.max_seq_len")
            if phase.seq_len % (sp := self.deepspeed.sequence_parallel_size):
                raise ValueError(f"train.phases[{i}].seq_len ({phase.seq_len}) must be divisible by "
                                 f"deepspeed.sequence_parallel_size={sp} (each rank holds seq_len / N tokens)")
            if unknown := sorted(set(phase.weights) - names) if names else []:
                raise ValueError(f"train.phases[{i}].weights names unknown sources {unknown} (data.sources: "
                                 f"{sorted(names)})")


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key path of a dataclass type, for 'did you mean' suggestions."""
    keys = []
    for name, hint in typing.get_type_hints(node).items():
        keys.append(f"{prefix}{name}")
        if is_dataclass(hint):
            keys.extend(_valid_keys(hint, f"{prefix}{name}."))
    return keys


def _unknown_key(key: str, choices: list[str], origin: str) -> ConfigError:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{origin}: unknown key '{key}'{hint}")


def _check_keys(node: Any, schema: type, origin: str, prefix: str = "") -> None:
    """Reject keys the dataclass schema does not have, naming the full path (lists of configs included)."""
    if not isinstance(node, DictConfig):
        return
    hints = typing.get_type_hints(schema)
    for key in node:
        path = f"{prefix}{key}"
        if key not in hints:
            raise _unknown_key(path, [f"{prefix}{k}" for k in _valid_keys(schema)], origin)
        hint, value = hints[key], node._get_node(key)
        if is_dataclass(hint):
            _check_keys(value, hint, origin, path + ".")
        elif typing.get_origin(hint) is list and isinstance(value, ListConfig):
            (item,) = typing.get_args(hint)
            if is_dataclass(item):
                for i, entry in enumerate(value):
                    _check_keys(entry, item, origin, f"{path}[{i}].")


def _explain(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = getattr(err, "msg", str(err)).splitlines()[0]
    if isinstance(err, ConfigKeyError) or "not in" in msg:
        # OmegaConf reports the parent in full_key for some merges; recover the offending leaf from msg.
        leaf = msg.split("'")[1] if msg.count("'") >= 2 else key
        if key and not key.endswith(leaf):
            key = f"{key}.{leaf}" if key else leaf
        key = key or leaf
        return _unknown_key(key, _valid_keys(RunConfig), origin)
    if isinstance(err, ValidationError):
        return ConfigError(f"{origin}: wrong type for key '{key}': {msg}")
    return ConfigError(f"{origin}: bad value for key '{key}': {msg}")


def _read_yaml(path: Path) -> DictConfig:
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: give a YAML file, e.g. configs/tiny-ko.yaml")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (give a YAML file, e.g. configs/tiny-ko.yaml)")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        opened = getattr(e, "context_mark", None)
        if getattr(e, "context", None) and opened and opened.line != mark.line:
            what += f" {e.context} that starts on line {opened.line + 1}"
        raise ConfigError(f"{where}: not valid YAML: {what} (fix the syntax there)") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return node


def _merge(base: DictConfig, other: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise _explain(e, origin) from None


def _apply_override(schema: DictConfig, item: str) -> DictConfig:
    """Set one `key=value` (list entries as `data.sources[0].max_docs=10` or `data.sources.0.max_docs=10`)."""
    origin = f"override '{item}'"
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{origin}: write overrides as key=value, e.g. model.n_layers=4")
    try:
        value = OmegaConf.from_dotlist([f"value={raw}"])["value"]  # YAML typing: 4 -> int, [1,2] -> list
    except OmegaConfBaseException as e:
        raise ConfigError(f"{origin}: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:  # a value YAML cannot scan, such as one starting with ` or @
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{origin}: not a valid YAML value ({what}); quote it, e.g. {key}='\"{raw}\"'") from None
    for list_key, index in re.findall(r"([\w.]+?)(?:\[|\.)(\d+)(?=\]|\.|$)", key):
        entries = OmegaConf.select(schema, list_key)
        if isinstance(entries, ListConfig) and int(index) >= len(entries):
            raise ConfigError(f"{origin}: '{list_key}' has {len(entries)} entries, so index {index} does not exist")
    try:
        OmegaConf.update(schema, key, value, merge=True)
    except OmegaConfBaseException as e:
        raise _explain(e, origin) from None
    return schema


def _locate_corpora(schema: DictConfig, user: DictConfig, path: Path, overrides: list[str] | tuple[str, ...]) -> None:
    """Make a relative corpora_dir absolute, so commands work from any folder: relative to the shell's folder
    when given on the command line or in ONDOL_CORPORA, to the config file when set there, else (the default
    ../shared/corpora) to the repository."""
    try:
        value = str(schema.corpora_dir)
    except OmegaConfBaseException as e:
        raise _explain(e, str(path)) from None
    if os.path.isabs(os.path.expanduser(value)):
        return
    if any(item.startswith("corpora_dir=") for item in overrides):
        base = Path.cwd()
    elif "corpora_dir" in user:
        base = path.parent
    else:
        base = Path.cwd() if os.environ.get("ONDOL_CORPORA") else REPO_DIR
    schema.corpora_dir = os.path.normpath(base / value)


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a run YAML, apply its `defaults` presets and the dotlist overrides, and validate every key."""
    path = Path(path)
    user = _read_yaml(path)
    schema = OmegaConf.structured(RunConfig)
    for preset in user.pop("defaults", []) or []:
        section = Path(preset).parent.name
        candidates = [path.parent / preset, CONFIG_DIR / preset]
        preset_path = next((c for c in candidates if c.is_file()), None)
        if section not in RunConfig.__dataclass_fields__:
            raise ConfigError(f"{path}: defaults entry '{preset}' must live in a folder named after a section")
        if preset_path is None:
            raise ConfigError(f"{path}: defaults entry '{preset}' not found next to it or in {CONFIG_DIR}")
        preset_node = _read_yaml(preset_path)
        _check_keys(preset_node, typing.get_type_hints(RunConfig)[section], str(preset_path), section + ".")
        schema = _merge(schema, {section: preset_node}, str(preset_path))
    _check_keys(user, RunConfig, str(path))
    schema = _merge(schema, user, str(path))
    for item in overrides:
        schema = _apply_override(schema, item)
    _locate_corpora(schema, user, path, overrides)
    try:
        cfg = OmegaConf.to_object(schema)  # resolves interpolations, runs each dataclass's checks
    except OmegaConfBaseException as e:
        raise _explain(e, str(path)) from None
    except ValueError as e:  # a component's __post_init__ check; its message names the key
        shown = " ".join(item if item.isprintable() else repr(item) for item in overrides)  # stays one line
        raise ConfigError(f"{path}{' with ' + shown if overrides else ''}: {e}") from None
    assert isinstance(cfg, RunConfig)
    return cfg


def load_run_config(run: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The config of a trained run, for the commands that read one (eval, generate): given a run directory,
    its config.yaml with run_dir set to that directory and the tokenizer read from RUN_DIR/tokenizer when it
    holds one, so a copied or moved run reads only its own folder; given a YAML file, that config as `ondol
    train` reads it."""
    run = Path(run)
    if run.is_file():
        return load_config(run, overrides)
    if not (run / "config.yaml").is_file():
        what = "has no config.yaml" if run.is_dir() else "not found"
        raise ConfigError(f"{run}: {what}: give a run directory written by `ondol run` or `ondol train` (it holds "
                          "config.yaml), or the run's config YAML")
    if any(item.startswith("run_dir=") for item in overrides):
        raise ConfigError(f"override run_dir: the run is {run}, as given on the command line; leave run_dir out")
    cfg = load_config(run / "config.yaml", overrides)
    cfg.run_dir = str(run)
    if (run / "tokenizer" / "meta.json").is_file():
        cfg.tokenizer.path = None
    return cfg


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The CONFIG positional and the dotlist overrides that `load_config(config, overrides)` reads."""
    parser.add_argument("config", help="run config YAML, e.g. configs/tiny-ko.yaml")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides such as model.n_layers=4 train.steps=50")


def parse_config_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `argv`, taking `key=value` words anywhere on the line (after option flags too) as the overrides of
    a command that reads a config."""
    args, extras = parser.parse_known_args(argv)
    overrides = [word for word in extras if "=" in word and not word.startswith("-")]
    unknown = [word for word in extras if word not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def add_config_command(commands: argparse._SubParsersAction, name: str, handler: Callable[[argparse.Namespace], int],
                       **parser_args: Any) -> argparse.ArgumentParser:
    """A subcommand `NAME CONFIG [overrides]` that runs `handler(args)`; its parser, for further options."""
    parser = commands.add_parser(name, **parser_args)
    add_config_args(parser)
    parser.set_defaults(func=handler)
    return parser


def to_yaml(cfg: RunConfig) -> str:
    """The fully resolved config as YAML (written into each run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a (sub)config, for manifests and hashes."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def tokenizer_dir(cfg: RunConfig) -> Path:
    """Where the run's tokenizer lives: `tokenizer.path` when given, else RUN_DIR/tokenizer."""
    return Path(cfg.tokenizer.path) if cfg.tokenizer.path else Path(cfg.run_dir) / "tokenizer"


def data_dir(cfg: RunConfig) -> Path:
    """Where the run's prepared token shards and manifest live."""
    return Path(cfg.run_dir) / "data"


def model_dir(cfg: RunConfig) -> Path:
    """Where the trainer writes the final weights in Ondol's format (read by export and generate)."""
    return Path(cfg.run_dir) / "model"
