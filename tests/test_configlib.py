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


@pytest.mark.parametrize("method", ["art", "spar", "lapradoor", "qgen", "retrieval"])
def test_a_wrong_variant_lists_every_variant_of_the_file(method):
    """The "known" list is the file's VARIANTS dict, and every name in it loads. Fails if a
    config file goes back to a hand-written list that misses a variant."""
    with pytest.raises(ValueError, match="unknown variant 'huge'") as e:
        load_config(f"configs/{method}.py:huge")
    known = str(e.value).split("known: ")[1].split(", ")
    assert len(known) >= 3 and "tiny" in known
    for name in known:
        assert load_config(f"configs/{method}.py:{name}") is not None


@pytest.mark.parametrize(
    "spec,old,new,value",
    [
        ("configs/art.py", "data.max_eval_questions", "data.max_eval_queries", "7"),
        ("configs/lapradoor.py", "data.dirs", "data.dir", "a,b"),
        ("configs/lapradoor.py", "data.eval_dirs", "data.eval_dir", "a"),
        ("configs/spar.py", "recipe", "method", "spar"),
    ],
)
def test_a_renamed_key_names_its_new_name(spec, old, new, value):
    """One name per concept across methods; an old name is refused naming the new one.
    Fails if RENAMED loses the entry (the error then lists the level's keys instead)."""
    with pytest.raises(ConfigError, match=f"now '{new}'"):
        load_config(spec, [(old, value)])
    cfg = load_config(spec, [(new, value)])
    node = cfg.data if new.startswith("data.") else cfg
    assert str(node[new.split(".")[-1]]) == value


def test_a_run_saved_under_an_old_key_name_resumes_under_the_new_one():
    """A workdir written before a key was renamed is compared under the new name: no change
    reported for the renamed key, a real change still is. Fails if config_changes ignores
    RENAMED (it then reports `recipe` absent and `method` new)."""
    from jaxret.train.loop import config_changes

    saved = {"recipe": "art", "data.max_eval_questions": 40, "train.steps": 6}
    now = {"method": "art", "data.max_eval_queries": 40, "train.steps": 6}
    assert config_changes(saved, now) == []
    assert config_changes(saved, {**now, "train.steps": 7}) == ["train.steps: 6 -> 7"]
