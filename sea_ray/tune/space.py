"""The search space: YAML dimensions -> Optuna distributions or Tune domains, and a trial's
sampled parameters -> a complete, validated align config.

A dimension is keyed by a dotted key of the base align config (``sea.init_temperature``,
``model.adapter.type``); a trial's parameters are ``{dotted key: value}``. Ray Tune and Optuna are
imported inside the functions that need them.
"""

from __future__ import annotations

import math
from typing import Any

from sea_ray.config.loading import set_dotted, to_dict, validate
from sea_ray.config.schema import AlignConfig, TuneConfig


def optuna_distributions(cfg: TuneConfig) -> dict[str, Any]:
    """``{dotted key: optuna distribution}`` (what OptunaSearch samples from, and what a study
    rebuilt from the results table needs for parameter importances)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, dim in cfg.space.items():
        if dim.type == "uniform":
            out[key] = FloatDistribution(dim.low, dim.high)
        elif dim.type == "loguniform":
            out[key] = FloatDistribution(dim.low, dim.high, log=True)
        elif dim.type == "randint":
            out[key] = IntDistribution(int(dim.low), int(dim.high))
        else:
            out[key] = CategoricalDistribution(list(dim.values))
    return out


def tune_domains(cfg: TuneConfig) -> dict[str, Any]:
    """``{dotted key: tune domain}`` for random search (Tune's randint excludes its upper bound,
    ours includes it)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, dim in cfg.space.items():
        if dim.type == "uniform":
            out[key] = tune.uniform(dim.low, dim.high)
        elif dim.type == "loguniform":
            out[key] = tune.loguniform(dim.low, dim.high)
        elif dim.type == "randint":
            out[key] = tune.randint(int(dim.low), int(dim.high) + 1)
        else:
            out[key] = tune.choice(list(dim.values))
    return out


def params_of(cfg: TuneConfig, config: dict) -> dict[str, Any]:
    """The searched parameters of a Tune trial config, by dotted key, in space order."""
    return {key: _plain(config[key]) for key in cfg.space if key in config}


def _plain(value: Any) -> Any:
    """numpy scalars (from Tune's samplers) -> Python scalars, so configs and YAML stay plain."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    return value


def apply_params(base: AlignConfig, params: dict[str, Any], **fields: Any) -> dict:
    """The base config as plain data with ``params`` (dotted keys) and ``fields`` (dotted keys
    too, e.g. ``run.name``) applied; not yet validated."""
    raw = to_dict(base)
    for key, value in {**params, **fields}.items():
        set_dotted(raw, key, _plain(value))
    return raw


def trial_config(cfg: TuneConfig, params: dict[str, Any], trials_root: str, trial_id: str) -> AlignConfig:
    """The align config of one trial: base + parameters, run folder ``<trials_root>/<trial_id>``,
    logging (= validation and reporting) every ``report_every_n_steps`` steps, and checkpoints on
    reporting steps only (so every reported metric is a fresh one)."""
    every = cfg.report_every_n_steps
    ckpt_every = math.ceil(cfg.base.checkpoint.every_n_steps / every) * every
    raw = apply_params(cfg.base, params, **{"run.name": trial_id, "run.storage": trials_root,
                                            "log_every_n_steps": every, "checkpoint.every_n_steps": ckpt_every})
    return validate(raw, job="align")
