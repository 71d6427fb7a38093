"""The driver's staleness rule (algo.max_staleness): counted in learner updates, not in
weight versions (one update may hold several optimizer steps)."""

from __future__ import annotations

import pytest

from personadual.staleness import StaleRolloutsError, check_staleness, rollout_staleness


def test_staleness_counts_learner_updates_after_the_rollouts_weights():
    # SFT ended at version 30; three RL updates of two optimizer steps each.
    updates = [32, 34, 36]
    assert rollout_staleness([36, 34, 32, 30], updates) == [0, 1, 2, 3]
    assert rollout_staleness([30], []) == [0]  # the first RL step's rollouts, right after SFT


def test_synchronous_runs_refuse_any_lag_and_pipelined_ones_one_update():
    assert check_staleness(3, [34, 34], [32, 34], max_staleness=0) == [0, 0]
    with pytest.raises(StaleRolloutsError, match=r"2 rollouts offered to RL step 3 are 1 learner updates old "
                                                   r"\(weight version 32, learner at 34\); algo.max_staleness=0"):
        check_staleness(3, [32, 32], [32, 34], max_staleness=0)
    assert check_staleness(3, [32, 34], [32, 34], max_staleness=1) == [1, 0]
    with pytest.raises(StaleRolloutsError, match="algo.max_staleness=1"):
        check_staleness(4, [32], [32, 34, 36], max_staleness=1)
