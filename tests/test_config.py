"""Configuration: YAML + overrides; wrong keys and values stop start-up naming the dotted path."""
from pathlib import Path

import pytest

from fluxir.config import ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.name


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["pretrain.steps=7", "eval.nfe=[1, 3]", "model.lora.enabled=true", "flow.sigma_src=0.2"])
    assert (cfg.pretrain.steps, cfg.eval.nfe, cfg.model.lora.enabled, cfg.flow.sigma_src) == (7, [1, 3], True, 0.2)


@pytest.mark.parametrize("override, path", [
    ("pretrain.stepz=3", "pretrain.stepz"),
    ("model.lora.rnak=3", "model.lora.rnak"),
    ("pretrain.steps=-1", "pretrain.steps"),
    ("flow.source=uniform", "flow.source"),
    ("data.tasks=[sr, dehaze]", "data.tasks"),
    ("data.crop=30", "data.crop"),
])
def test_bad_key_or_value_names_the_dotted_path(override, path):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert path in str(err.value)


def test_bad_yaml_file_names_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\npretrain:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*pretrain\.lr"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_malformed_override():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["pretrain.steps"])


def test_gaussian_source_needs_full_start():
    with pytest.raises(ConfigError, match="gaussian"):
        load_config(None, ["flow.source=gaussian", "flow.t_start=0.5"])


def test_an_empty_config_file_is_refused(tmp_path):
    for text in ("", "# only a comment\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        with pytest.raises(ConfigError, match="empty.yaml: the config file is empty"):
            load_config(empty)


def test_file_settings_resolve_against_the_config_file_not_the_working_folder(tmp_path, monkeypatch):
    """A YAML's relative DeepSpeed/sweep paths are relative to the YAML; overrides to the working folder;
    the defaults are the shipped files. Checked from a folder that holds none of them."""
    import tomllib

    from fluxir.config import CONFIGS, FILE_KEYS

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    cfg = load_config(root / "configs/flux-dev-7task.yaml", ["model.path=/m", "pretrain.deepspeed=mine.json"])
    assert cfg.rl.deepspeed == str(root / "configs/deepspeed/zero2_bf16.json")
    assert cfg.pretrain.deepspeed == str(tmp_path / "mine.json")
    defaults = load_config()
    for dotted in FILE_KEYS:
        section, key = dotted.split(".")
        value = Path(getattr(getattr(defaults, section), key))
        assert value.is_absolute() and value.is_file() and value.is_relative_to(CONFIGS), (dotted, value)
    # an installed (non-editable) fluxir ships every file of configs/ as fluxir.configs
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"]["fluxir.configs"] == "configs"
    shipped = {f for pattern in setup["package-data"]["fluxir.configs"] for f in (root / "configs").glob(pattern)}
    assert shipped == {f for f in (root / "configs").rglob("*") if f.is_file()}
