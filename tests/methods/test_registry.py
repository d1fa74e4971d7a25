"""`jaxret train` finds a method from its config through jaxret.methods.METHODS."""

import importlib

import pytest

from jaxret.configlib import ConfigError, load_config
from jaxret.methods import METHODS, preparer, trainer
from jaxret.train.loop import Runner


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_has_a_trainer_and_a_config_naming_it(name):
    """Each registered method's module trains (`train`), and `configs/<name>.py` selects it.
    Fails if a config's `method` and the registry drift apart."""
    cfg = load_config(f"configs/{name}.py:tiny")
    assert cfg.method == name
    assert trainer(cfg) is importlib.import_module(METHODS[name]).train


def test_single_stage_methods_train_through_the_runner_base():
    """ART, SPAR and LaPraDoR are Runner subclasses whose `train` is the base's; QGen's is
    the chain of its stages (each stage a Runner)."""
    for name in ("art", "spar", "lapradoor"):
        train = importlib.import_module(METHODS[name]).train
        assert issubclass(train.__self__, Runner)
        assert train.__func__ is Runner.train.__func__
    from jaxret.methods.qgen import generator, retriever

    assert issubclass(generator.GeneratorRun, Runner) and issubclass(retriever.RetrieverRun, Runner)


def test_an_unknown_method_is_named_and_every_method_prepares():
    cfg = load_config("configs/art.py:tiny", [("method", "dpr")])
    with pytest.raises(ConfigError, match=r"method='dpr'; known: art, lapradoor, qgen, spar"):
        trainer(cfg)
    for name in METHODS:  # every method builds its store before a multi-process job
        assert preparer(load_config(f"configs/{name}.py:tiny")).__module__ == METHODS[name]
