"""Building the configured fitness estimator (``fitness.estimator``, a ``_target_`` config)."""

from __future__ import annotations

import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf

from evomerge.errors import ConfigError
from evomerge.estimators.base import Estimator, FitnessContext


def build_estimator(node: DictConfig | None, ctx: FitnessContext) -> Estimator:
    """``node`` is the ``fitness.estimator`` config (partial ``_target_``); run directories
    written before estimators existed have none and get the fixed-subset estimator."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if node is None:
        from evomerge.estimators.subset import subset_estimator

        return subset_estimator(ctx)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError("fitness.estimator must be a config with a _target_ (fitness/estimator=subset|multifidelity|irt)")
    try:
        factory: Any = instantiate(node)
    except InstantiationException as exc:
        raise ConfigError(f"invalid fitness.estimator config: {str(exc).splitlines()[0]}") from None
    try:
        inspect.signature(factory).bind(ctx)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid fitness.estimator option ({OmegaConf.select(node, '_target_')}): {exc}") from None
    return factory(ctx)
