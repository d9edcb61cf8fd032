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
    (tmp_path / "mine.json").write_text((root / "configs/deepspeed/zero3_bf16.json").read_text())
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


def test_deepspeed_json_is_checked_when_the_config_loads(tmp_path):
    """A missing or malformed DeepSpeed JSON, gradient accumulation, or a bf16 model under an fp32 JSON:
    refused at load, naming the setting; the ZeRO stage is the JSON's own."""
    from fluxir.config import zero_stage

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match="rl.deepspeed: no DeepSpeed JSON at .*missing.json"):
        load_config(root / "configs/smoke.yaml", [f"rl.deepspeed={tmp_path / 'missing.json'}"])
    (tmp_path / "bad.json").write_text("{stage: 2")
    with pytest.raises(ConfigError, match="pretrain.deepspeed: .*bad.json is not valid JSON"):
        load_config(root / "configs/smoke.yaml", [f"pretrain.deepspeed={tmp_path / 'bad.json'}"])
    (tmp_path / "accum.json").write_text('{"gradient_accumulation_steps": 4}')
    with pytest.raises(ConfigError, match="rl.deepspeed: .*gradient_accumulation_steps"):
        load_config(root / "configs/smoke.yaml", [f"rl.deepspeed={tmp_path / 'accum.json'}"])
    with pytest.raises(ConfigError, match="model.dtype=bfloat16 needs a DeepSpeed JSON with bf16"):
        load_config(root / "configs/smoke.yaml", ["model.dtype=bfloat16"])
    assert zero_stage(root / "configs/deepspeed/zero3_bf16.json") == 3
    with pytest.raises(ConfigError, match="unknown key"):  # the JSON alone sets the ZeRO stage
        load_config(root / "configs/smoke.yaml", ["rl.zero_stage=3"])


def test_settings_that_span_sections_are_checked_by_the_config():
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match="data.batch_size 15 is not divisible by pretrain.num_workers 2"):
        load_config(root / "configs/smoke.yaml", ["data.batch_size=15", "pretrain.num_workers=2"])
    with pytest.raises(ConfigError, match="rl.candidates=2 needs a stochastic step"):
        load_config(root / "configs/smoke.yaml", ["rl.nfe=1", "rl.candidates=2"])
    with pytest.raises(ConfigError, match="rl.iterations=null needs rl.max_seconds"):
        load_config(root / "configs/smoke.yaml", ["rl.iterations=null"])
    assert load_config(root / "configs/smoke.yaml", ["rl.iterations=null", "rl.max_seconds=5"]).rl.iterations is None


def test_a_stored_config_with_retired_keys_still_loads():
    """Policy cards and export manifests written with `pretrain.zero_stage`/`rl.zero_stage` load; the keys
    are dropped (the DeepSpeed JSON holds the ZeRO stage); an unknown key is still refused."""
    from fluxir.config import Config, stored_config

    tree = Config().model_dump(mode="json")
    tree["pretrain"]["zero_stage"] = tree["rl"]["zero_stage"] = 2
    assert stored_config(tree, "policy.json") == Config()
    assert "zero_stage" in tree["rl"]  # the caller's dict is left as it was
    tree["rl"]["zero_stages"] = 2
    with pytest.raises(ConfigError, match="policy.json.*rl.zero_stages: unknown key"):
        stored_config(tree, "policy.json")
