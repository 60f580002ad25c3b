import pytest

from tasks.config import PRESETS_DIR, ConfigError, PipelineConfig, load_config

PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def test_there_is_a_default_and_a_gpu_preset():
    assert "tiny-cpu" in PRESETS
    assert any(p.endswith("-gpu") for p in PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.preset == name
    first_line = (PRESETS_DIR / f"{name}.yaml").read_text().splitlines()[:3]
    assert any("Run:" in line and "smelt run" in line for line in first_line), "header must say how to run it"


def test_override_changes_nested_values():
    cfg = load_config("tiny-cpu", ["train.steps=7", "quant.methods=[none]", "model.embedded.base.num_layers=2"])
    assert cfg.train.steps == 7
    assert cfg.quant.methods == ["none"]
    assert cfg.model.embedded.base.num_layers == 2


@pytest.mark.parametrize(
    "override, field, reason",
    [
        ("train.steps=-3", "train.steps", "greater than or equal to 1"),
        ("train.steps=abc", "train.steps", "valid integer"),
        ("quant.methods=[gptq-int3]", "quant.methods.0", "torchao-int8-dyn"),
        ("train.learning_rate=5", "train.learning_rate", "less than 1"),
        ("train.optimiser=adam", "train.optimiser", "Extra inputs are not permitted"),
        ("model.embedded.base.num_heads=5", "model.embedded.base.num_heads", "not divisible by num_heads 5"),
        ("quant.methods=[none, none]", "quant.methods", "duplicates"),
    ],
)
def test_bad_override_is_refused_naming_field_and_reason(override, field, reason):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-cpu", [override])
    msg = str(err.value)
    assert f"{field} = " in msg and reason in msg, msg


def test_malformed_override_and_unknown_preset():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("tiny-cpu", ["train.steps"])
    with pytest.raises(ConfigError, match="no config file or preset named 'nope'.*tiny-cpu"):
        load_config("nope")


def test_a_preset_that_extends_another_changes_only_what_it_lists(tmp_path):
    dpo, base = load_config("tiny-cpu-dpo"), load_config("tiny-cpu")
    assert dpo.train.preference.method == "dpo" and base.train.preference.method == "none"
    assert dpo.etl.sources == ["data/orders.jsonl", "data/orders-preference.jsonl"]
    assert dpo.train.model_dump(exclude={"preference"}) == base.train.model_dump(exclude={"preference"})
    assert dpo.model == base.model and dpo.quant == base.quant and dpo.decode == base.decode
    assert dpo.train.stages() == ("train", "preference", "draft") and base.train.stages() == ("train", "draft")
    looped = tmp_path / "a.yaml"
    looped.write_text(f"extends: {looped}\n")
    with pytest.raises(ConfigError, match="makes a loop"):
        load_config(str(looped))
