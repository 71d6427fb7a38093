"""The judge against a real HTTP server on 127.0.0.1 (tests/judge_server.py): correct,
slow, 429, 500, 400, garbage, a body that is not JSON, and no answer at all. Each case ends
in the configured failure policy with nothing lost and the counts exact; the cache, the
concurrency limit and the API key's secrecy are checked on the wire."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from personadual.modes import Mode
from rewards.config import JudgeConfig, RewardConfig, RewardConfigError
from rewards.judge import JudgeError, parse_retry_after
from rewards.scorer import BatchScorer
from tests.judge_server import FaultSchedule, JudgeServer, Reply, make_prompt, make_rollout

pytestmark = pytest.mark.timeout(60)

G = Mode.GENERAL.token
KEY_ENV = "PERSONADUAL_TEST_JUDGE_KEY"
CANARY = "sk-canary-5b0e2d7c91f4"  # a fake key: it must reach the server and nothing else
TIMEOUT_S = 1.0  # generous: the machine is shared, a verdict must never time out by accident
MAX_RETRIES = 2


@pytest.fixture(scope="module")
def server():
    with JudgeServer() as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(server, monkeypatch):
    server.reset(Reply.verdict())
    monkeypatch.setenv(KEY_ENV, CANARY)
    yield


def config(server: JudgeServer, **judge: object) -> RewardConfig:
    settings = dict(base_url=server.base_url, model="judge-test", api_key_env=KEY_ENV, timeout_s=TIMEOUT_S,
                    max_retries=MAX_RETRIES, backoff_initial_s=0.01, backoff_max_s=0.05, max_concurrency=8)
    settings.update(judge)
    return RewardConfig(judge=JudgeConfig(**settings))


def rollouts(*texts: str, gold: tuple[str, ...] = ("teal",)):
    return [make_rollout(make_prompt(i, scorer="judge", gold=gold), text) for i, text in enumerate(texts)]


def test_correct_verdicts_over_http(server):
    batch = rollouts(f"{G} a. Answer: teal", f"{G} b. Answer: Teal", f"{G} c. Answer: red", "Answer: blue")
    scored, counts = BatchScorer(config(server)).score_many(batch)
    assert [s.rollout for s in scored] == batch
    assert [s.correct for s in scored] == [True, True, False, False]
    assert [s.reward for s in scored] == [1.0, 1.0, 0.0, 0.0]
    assert all(s.status == "ok" and s.detail["scorer"] == "judge" for s in scored)
    assert scored[0].detail["extracted"] == "teal" and scored[2].detail["extracted"] == "red"
    assert counts["ok"] == 4 and counts["judge/requests"] == 4 and counts["judge/retries"] == 0
    assert counts["judge/failures"] == counts["fallback"] == counts["dropped"] == 0
    requests = server.requests
    assert len(requests) == 4 and {r.authorization for r in requests} == {f"Bearer {CANARY}"}
    assert requests[0].body["model"] == "judge-test" and requests[0].body["temperature"] == 0.0


CASES = {  # tag: (replies for that item, its final status, failure kind, HTTP requests made)
    "case-ok": ((), "ok", None, 1),
    "case-fenced": ((Reply.verdict(fenced=True),), "ok", None, 1),
    "case-slow": ((Reply.slow(TIMEOUT_S / 4),), "ok", None, 1),
    "case-429-then-ok": ((Reply.error(429), Reply.error(429)), "ok", None, 3),
    "case-500-then-ok": ((Reply.error(503),), "ok", None, 2),
    "case-hang-then-ok": ((Reply.hang(),), "ok", None, 2),
    "case-500": ((Reply.error(500),) * 3, "failed", "server_error", 3),
    "case-429": ((Reply.error(429),) * 3, "failed", "rate_limit", 3),
    "case-400": ((Reply.error(400),), "failed", "client_error", 1),
    "case-garbage": ((Reply.garbage(),), "failed", "parse", 1),
    "case-invalid-body": ((Reply.invalid_body(),), "failed", "bad_response", 1),
    "case-hang": ((Reply.hang(),) * 3, "failed", "timeout", 3),
    "case-slow-past-timeout": ((Reply.slow(TIMEOUT_S * 3),) * 3, "failed", "timeout", 3),
}


@pytest.mark.parametrize("policy", ["fallback_exact_match", "drop"])
def test_every_failure_case_ends_in_the_policy_with_exact_counts(server, policy):
    texts = []
    for tag, (replies, _, _, _) in CASES.items():
        server.when(f"{tag}.", *replies)  # the dot: "case-500." must not match "case-500-then-ok."
        texts.append(f"{G} {tag}. Answer: teal")
    texts.append(f"{G} case-wrong-fallback. Answer: red")  # a failure whose fallback says wrong
    server.when("case-wrong-fallback", Reply.garbage())
    start = time.perf_counter()
    scored, counts = BatchScorer(config(server, failure_policy=policy)).score_many(rollouts(*texts))
    elapsed = time.perf_counter() - start

    assert len(scored) == len(texts)  # nothing lost
    failed_status = "fallback" if policy == "fallback_exact_match" else "dropped"
    for item, (tag, (_, outcome, kind, requests)) in zip(scored, CASES.items()):
        assert item.status == (failed_status if outcome == "failed" else "ok"), tag
        assert item.detail.get("judge_error") == kind, tag
        assert len(server.requests_for(f"{tag}.")) == requests, tag
        if item.status == "dropped":
            assert item.reward is None and item.correct is False
        else:  # the judge (ok) or exact match (fallback) says the teal answers are right
            assert item.reward == 1.0 and item.correct is True, tag
    wrong = scored[-1]
    assert wrong.detail["judge_error"] == "parse" and wrong.status == failed_status
    if policy == "fallback_exact_match":  # scored by exact match: wrong, and marked so
        assert wrong.reward == 0.0 and wrong.detail["scorer"] == "exact_match"

    failures = sum(1 for _, outcome, _, _ in CASES.values() if outcome == "failed") + 1
    assert counts["total"] == len(texts)
    assert counts["ok"] == len(texts) - failures
    assert counts[failed_status] == failures and counts["judge/failures"] == failures
    assert counts["fallback" if policy == "drop" else "dropped"] == 0
    assert counts["judge/requests"] == len(server.requests) == sum(c[3] for c in CASES.values()) + 1
    assert counts["judge/retries"] == sum(c[3] - 1 for c in CASES.values())
    kinds = {"server_error": 1, "rate_limit": 1, "client_error": 1, "bad_response": 1, "timeout": 2, "parse": 2}
    assert {k: counts.get(f"judge/error/{k}", 0) for k in kinds} == kinds
    assert elapsed < 3 * TIMEOUT_S * (MAX_RETRIES + 1)  # timed-out requests ran concurrently


def test_fail_policy_raises_naming_prompt_and_kind(server):
    server.when("bad-one", Reply.garbage(echo_authorization=True))
    with pytest.raises(JudgeError) as info:
        BatchScorer(config(server, failure_policy="fail")).score_many(
            rollouts("fine. Answer: teal", "bad-one Answer: teal"))
    error = info.value
    assert (error.prompt_id, error.kind, error.attempts) == ("p1", "parse", 1)
    assert "'p1'" in str(error) and "parse" in str(error) and CANARY not in str(error) + repr(error)


def test_400_is_not_retried(server):
    server.default = Reply.error(400)
    scored, counts = BatchScorer(config(server)).score_many(rollouts("x Answer: teal"))
    assert scored[0].status == "fallback" and counts["judge/requests"] == 1 and counts["judge/retries"] == 0


def test_retry_after_is_respected(server):
    server.when("ra", Reply.error(429, retry_after=0.3))
    scored, counts = BatchScorer(config(server, backoff_max_s=1.0)).score_many(rollouts("ra Answer: teal"))
    first, second = server.requests_for("ra")
    assert scored[0].status == "ok" and second.started - first.finished >= 0.29


def test_retry_after_as_an_http_date_is_respected(server):
    # An HTTP-date has whole seconds: "2 s from now" is between 1 and 2 s after the reply.
    server.when("rad", Reply.error(503, retry_after=2.0, as_date=True))
    scored, counts = BatchScorer(config(server, backoff_max_s=0.05)).score_many(rollouts("rad Answer: teal"))
    first, second = server.requests_for("rad")
    assert scored[0].status == "ok" and counts["judge/retries"] == 1
    assert second.started - first.finished >= 0.9  # far beyond the 0.05 s backoff
    assert counts["judge/retry_after_capped"] == 0


def test_retry_after_above_the_cap_is_cut_to_it_and_says_so(server, caplog):
    server.when("long-wait", Reply.error(429, retry_after=30.0))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rewards.judge"):
        scored, counts = BatchScorer(config(server, retry_after_max_s=0.3)).score_many(
            rollouts("long-wait Answer: teal"))
    first, second = server.requests_for("long-wait")
    assert scored[0].status == "ok" and 0.29 <= second.started - first.finished < 5
    assert time.monotonic() - started < 10
    assert counts["judge/retry_after_capped"] == 1
    assert "Retry-After" in caplog.text and "reward.judge.retry_after_max_s" in caplog.text


NOW = 1_000_000_000.0  # 2001-09-09T01:46:40Z


@pytest.mark.parametrize("header, seconds", [
    ("3", 3.0), ("1.5", 1.5), ("0", 0.0), ("-4", 0.0),
    ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),  # a date in the past: retry now
    ("Thu, 01 Jan 2099 00:00:00 GMT", 4070908800.0 - NOW),  # RFC 9110's preferred form
    ("Thursday, 01-Jan-99 00:00:00 GMT", 0.0),  # RFC 850: a two-digit year is 1999, past
    ("Thu Jan  1 00:00:00 2099", 4070908800.0 - NOW),  # asctime, no zone: GMT
    ("soon", None), ("", None), (None, None), ("nan", None), ("inf", None),
])
def test_retry_after_header_forms(header, seconds):
    assert parse_retry_after(header, now=NOW) == seconds


def test_fail_policy_error_carries_the_whole_batch_counts(server):
    server.when("garbled", Reply.garbage(), Reply.garbage())
    server.when("broken", *(Reply.error(500),) * (MAX_RETRIES + 1))
    server.when("flaky", Reply.error(500))  # fails once, then answers
    batch = rollouts("garbled Answer: teal", "fine Answer: teal", "broken Answer: teal",
                     "flaky Answer: teal", "garbled again Answer: teal")
    with pytest.raises(JudgeError) as info:
        BatchScorer(config(server, failure_policy="fail")).score_many(batch)
    error = info.value
    assert error.failures == 3 and error.counts["judge/failures"] == 3
    assert error.counts["judge/error/parse"] == 2 and error.counts["judge/error/server_error"] == 1
    assert error.counts["judge/requests"] == len(server.requests) == 1 + 1 + (MAX_RETRIES + 1) + 2 + 1
    assert error.counts["judge/retries"] == MAX_RETRIES + 1 and error.counts["ok"] == 2
    assert "3 judgement(s) failed in this batch (parse: 2, server_error: 1)" in str(error)
    assert f"{len(server.requests)} request(s), {MAX_RETRIES + 1} retries" in str(error)


def test_cache_hits_on_repeats_within_and_across_batches(server, tmp_path):
    cache_file = tmp_path / "verdicts.jsonl"
    scorer = BatchScorer(config(server, cache_path=str(cache_file)))
    batch = rollouts("one. Answer: teal", "two. Answer: red") + [
        make_rollout(make_prompt(0, scorer="judge"), "one. Answer: teal", sample_index=s) for s in (1, 2)]
    first, counts = scorer.score_many(batch)
    assert counts["judge/requests"] == 2 and counts["judge/cache_hits"] == 2  # copies judged once
    assert [s.correct for s in first] == [True, False, True, True]
    assert [s.detail["judge_cached"] for s in first] == [False, False, True, True]
    again, counts = scorer.score_many(batch)
    assert counts["judge/requests"] == 0 and counts["judge/cache_hits"] == 4
    assert [s.reward for s in again] == [s.reward for s in first]
    # A new process reads the verdicts back from the cache file.
    reloaded, counts = BatchScorer(config(server, cache_path=str(cache_file))).score_many(batch)
    assert counts["judge/requests"] == 0 and [s.reward for s in reloaded] == [s.reward for s in first]
    # The same response to a different gold or judge model is judged again.
    other = rollouts("one. Answer: teal", gold=("red",))
    _, counts = scorer.score_many(other)
    assert counts["judge/requests"] == 1
    _, counts = BatchScorer(config(server, model="judge-2")).score_many(batch[:1])
    assert counts["judge/requests"] == 1
    assert len(server.requests) == 4


def test_failures_are_not_cached_and_cache_can_be_off(server):
    server.when("flaky", Reply.garbage())
    scorer = BatchScorer(config(server))
    assert scorer.score_many(rollouts("flaky Answer: teal"))[0][0].status == "fallback"
    scored, counts = scorer.score_many(rollouts("flaky Answer: teal"))
    assert scored[0].status == "ok" and counts["judge/requests"] == 1
    uncached = BatchScorer(config(server, cache=False))
    uncached.score_many(rollouts("again Answer: teal"))
    _, counts = uncached.score_many(rollouts("again Answer: teal"))
    assert counts["judge/requests"] == 1 and counts["judge/cache_hits"] == 0


def test_concurrency_limit_is_respected(server):
    server.default = Reply.slow(0.1)
    batch = rollouts(*(f"item {i}. Answer: teal" for i in range(24)))
    start = time.perf_counter()
    scored, counts = BatchScorer(config(server, max_concurrency=4)).score_many(batch)
    elapsed = time.perf_counter() - start
    assert all(s.status == "ok" for s in scored) and counts["judge/requests"] == 24
    assert server.max_in_flight == 4
    assert elapsed < 24 * 0.1 * 0.8  # ~6 waves of 0.1 s, far from 24 one after another


def test_api_key_never_logged_or_in_errors_or_details(server, caplog):
    for name in (None, "openai", "httpx", "httpx2", "httpcore", "httpcore2", "rewards", "asyncio"):
        caplog.set_level(logging.DEBUG, logger=name)
    server.when("echo", *(Reply.garbage(echo_authorization=True),) * 2)
    server.when("down", *(Reply.error(500),) * 3)
    server.when("hung", Reply.hang())
    cfg = config(server, max_retries=0)
    scorer = BatchScorer(cfg)
    scored, counts = scorer.score_many(rollouts("ok Answer: teal", "echo Answer: teal", "down", "hung"))
    assert counts["judge/failures"] == 3
    assert "(you sent Bearer ***)" in scored[1].detail["judge_raw"]  # scrubbed on the way in
    with pytest.raises(JudgeError) as info:
        BatchScorer(config(server, failure_policy="fail")).score_many(rollouts("echo Answer: teal"))
    assert {r.authorization for r in server.requests} == {f"Bearer {CANARY}"}  # it was sent
    assert caplog.records, "the client logged nothing at DEBUG: the check would prove nothing"
    texts = [caplog.text, repr(cfg), repr(scorer), repr(scorer.judge.client), str(info.value),
             repr(info.value), *(repr(s.detail) for s in scored), repr(counts)]
    assert not [t for t in texts if CANARY in t]


def test_missing_key_variable_is_a_config_error(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(RewardConfigError, match=f"reward.judge.api_key_env: environment variable '{KEY_ENV}'"):
        BatchScorer(config(server)).score_many(rollouts("Answer: teal"))
    assert not server.requests


def test_empty_key_env_sends_a_placeholder(server):
    BatchScorer(config(server, api_key_env="")).score_many(rollouts("Answer: teal"))
    assert server.requests[0].authorization == "Bearer EMPTY"


def test_sync_single_score_and_async_api(server):
    scorer = BatchScorer(config(server))
    reward, detail = scorer.judge.score(make_prompt(scorer="judge"), "x. Answer: teal")
    assert reward == 1.0 and detail["correct"] is True and detail["extracted"] == "teal"
    server.when("junk", Reply.garbage())
    with pytest.raises(JudgeError, match="parse"):
        scorer.judge.score(make_prompt(scorer="judge"), "junk")

    async def inside_a_loop():
        with pytest.raises(RuntimeError, match="await"):
            scorer.score_many(rollouts("y. Answer: teal"))
        return await scorer.score_batch_async(rollouts("y. Answer: teal"))

    scored, _ = asyncio.run(inside_a_loop())
    assert scored[0].reward == 1.0


def test_mixed_batch_with_local_and_judge_tasks(server):
    batch = [
        make_rollout(make_prompt(0, scorer="exact_match"), "Answer: teal"),
        make_rollout(make_prompt(1, scorer="judge"), "j. Answer: teal"),
        make_rollout(make_prompt(2, scorer="math", gold=("0.5",)), "Answer: \\frac{1}{2}"),
        make_rollout(make_prompt(3, scorer="judge"), "k. Answer: red"),
    ]
    scored, counts = BatchScorer(config(server)).score_many(batch)
    assert [s.reward for s in scored] == [1.0, 1.0, 1.0, 0.0]
    assert counts["scorer/judge"] == 2 and counts["judge/requests"] == 2 and counts["ok"] == 4


@pytest.mark.parametrize("policy", ["fallback_exact_match", "drop"])
def test_fault_schedule_counts_are_what_the_client_reports(server, policy):
    """The server's deterministic schedule (3 in 10 judgements fail for good: 500s, no answer,
    garbage; 1 in 10 fails once and is retried) against the real client: what the server
    counts as judgements that ran out of retries is exactly what the scorer reports as
    failed, fell back or dropped; a retried success is neither."""
    server.faults = schedule = FaultSchedule(attempts=MAX_RETRIES + 1)
    batch = rollouts(*(f"{G} item {i}. Answer: teal" for i in range(30)))
    scored, counts = BatchScorer(config(server, failure_policy=policy)).score_many(batch)
    assert schedule.judgements() == 30 and schedule.failed() == 9  # 3 kinds x 30 / 10
    assert schedule.exhausted == {"server_error": 3, "timeout": 3, "garbage": 3, "transient": 0}
    assert schedule.injected == {"server_error": 9, "timeout": 9, "garbage": 3, "transient": 3}
    failed_status = "fallback" if policy == "fallback_exact_match" else "dropped"
    assert counts[failed_status] == counts["judge/failures"] == schedule.failed()
    assert counts["ok"] == 30 - schedule.failed()
    assert counts["judge/retries"] == schedule.retries() == 2 * 3 + 2 * 3 + 3
    assert counts["judge/requests"] == len(server.requests) == 30 + schedule.retries()
    assert {k: counts.get(f"judge/error/{k}", 0) for k in ("server_error", "timeout", "parse")} == {
        "server_error": 3, "timeout": 3, "parse": 3}
    assert sum(s.status == failed_status for s in scored) == schedule.failed()
