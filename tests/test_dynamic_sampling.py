"""Dynamic sampling (algo.filter_groups): the filter's counts equal the groups whose rewards are
all equal, counted here independently; the batch holds only groups with a reward spread, at
most prompts_per_step of them; a real run reports the counts and draws exactly the prompts it
says it generated."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from personadual.algo_config import AlgoConfig, AlgoConfigError
from personadual.group_filter import fill_batch, next_round_prompts
from personadual.modes import Mode
from personadual.records import Scored
from tests.helpers import SMOKE, make_scored, run_launch


def random_round(rng: random.Random, tag: str, prompts: int, per_group: int) -> list[Scored]:
    """``prompts`` groups; rewards from a small set so many groups are uniform, a few samples
    dropped (one group sometimes wholly), rewards as the scorers give them (0, 0.5, 1)."""
    scored = []
    for p in range(prompts):
        style = rng.choice(["zeros", "ones", "mixed", "mixed", "all_dropped", "one_left"])
        for i in range(per_group):
            mode = Mode.GENERAL if i % 2 == 0 else Mode.PERSONALIZED
            if style == "zeros":
                reward = 0.0
            elif style == "ones":
                reward = 1.0
            elif style == "all_dropped":
                reward = None
            elif style == "one_left":
                reward = rng.choice([0.0, 1.0]) if i == 0 else None
            else:
                reward = rng.choice([0.0, 0.5, 1.0, None])
            scored.append(make_scored(f"{tag}-{p}", mode, reward, sample_index=i))
    rng.shuffle(scored)  # a group's samples need not be adjacent
    return scored


def uniform_count(scored: list[Scored]) -> int:
    """Groups, with at least one reward, whose rewards form a single value: counted with sets."""
    rewards: dict[str, set[float]] = {}
    for item in scored:
        if item.reward is not None:
            rewards.setdefault(item.rollout.prompt.id, set()).add(item.reward)
    return sum(len(values) == 1 for values in rewards.values())


@pytest.mark.parametrize("seed", range(25))
def test_filtered_groups_are_the_groups_whose_rewards_are_all_equal(seed):
    rng = random.Random(seed)
    target, per_group, max_rounds = rng.randint(1, 8), rng.choice([2, 4, 8]), rng.randint(1, 4)
    first = random_round(rng, "r0", target, per_group)
    rounds = [first]

    def generate(round_index: int, count: int) -> list[Scored]:
        assert round_index == len(rounds) and 1 <= count <= target
        rounds.append(random_round(rng, f"r{round_index}", count, per_group))
        return rounds[-1]

    batch, counts = fill_batch(first, target_groups=target, max_rounds=max_rounds, generate=generate)
    every = [item for round_ in rounds for item in round_]
    assert counts.filtered_groups == uniform_count(every)
    assert counts.rounds == len(rounds) <= max_rounds
    assert counts.prompts_generated == len({item.rollout.prompt.id for item in every})
    with_rewards = {item.rollout.prompt.id for item in every if item.reward is not None}
    assert counts.groups_seen == len(with_rewards)
    assert counts.filtered_groups + counts.surplus_groups + (0 if counts.fallback else counts.kept_groups) \
        == counts.groups_seen
    batch_groups = {item.rollout.prompt.id for item in batch}
    if counts.fallback:
        assert uniform_count(every) == len(with_rewards)  # no group anywhere had a spread
        assert batch == first
    else:
        assert len(batch_groups) == counts.kept_groups <= target
        assert uniform_count(batch) == 0
        # Whole groups, every sample of them (dropped ones too: the learner leaves those out).
        assert sorted(map(id, batch)) == sorted(id(s) for s in every if s.rollout.prompt.id in batch_groups)
        # Stopped at the first round that filled the batch, or at the bound.
        assert counts.kept_groups == target or counts.rounds == max_rounds


def test_a_full_first_round_generates_nothing_more():
    first = [make_scored(f"g{g}", Mode.GENERAL, float(i), sample_index=i) for g in range(3) for i in range(2)]

    def generate(round_index: int, count: int) -> list[Scored]:
        raise AssertionError("no further round was needed")

    batch, counts = fill_batch(first, target_groups=3, max_rounds=4, generate=generate)
    assert batch == first and (counts.rounds, counts.filtered_groups, counts.prompts_generated) == (1, 0, 3)
    assert counts.metrics()["reward/filtered_groups"] == 0.0 and counts.metrics()["filter/rounds"] == 1.0


def test_extra_rounds_are_sized_by_the_share_of_groups_kept():
    assert next_round_prompts(missing=4, kept=0, seen=16, limit=16) == 16
    assert next_round_prompts(missing=4, kept=4, seen=16, limit=16) == 16  # a quarter kept: 4 x 4
    assert next_round_prompts(missing=3, kept=8, seen=16, limit=16) == 6
    assert next_round_prompts(missing=10, kept=1, seen=16, limit=16) == 16


def test_filter_max_rounds_below_one_is_refused_with_its_key():
    with pytest.raises(AlgoConfigError, match=r"^algo\.filter_max_rounds: must be >= 1, got 0$"):
        AlgoConfig(filter_max_rounds=0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_with_filter_groups_reports_its_counts_and_draws_the_prompts_it_generated(tmp_path: Path):
    import ray  # noqa: F401  (the real stack: a broken install fails here rather than skipping)
    import vllm  # noqa: F401

    # The checks are on the RL steps and the data cursor: the final eval is kept small and W&B off.
    result = run_launch("--config", str(SMOKE), f"run.out_dir={tmp_path}", "run.name=filter",
                        "algo.filter_groups=true", "algo.filter_max_rounds=3", "run.keep_last=1",
                        "eval.baselines=false", "eval.two_turn_cases=0", "data.max_eval_prompts=4",
                        "wandb.mode=disabled", timeout=880)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "filter"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r["stage"] == "rl"]
    assert [r["step"] for r in rl] == [1, 2]
    prompts_per_step, responses_per_group = 4, 4  # configs/smoke.yaml
    for row in rl:
        rounds, generated = row["filter/rounds"], row["filter/prompts_generated"]
        assert 1 <= rounds <= 3 and generated >= prompts_per_step
        assert row["reward/filtered_groups"] + row["filter/surplus_groups"] + \
            (0 if row["filter/fallback"] else row["filter/kept_groups"]) == row["filter/groups_seen"]
        if not row["filter/fallback"]:
            assert row["zero_variance"]["group"] == 0.0  # no uniform group reached the learner
            assert row["samples"] == row["filter/kept_groups"] * responses_per_group <= \
                prompts_per_step * responses_per_group
    # The data cursor moved by exactly the prompts the steps say they generated.
    state = json.loads((run_dir / "checkpoints" / "step_2" / "driver_state.json").read_text())
    drawn = state["rl_cursor"]["position"]
    assert state["rl_cursor"]["epoch"] > 0 or drawn == sum(r["filter/prompts_generated"] for r in rl)
