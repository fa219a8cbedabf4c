"""OptunaSearch that tells Optuna what ASHA did.

Ray's ``OptunaSearch`` reports a trial that ASHA stopped after a few steps as COMPLETE, with the
value it had then, as if it were final: TPE then models early, worse values as the outcome of
those parameters. Here such a trial is PRUNED, with its intermediate values reported at the
training step. TPE ranks pruned trials below every completed one and, among themselves, by how
far they got and their last value: Optuna's own multi-fidelity rule (what it does with its
pruners). Imported only when a search uses Optuna.
"""

from __future__ import annotations

import logging

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


class AshaAwareOptunaSearch(OptunaSearch):
    def __init__(self, *args, max_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_steps = max_steps
        self._reported: dict[str, set[int]] = {}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value, step = result.get(self.metric), result.get("step")
        seen = self._reported.setdefault(trial_id, set())
        if value is not None and step is not None and int(step) not in seen:
            seen.add(int(step))
            self._ot_trials[trial_id].report(value, int(step))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped_early = (not error and bool(result) and trial_id in self._ot_trials
                         and trial_id not in self._completed_trials
                         and int(result.get("step", self._max_steps)) < self._max_steps)
        if not stopped_early:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        self.on_trial_result(trial_id, result)  # the stopping result itself (often the only one)
        try:
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        except Exception as exc:  # noqa: BLE001 - as the stock searcher does: log and go on
            log.warning("optuna: %s", exc)
        self._completed_trials.add(trial_id)


class GoodFraction:
    """TPE's gamma as a fraction: the best ``ceil(fraction * n)`` trials (at most 25) of ``n``
    form its "good" density (Optuna's default is 10%, i.e. one trial below ten)."""

    def __init__(self, fraction: float):
        self.fraction = fraction

    def __call__(self, n: int) -> int:
        import math

        return min(math.ceil(self.fraction * n), 25)
