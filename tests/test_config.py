"""Config loading: composition, overrides, and errors that name the key, the file and the fix."""

from pathlib import Path

import pytest

from ondol.configs import ConfigError, RunConfig, load_config, to_yaml

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-ko.yaml"


def test_tiny_config_composes_preset_file_and_overrides():
    cfg = load_config(TINY, ["model.n_layers=8", "train.steps=7"])
    assert isinstance(cfg, RunConfig)
    assert cfg.model.d_model == 128  # from configs/model/tiny.yaml via `defaults`
    assert cfg.model.n_layers == 8 and cfg.train.steps == 7  # overrides win
    assert [s.name for s in cfg.data.sources] == ["ko_reviews", "ko_docs"]


def test_override_reaches_into_list_entries():
    cfg = load_config(TINY, ["data.sources.0.max_docs=10", "data.sources[1].weight=0.25"])
    assert cfg.data.sources[0].max_docs == 10 and cfg.data.sources[1].weight == 0.25
    with pytest.raises(ConfigError, match=r"'data.sources' has 2 entries, so index 5 does not exist"):
        load_config(TINY, ["data.sources[5].name=x"])
    with pytest.raises(ConfigError, match=r"unknown key 'data.sources\[0\].text_feild'"):
        load_config(TINY, ["data.sources[0].text_feild=body"])


def test_corpora_dir_comes_from_env_or_override(monkeypatch, tmp_path):
    monkeypatch.setenv("ONDOL_CORPORA", str(tmp_path))
    assert load_config(TINY).data.sources[0].path == f"{tmp_path}/ko_reviews.jsonl.gz"
    cfg = load_config(TINY, ["corpora_dir=/data/nsmc"])
    assert cfg.data.sources[1].path == "/data/nsmc/ko_docs.jsonl.gz"


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(TINY, ["seed=7"])
    out = tmp_path / "config.yaml"
    out.write_text(to_yaml(cfg))
    assert load_config(out) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layer=3", "override 'model.n_layer=3': unknown key 'model.n_layer' (did you mean 'model.n_layers'?)"),
        ("optim.lrr=1e-3", "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("model.n_layers=four", "wrong type for key 'model.n_layers'"),
        ("train.steps", "write overrides as key=value"),
        ("launch.slurm.partition=`gpu`", ("override 'launch.slurm.partition=`gpu`': not a valid YAML value (found "
                                          "character that cannot start any token); quote it, e.g. "
                                          "launch.slurm.partition='\"`gpu`\"'")),
    ],
)
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(TINY, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_yaml_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value) == f"{bad}: unknown key 'train.stepz' (did you mean 'train.steps'?)"


def test_unknown_key_inside_a_source_entry(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sources:\n    - name: a\n      path: x.jsonl\n      text_feild: body\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value) == (
        f"{bad}: unknown key 'data.sources[0].text_feild' (did you mean 'data.sources[0].text_field'?)"
    )


def test_missing_preset_names_the_run_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [model/nope.yaml]\n")
    with pytest.raises(ConfigError, match=f"{bad}: defaults entry 'model/nope.yaml' not found"):
        load_config(bad)


def test_wrong_type_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  window: [1, 2]\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value).startswith(f"{bad}: wrong type for key 'model.window'")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {d_model: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(broken)
    assert str(info.value) == (f"{broken}:2:1: not valid YAML: did not find expected ',' or '}}' while parsing a "
                               "flow mapping that starts on line 1 (fix the syntax there)")


def test_component_checks_become_one_line_config_errors():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["deepspeed.zero_stage=3", "deepspeed.expert_parallel_size=2"])
    assert str(info.value) == (
        f"{TINY} with deepspeed.zero_stage=3 deepspeed.expert_parallel_size=2: deepspeed.zero_stage=3 is not "
        "supported with deepspeed.expert_parallel_size=2: use ZeRO stage 0, 1 or 2")
    with pytest.raises(ConfigError, match="model.n_heads must be divisible by model.n_kv_heads"):
        load_config(TINY, ["model.n_kv_heads=3"])


def test_seq_len_above_max_seq_len_names_both_keys():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["data.seq_len=2048"])
    assert str(info.value) == (f"{TINY} with data.seq_len=2048: data.seq_len (2048) is above model.max_seq_len "
                               "(1024): lower data.seq_len or raise model.max_seq_len")
    assert load_config(TINY, ["data.seq_len=1024"]).data.seq_len == 1024  # equal is fine


def test_a_run_directory_is_the_run_whatever_its_config_yaml_records(tmp_path):
    from ondol.configs import load_run_config, tokenizer_dir

    run = tmp_path / "copied"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_config(TINY, ["run_dir=runs/original",
                                                                 "tokenizer.path=/elsewhere/tokenizer"])))
    assert load_run_config(run).run_dir == str(run)
    assert tokenizer_dir(load_run_config(run)) == Path("/elsewhere/tokenizer")  # the run has none of its own
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "meta.json").write_text("{}")
    assert tokenizer_dir(load_run_config(run)) == run / "tokenizer"
    assert load_run_config(run / "config.yaml").run_dir == "runs/original"  # a file is read as `ondol train` does
    with pytest.raises(ConfigError, match="the run is .*copied, as given on the command line"):
        load_run_config(run, ["run_dir=/other"])
    with pytest.raises(ConfigError, match=r"nowhere: not found: .*config.yaml"):
        load_run_config(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty: has no config.yaml"):
        load_run_config(tmp_path / "empty")
