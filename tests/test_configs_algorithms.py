"""Every Hydra config composes; every algorithm runs ask-and-tell and pickles."""

from pathlib import Path

import dill
import numpy as np
import pytest
from hydra import compose, initialize_config_module

import evomerge.cli  # noqa: F401  (registers the em_or resolver)
from evomerge.errors import ConfigError
from evomerge.session import build_strategy
from evomerge.search.genome import GenomeSpace

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = {g: sorted(p.stem for p in (CONFIGS / g).glob("*.yaml")) for g in ("algorithm", "genome", "modelpool", "fitness", "executor")}
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def composed(overrides=()):
    with initialize_config_module(config_module="evomerge.configs", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    cfg = composed([f"{group}={option}"])
    assert cfg[group] is not None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = composed([f"+experiment={experiment}"])
    assert cfg.search.max_evals > 0


def test_configs_are_packaged_where_the_cli_looks():
    import evomerge.configs

    assert Path(evomerge.configs.__file__).parent == CONFIGS


def space():
    return GenomeSpace(n_experts=2, n_layers=4, methods=("ties", "slerp", "dare_ties"), layer_groups=2)


@pytest.mark.parametrize("algorithm", GROUPS["algorithm"])
def test_algorithm_ask_tell_checkpoint(algorithm):
    """Two generations on a synthetic 2-objective problem, pickled in between."""
    cfg = composed([f"algorithm={algorithm}", "genome=layerwise_mixed"])
    single_method = algorithm in ("grid", "bo", "map")  # grid: few genes; bo/map: continuous genes only
    s = space() if not single_method else GenomeSpace(n_experts=2, n_layers=4, methods=("task_arithmetic",), separate_embed_head=False)
    strategy = build_strategy(cfg, s)
    strategy.setup(s.n_var, 2, max_evals=64, seed=1)
    for generation in range(2):
        if generation and algorithm == "hand_made":  # one generation of hand-made points
            assert not strategy.has_next()
            break
        X = strategy.ask()
        assert X.ndim == 2 and X.shape[1] == s.n_var and len(X) > 0
        assert np.all((X >= 0) & (X <= 1))
        F = np.stack([X[:, 0], 1 - X[:, 1]], axis=1)
        strategy.tell(X, F)
        strategy = dill.loads(dill.dumps(strategy))
    assert strategy.has_next() in (True, False)


def test_grid_needs_enough_budget():
    cfg = composed(["algorithm=grid"])
    s = space()
    with pytest.raises(ConfigError, match="grid over .* genes needs at least"):
        build_strategy(cfg, s).setup(s.n_var, 2, max_evals=50, seed=0)


def test_unknown_algorithm_option_is_a_config_error():
    cfg = composed(["algorithm=nsga2", "+algorithm.popsize=3"])
    with pytest.raises(ConfigError, match="invalid algorithm"):
        build_strategy(cfg, space())
