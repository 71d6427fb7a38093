"""The driver's pure parts: data cursors, stage lengths, step metrics and finding the latest
checkpoint. No cluster: these run in the test process."""

from __future__ import annotations

import json
import random

import pytest

from actors.config import load_config
from actors.driver import Driver
from actors.run_state import COMPLETE_MARKER, CheckpointStore, DataCursor, stage_steps
from personadual.step_metrics import rollout_metrics, zero_variance_fraction
from personadual.modes import Mode
from tests.helpers import SMOKE, make_scored

G, P = Mode.GENERAL, Mode.PERSONALIZED


def test_a_cursor_visits_every_item_once_per_epoch_in_a_new_order_each_epoch():
    cursor = DataCursor(seed=5, size=7)
    first, second = cursor.take(7), cursor.take(7)
    assert sorted(first) == sorted(second) == list(range(7))
    assert first != second and cursor.state() == {"epoch": 1, "position": 7}
    # The order is (seed, epoch)'s own shuffle, nothing else.
    expected = list(range(7))
    random.Random(5 * 100_003 + 0).shuffle(expected)
    assert first == expected
    assert DataCursor(seed=6, size=7).take(7) != first


def test_a_take_across_an_epoch_boundary_continues_in_the_next_epochs_order():
    whole = DataCursor(seed=1, size=5)
    order = whole.take(10)
    split = DataCursor(seed=1, size=5)
    assert split.take(3) + split.take(4) + split.take(3) == order
    assert split.state() == {"epoch": 1, "position": 5}


def test_a_restored_cursor_takes_what_the_uninterrupted_one_takes():
    running = DataCursor(seed=3, size=6)
    running.take(4)
    saved = json.loads(json.dumps(running.state()))  # as a checkpoint holds it
    restored = DataCursor(seed=3, size=6)
    restored.restore(saved)
    assert restored.take(9) == running.take(9)


def test_stage_steps_are_the_set_steps_or_enough_for_the_epochs():
    assert stage_steps(steps=7, epochs=3.0, dataset_size=100, batch_size=10) == 7  # steps win when set
    assert stage_steps(steps=0, epochs=1.0, dataset_size=100, batch_size=10) == 10
    assert stage_steps(steps=0, epochs=1.0, dataset_size=101, batch_size=10) == 11  # a partial batch is a step
    assert stage_steps(steps=0, epochs=0.5, dataset_size=100, batch_size=16) == 4
    assert stage_steps(steps=0, epochs=0.0, dataset_size=100, batch_size=10) == 0  # the stage is off


def test_zero_variance_counts_groups_and_mode_subgroups_whose_rewards_are_all_equal():
    scored = [make_scored("a", G, 1.0), make_scored("a", G, 1.0), make_scored("a", P, 0.0), make_scored("a", P, 0.5),
              make_scored("b", G, 0.0), make_scored("b", P, 0.0),
              make_scored("c", G, 1.0), make_scored("c", None, 1.0), make_scored("c", P, None)]
    result = zero_variance_fraction(scored)
    # Groups: a varies; b and c are flat (c's dropped sample has no reward and does not count).
    assert result["group"] == pytest.approx(2 / 3)
    # Mode sub-groups: (a,G) flat, (a,P) varies, (b,G), (b,P), (c,G) flat; no-mode responses are in none.
    assert result["mode_group"] == pytest.approx(4 / 5)
    assert zero_variance_fraction([]) == {"group": 0.0, "mode_group": 0.0}


def test_rollout_metrics_are_per_mode_over_kept_samples_and_rates_over_all():
    scored = [make_scored("a", G, 1.0, response_token_ids=[1, 2]),
              make_scored("a", P, 0.0, response_token_ids=[1, 2, 3, 4], finish_reason="length"),
              make_scored("b", P, 0.5, response_token_ids=[1, 2, 3], correct=False),
              make_scored("b", None, 1.0, response_token_ids=[1]),
              make_scored("b", G, None, response_token_ids=[1, 2])]
    metrics = rollout_metrics(scored)
    assert (metrics["samples"], metrics["kept"]) == (5, 4)
    assert metrics["reward/general"] == 1.0  # the dropped general sample has no reward to count
    assert metrics["reward/personalized"] == pytest.approx(0.25)
    assert metrics["reward/mean"] == pytest.approx(2.5 / 4)
    assert metrics["reward/accuracy"] == pytest.approx(2 / 4)
    assert metrics["mode/rate_general"] == pytest.approx(2 / 5)
    assert metrics["mode/rate_personalized"] == pytest.approx(2 / 5)
    assert metrics["mode/rate_none"] == pytest.approx(1 / 5)
    assert metrics["response_length/mean"] == pytest.approx(12 / 5)
    assert (metrics["response_length/min"], metrics["response_length/max"]) == (1, 4)
    assert metrics["response_length/clip_ratio"] == pytest.approx(1 / 5)
    assert (metrics["reward/min"], metrics["reward/max"]) == (0.0, 1.0)
    assert metrics["zero_variance"] == zero_variance_fraction([s for s in scored if s.status != "dropped"])


def test_rollout_metrics_of_a_batch_without_one_mode_leave_its_reward_empty():
    metrics = rollout_metrics([make_scored("a", G, 1.0)])
    assert metrics["reward/personalized"] is None and metrics["mode/rate_personalized"] == 0.0


def _checkpoint(run_dir, name: str, stage: str, step: int, complete: bool = True) -> None:
    folder = run_dir / "checkpoints" / name
    folder.mkdir(parents=True)
    (folder / "driver_state.json").write_text(json.dumps({"stage": stage, "step": step}))
    if complete:
        (folder / COMPLETE_MARKER).write_text("")


def test_the_latest_checkpoint_is_the_last_complete_one_rl_after_sft(tmp_path):
    driver = Driver(load_config(SMOKE), tmp_path)
    assert driver.latest_checkpoint() is None  # no checkpoints folder yet
    _checkpoint(tmp_path, "sft_step_30", "sft", 30)
    assert driver.latest_checkpoint() == tmp_path / "checkpoints" / "sft_step_30"
    _checkpoint(tmp_path, "step_2", "rl", 2)
    _checkpoint(tmp_path, "step_10", "rl", 10)  # by step number, not by name
    _checkpoint(tmp_path, "step_11", "rl", 11, complete=False)  # cut short while saving
    _checkpoint(tmp_path, ".tmp-step_12", "rl", 12)  # a staging folder never counts
    assert driver.latest_checkpoint() == tmp_path / "checkpoints" / "step_10"


class _WritesFolders:
    """What CheckpointStore.save asks of a learner: write its part into the staging folder."""

    def save_checkpoint(self, path, client_state, reference_dir=None) -> None:
        (path / "learner").mkdir()
        (path / "learner" / "client_state.json").write_text(json.dumps(client_state))

    def save_hf(self, path) -> None:
        path.mkdir()


def test_keep_last_drops_the_oldest_rl_checkpoints_and_never_the_sft_one(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    store.save(_WritesFolders(), "sft", 30, {"stage": "sft", "step": 30})
    for step in (1, 2, 3):
        store.save(_WritesFolders(), "rl", step, {"stage": "rl", "step": step})
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["sft_step_30", "step_2", "step_3"]
    assert store.latest() == root / "step_3" and store.state(root / "step_3") == {"stage": "rl", "step": 3}
    # A complete checkpoint is never written again (a stop right after a save saves the same step).
    (root / "step_3" / "driver_state.json").write_text(json.dumps({"stage": "rl", "step": 3, "kept": True}))
    store.save(_WritesFolders(), "rl", 3, {"stage": "rl", "step": 3})
    assert store.state(root / "step_3")["kept"] is True


def test_resuming_cuts_the_metrics_back_to_the_checkpoint_in_run_order(tmp_path):
    records = [{"stage": "sft", "step": s} for s in (1, 2)] + [{"stage": "eval", "tag": "sft", "step": 0}]
    records += [{"stage": "rl", "step": s} for s in (1, 2, 3)] + [{"stage": "eval", "tag": "final", "step": 3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    store = CheckpointStore(tmp_path)
    store.truncate_metrics("rl", 2)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == records[:5]
    store.truncate_metrics("sft", 1)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == records[:1]


class _LoadsFolders(_WritesFolders):
    loaded = None

    def load_checkpoint(self, path) -> None:
        self.loaded = path


def test_restoring_puts_back_the_cursors_the_rng_and_the_metrics_of_the_newest_checkpoint(tmp_path):
    from actors.run_state import rng_state

    sft_cursor, rl_cursor, rng = DataCursor(0, 5), DataCursor(1, 7), random.Random(3)
    sft_cursor.take(3), rl_cursor.take(9), rng.random()
    state = {"stage": "rl", "step": 2, "sft_cursor": sft_cursor.state(), "rl_cursor": rl_cursor.state(),
             "driver_rng": rng_state(rng)}
    store = CheckpointStore(tmp_path)
    store.save(_WritesFolders(), "sft", 30, {**state, "stage": "sft", "step": 30})
    store.save(_WritesFolders(), "rl", 2, state)
    records = [{"stage": "rl", "step": s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    want = (sft_cursor.take(4), rl_cursor.take(4), rng.random())  # what the uninterrupted run draws next

    learner, fresh = _LoadsFolders(), (DataCursor(0, 5), DataCursor(1, 7), random.Random(3))
    assert store.restore_latest(learner, sft_cursor=fresh[0], rl_cursor=fresh[1], rng=fresh[2]) == ("rl", 2)
    assert learner.loaded == tmp_path / "checkpoints" / "step_2"
    assert (fresh[0].take(4), fresh[1].take(4), fresh[2].random()) == want
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == records[:2]
    assert CheckpointStore(tmp_path / "empty").restore_latest(learner, sft_cursor=fresh[0], rl_cursor=fresh[1],
                                                              rng=fresh[2]) == ("start", 0)
