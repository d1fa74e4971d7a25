import pytest

from jaxret.configlib import ConfigError, load_config, split_config_args


def test_variants_and_typed_overrides():
    cfg = load_config(
        "configs/retrieval.py:tiny",
        [
            ("model.max_passage_length", "128"),
            ("mesh.shape", "(4, 2)"),
            ("model.normalize", "false"),
            ("model.scale", "20"),
            ("model.pooling", "cls"),
        ],
    )
    assert cfg.model.max_passage_length == 128
    assert cfg.mesh.shape == (4, 2)
    assert cfg.model.normalize is False
    assert cfg.model.scale == 20.0 and isinstance(cfg.model.scale, float)
    assert cfg.model.pooling == "cls"
    assert cfg.encode.batch_size == 16  # from the tiny variant


def test_misspelled_key_names_the_key():
    with pytest.raises(ConfigError, match="model.max_pasage_length"):
        load_config("configs/retrieval.py", [("model.max_pasage_length", "128")])
    with pytest.raises(ConfigError, match="modle"):
        load_config("configs/retrieval.py", [("modle.pooling", "cls")])


def test_bad_values_and_variants():
    with pytest.raises(ConfigError, match="expected int"):
        load_config("configs/retrieval.py", [("model.max_passage_length", "'long'")])
    with pytest.raises(ConfigError, match="boolean"):
        load_config("configs/retrieval.py", [("model.normalize", "maybe")])
    with pytest.raises(ValueError, match="unknown variant"):
        load_config("configs/retrieval.py:huge")
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.py")


def test_split_config_args():
    spec, overrides, rest = split_config_args(
        [
            "--config=configs/retrieval.py:tiny",
            "--config.model.pooling",
            "cls",
            "--x",
            "1",
            "--config.seed=3",
        ]
    )
    assert spec == "configs/retrieval.py:tiny"
    assert overrides == [("model.pooling", "cls"), ("seed", "3")]
    assert rest == ["--x", "1"]
