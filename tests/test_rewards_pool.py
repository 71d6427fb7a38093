"""The reward worker pool on a local Ray cluster (127.0.0.1): a mixed batch is split across
workers, judge calls run on several workers at once, results come back in the submitted
order with the workers' counts summed, and a "fail" judgement surfaces as a JudgeError."""

from __future__ import annotations

import pytest
import ray

from actors.reward_pool import RewardPool, plan_chunks
from personadual.modes import Mode
from rewards.config import JudgeConfig, RewardConfig
from rewards.judge import JudgeError, cache_key
from rewards.scorer import BatchScorer
from tests.judge_server import JudgeServer, Reply, make_prompt, make_rollout

G = Mode.GENERAL.token
KEY_ENV = "PERSONADUAL_TEST_POOL_JUDGE_KEY"
CANARY = "sk-canary-pool-0c4e81"
MODEL = "judge-test"


@pytest.fixture(scope="module")
def server():
    with JudgeServer() as running:
        yield running


def reward_config(server: JudgeServer, **judge: object) -> RewardConfig:
    settings = dict(base_url=server.base_url, model=MODEL, api_key_env=KEY_ENV, timeout_s=5.0,
                    max_retries=1, backoff_initial_s=0.01, backoff_max_s=0.05, max_concurrency=1)
    settings.update(judge)
    return RewardConfig(judge=JudgeConfig(**settings))


def mixed_batch(tag: str):
    batch = [make_rollout(make_prompt(f"{tag}-j{i}", scorer="judge"), f"{G} {tag} {i}. Answer: {'teal' if i % 3 else 'red'}")
             for i in range(8)]
    batch.insert(2, make_rollout(make_prompt(f"{tag}-e", scorer="exact_match"), f"{G} Answer: teal"))
    batch.insert(5, make_rollout(make_prompt(f"{tag}-m", scorer="math", gold=("0.5",)), "Answer: \\boxed{1/2}"))
    batch.insert(7, make_rollout(make_prompt(f"{tag}-c", scorer="multiple_choice", gold=("A",), choices=("x", "y")),
                                 "Answer: (B)"))
    return batch


# ---- the plan (no Ray needed) -------------------------------------------------------------------
def test_plan_balances_judge_items_and_covers_every_index():
    items = [(make_prompt(i, scorer="judge"), f"answer {i}") for i in range(10)]
    items += [(make_prompt(f"l{i}", scorer="exact_match"), "x") for i in range(5)]
    chunks = plan_chunks(items, 3, MODEL)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(15))
    judge_loads = [sum(1 for i in chunk if i < 10) for chunk in chunks]
    assert max(judge_loads) - min(judge_loads) <= 1
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


def test_plan_keeps_copies_together_and_prefers_the_cache_workers():
    prompt = make_prompt(0, scorer="judge")
    items = [(prompt, "same answer")] * 4 + [(make_prompt(i, scorer="judge"), f"other {i}") for i in range(1, 5)]
    chunks = plan_chunks(items, 2, MODEL)
    assert any(set(range(4)) <= set(chunk) for chunk in chunks)
    assert max(map(len, chunks)) <= 4 + 4 - 1  # even share (4) plus one group's overflow at most
    # A response met again lands on the worker its cache key names, where its verdict is cached.
    for text in ("a", "b", "c", "d"):
        single = [(prompt, text)]
        preferred = int(cache_key(MODEL, prompt, text)[:8], 16) % 3
        assert plan_chunks(single, 3, MODEL)[preferred] == [0]


# ---- the pool on Ray ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pool_scores_in_order_spreads_judge_calls_and_sums_counts(ray_cluster, server, monkeypatch):
    # Set after Ray started: the workers' environment lacks it, so the key must travel with them.
    monkeypatch.setenv(KEY_ENV, CANARY)
    server.reset(Reply.slow(0.2))
    config = reward_config(server)
    pool = RewardPool(config, num_workers=2, num_cpus=0.1)
    try:
        first, second = mixed_batch("first"), mixed_batch("second")
        pending = [pool.submit(first), pool.submit(second)]
        assert all(isinstance(ref, ray.ObjectRef) for p in pending for ref in p.refs)
        ready, _ = ray.wait(pending[0].refs, num_returns=len(pending[0].refs), timeout=60)
        assert len(ready) == len(pending[0].refs)
        scored, counts = pool.collect(pending)
        in_flight = server.max_in_flight

        assert [s.rollout for s in scored] == first + second  # submitted order, Rollouts untouched
        server.reset(Reply.verdict())
        expected, _ = BatchScorer(reward_config(server)).score_many(first + second)
        assert [(s.reward, s.correct, s.status) for s in scored] == [(e.reward, e.correct, e.status) for e in expected]
        assert [s.detail["scorer"] for s in scored] == [e.detail["scorer"] for e in expected]
        assert counts["total"] == 22 and counts["ok"] == 22 and counts["judge/requests"] == 16
        assert counts["scorer/judge"] == 16 and counts["scorer/math"] == 2 and counts["judge/failures"] == 0
        # One request at a time per worker (max_concurrency=1), yet two at once on the server:
        # both workers judged in parallel.
        assert in_flight == 2
    finally:
        pool.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pool_policies_cross_the_process_boundary(ray_cluster, server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, CANARY)
    server.reset(Reply.verdict())
    server.when("broken", *(Reply.garbage(),) * 4)
    pool = RewardPool(reward_config(server, failure_policy="drop", max_concurrency=4), num_workers=1)
    try:
        batch = [make_rollout(make_prompt(0, scorer="judge"), "fine. Answer: teal"),
                 make_rollout(make_prompt(1, scorer="judge"), "broken. Answer: teal")]
        scored, counts = pool.score(batch)
        assert [s.status for s in scored] == ["ok", "dropped"] and scored[1].reward is None
        assert counts["dropped"] == 1 and counts["judge/error/parse"] == 1
        assert {r.authorization for r in server.requests} == {f"Bearer {CANARY}"}
    finally:
        pool.shutdown()
    failing = RewardPool(reward_config(server, failure_policy="fail"), num_workers=1)
    try:
        with pytest.raises(JudgeError) as info:
            failing.score([make_rollout(make_prompt("q7", scorer="judge"), "broken. Answer: teal")])
        error = info.value
        assert type(error) is JudgeError and (error.prompt_id, error.kind) == ("pq7", "parse")
        assert str(error).startswith("judge failed on prompt 'pq7': parse") and CANARY not in str(error)
    finally:
        failing.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_empty_batch_needs_no_worker_call(ray_cluster, server):
    pool = RewardPool(reward_config(server), num_workers=1)
    try:
        pending = pool.submit([])
        assert pending.refs == []
        scored, counts = pool.collect([pending, pool.submit([])])
        assert scored == [] and counts["total"] == 0 and counts["judge/requests"] == 0
    finally:
        pool.shutdown()


# ---- judge failures in both workers' chunks of two engine batches ------------------------------
FAILING = {1: "garbage", 4: "garbage", 7: "garbage", 2: "server_error", 8: "server_error"}
KIND = {"garbage": "parse", "status": "server_error"}


def failing_batch(server: JudgeServer, tag: str, attempts: int):
    """Ten judge items (five failing for good, one failing once), a repeat of the first (a
    cache hit) and an exact-match item; the server's rules keyed by each item's own text."""
    batch = []
    for j in range(10):
        text = f"{G} {tag} item{j}. Answer: {'teal' if j % 2 else 'red'}"
        fault = FAILING.get(j)
        if fault == "garbage":
            server.when(f"{tag} item{j}.", Reply.garbage())
        elif fault == "server_error":
            server.when(f"{tag} item{j}.", *(Reply.error(500),) * attempts)
        elif j == 5:
            server.when(f"{tag} item{j}.", Reply.error(500))  # fails once, then answers
        batch.append(make_rollout(make_prompt(f"{tag}-{j}", scorer="judge"), text))
    batch.append(make_rollout(batch[0].prompt, batch[0].text, sample_index=1))
    batch.append(make_rollout(make_prompt(f"{tag}-e", scorer="exact_match"), f"{G} Answer: teal"))
    return batch


def server_totals(server: JudgeServer) -> dict[str, int]:
    """What the counts must say, from the server's own request log alone."""
    by_judgement: dict[str, list] = {}
    for request in server.requests:
        by_judgement.setdefault(request.response, []).append(request)
    failed = {response: requests[-1].reply.kind for response, requests in by_judgement.items()
              if requests[-1].reply.kind != "verdict"}
    totals = {"judge/requests": len(server.requests), "judge/failures": len(failed),
              "judge/retries": sum(len(requests) - 1 for requests in by_judgement.values())}
    for kind in failed.values():
        totals[f"judge/error/{KIND[kind]}"] = totals.get(f"judge/error/{KIND[kind]}", 0) + 1
    return totals


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("policy", ["fail", "drop", "fallback_exact_match"])
def test_failures_in_both_workers_and_both_batches_are_all_counted(ray_cluster, server, monkeypatch, policy):
    monkeypatch.setenv(KEY_ENV, CANARY)
    server.reset(Reply.verdict())
    config = reward_config(server, failure_policy=policy, max_concurrency=4)
    attempts = config.judge.max_retries + 1
    batches = [failing_batch(server, f"{policy}-b{i}", attempts) for i in range(2)]
    for batch in batches:  # the premise: each worker's chunk of each batch holds failures
        chunks = plan_chunks([(r.prompt, r.text) for r in batch], 2, MODEL)
        assert all(any(int(batch[i].prompt.id.rsplit("-", 1)[1]) in FAILING
                       for i in chunk if batch[i].prompt.scorer == "judge") for chunk in chunks)
    pool = RewardPool(config, num_workers=2, num_cpus=0.1)
    try:
        pending = [pool.submit(batch) for batch in batches]  # two engines' batches of one step
        if policy == "fail":
            with pytest.raises(JudgeError) as info:
                pool.collect(pending)
            counts = info.value.counts
            assert info.value.failures == 2 * len(FAILING) and CANARY not in str(info.value)
            assert f"{2 * len(FAILING)} judgement(s) failed in this batch (parse: 6, server_error: 4)" in str(info.value)
        else:
            scored, counts = pool.collect(pending)
            failed_status = "dropped" if policy == "drop" else "fallback"
            assert [s.status == failed_status for s in scored] == [
                int(r.prompt.id.rsplit("-", 1)[1]) in FAILING if r.prompt.scorer == "judge" and r.sample_index == 0
                else False for batch in batches for r in batch]
            assert counts[failed_status] == 2 * len(FAILING)
        expected = server_totals(server)
        assert expected["judge/failures"] == 2 * len(FAILING)
        assert {key: counts.get(key, 0) for key in expected} == expected
        assert counts["judge/cache_hits"] == 2 and counts["total"] == 2 * 12
        assert counts["judge/error/server_error"] == 4 and counts["judge/error/parse"] == 6
    finally:
        pool.shutdown()
