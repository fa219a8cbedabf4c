"""OptunaSearch that tells Optuna what ASHA did.

Ray's ``OptunaSearch`` reports a trial that ASHA stopped after a few steps as COMPLETE, with the
value it had then, as if it were final: TPE then models early, worse values as the outcome of
those parameters. Here such a trial is PRUNED, with its intermediate values reported at the
training step. TPE ranks pruned trials below every completed one and, among themselves, by how
far they got and their last value: Optuna's own multi-fidelity rule (what it does with its
pruners). Imported only when a search uses Optuna.

Only public API of both libraries: the trial's intermediate values go through the stock
``on_trial_result`` (which reports ``result[metric]`` at ``result["training_iteration"]``; given
the training step there), and a stopped trial is ended through the stock ``on_trial_complete``
without a result (which tells Optuna PRUNED). Which trials this searcher suggested and which have
ended is our own bookkeeping, saved and restored with the searcher (its ``save`` pickles the whole
object). ``tests/test_tune.py::test_optuna_learns_that_asha_stopped_a_trial`` pins the result in
the Optuna study, read through Optuna's public ``load_study``.
"""

from __future__ import annotations

from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch


class AshaAwareOptunaSearch(OptunaSearch):
    def __init__(self, *args, max_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_steps = max_steps
        self._reported: dict[str, set[int]] = {}  # trial suggested here -> training steps told to Optuna
        self._ended: set[str] = set()

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if config is not None:
            self._reported.setdefault(trial_id, set())
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        seen = self._reported.get(trial_id)
        if seen is None or trial_id in self._ended:
            return
        value, step = result.get(self.metric), result.get("step")
        if value is not None and step is not None and int(step) not in seen:
            seen.add(int(step))
            super().on_trial_result(trial_id, {**result, TRAINING_ITERATION: int(step)})

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped_early = (not error and bool(result) and trial_id in self._reported and trial_id not in self._ended
                         and int(result.get("step", self._max_steps)) < self._max_steps)
        if stopped_early:
            self.on_trial_result(trial_id, result)  # the stopping result itself (often the only one)
            result = None  # ended without a final value: the stock searcher tells Optuna PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)
        self._ended.add(trial_id)


class GoodFraction:
    """TPE's gamma as a fraction: the best ``ceil(fraction * n)`` trials (at most 25) of ``n``
    form its "good" density (Optuna's default is 10%, i.e. one trial below ten)."""

    def __init__(self, fraction: float):
        self.fraction = fraction

    def __call__(self, n: int) -> int:
        import math

        return min(math.ceil(self.fraction * n), 25)
