"""Hyperparameter search over the align recipe: Ray Tune + Optuna (TPE) + ASHA.

``sea-ray tune --config FILE`` runs :func:`sea_ray.tune.search.run`; see ``docs/tune.md``.
Modules: :mod:`.space` (search dimensions -> trial configs), :mod:`.validation` (the held-out
metric), :mod:`.trials` (the trainables), :mod:`.search` (the Tuner, resume),
:mod:`.results` (table, best config, plots).
"""
