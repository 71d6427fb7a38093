"""A real HTTP judge server for tests and the benchmark: OpenAI chat-completions on 127.0.0.1.

It runs aiohttp in a background thread on an ephemeral port. What it replies is set per
request: rules matching the request's text (``when``), a scripted sequence in arrival order
(``script``), else ``default``. Replies: a verdict (graded by comparing the response with the
gold answer, or forced), slow, an HTTP error status (429, 500, ...), garbage text, a body
that is not JSON, or no answer at all (``hang``, until the server stops); or a deterministic
``FaultSchedule`` that fails a fixed share of judgements and counts what it caused. Every request is
recorded with its Authorization header, and the server tracks how many were in flight at
once. ``python tests/judge_server.py --delay 0.2`` serves in a process of its own (bench).
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import re
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from personadual.modes import mode_of_text
from personadual.records import Prompt, Rollout

_TAG = {name: re.compile(rf"<{name}>\n(.*?)\n</{name}>", re.DOTALL) for name in ("question", "gold_answer", "response")}


@dataclass(frozen=True)
class Reply:
    """What the server does with one request."""

    kind: str = "verdict"  # verdict | status | garbage | invalid_body | hang
    delay_s: float = 0.0
    correct: bool | None = None  # verdict: None grades the response against the gold answer
    fenced: bool = False  # verdict wrapped in a ```json code fence with prose around it
    status: int = 200
    retry_after: float | None = None
    retry_after_as_date: bool = False  # send Retry-After as an HTTP-date that many seconds ahead
    text: str = ""
    echo_authorization: bool = False  # garbage that quotes the request's Authorization header

    @classmethod
    def verdict(cls, correct: bool | None = None, *, delay_s: float = 0.0, fenced: bool = False) -> "Reply":
        return cls("verdict", delay_s=delay_s, correct=correct, fenced=fenced)

    @classmethod
    def slow(cls, delay_s: float, correct: bool | None = None) -> "Reply":
        return cls("verdict", delay_s=delay_s, correct=correct)

    @classmethod
    def error(cls, status: int, *, retry_after: float | None = None, as_date: bool = False,
              delay_s: float = 0.0) -> "Reply":
        return cls("status", delay_s=delay_s, status=status, retry_after=retry_after, retry_after_as_date=as_date)

    @classmethod
    def garbage(cls, text: str = "The answer looks right to me!", *, echo_authorization: bool = False) -> "Reply":
        return cls("garbage", text=text, echo_authorization=echo_authorization)

    @classmethod
    def invalid_body(cls) -> "Reply":
        return cls("invalid_body")

    @classmethod
    def hang(cls) -> "Reply":
        return cls("hang")


# What a FaultSchedule does to every attempt at one judgement, by fault kind:
#   server_error  HTTP 500 on every attempt: retried, then the judgement fails (server_error)
#   timeout       no answer on every attempt: retried, then it fails (timeout)
#   garbage       a 200 whose text holds no verdict: not retried, it fails (parse)
#   transient     HTTP 500 on the first attempt only: retried once, then a verdict (no failure)
FAULT_KINDS = ("server_error", "timeout", "garbage", "transient")
RETRIED_EVERY_TIME = ("server_error", "timeout")
# Three in ten judgements fail for good, one more only once: "a judge that fails 30%".
DEFAULT_FAULT_CYCLE = ("ok", "server_error", "transient", "ok", "timeout", "ok", "ok", "garbage", "ok", "ok")


class FaultSchedule:
    """Deterministic faults per judgement, and the server's own count of what they caused.

    A judgement is known by its request's messages (question, gold answer, response), so all
    its attempts, and the same text asked again later, meet the same fault. The n-th distinct
    judgement the server sees gets ``cycle[n % len(cycle)]``: exactly that share of each kind,
    whatever order concurrent requests arrive in. ``attempts`` is the client's
    ``max_retries + 1``; with it the server knows when a judgement ran out of retries, so
    ``failed()`` is what the client must report as failed judgements, exactly.
    """

    def __init__(self, attempts: int, cycle: tuple[str, ...] = DEFAULT_FAULT_CYCLE) -> None:
        unknown = set(cycle) - {"ok", *FAULT_KINDS}
        if unknown or attempts < 1:
            raise ValueError(f"FaultSchedule: unknown kinds {sorted(unknown)} or attempts {attempts} < 1")
        self.attempts, self.cycle = attempts, cycle
        self._plans: dict[str, str] = {}  # judgement -> its kind
        self._seen: dict[str, int] = {}  # judgement -> requests for it so far
        self.injected = {kind: 0 for kind in FAULT_KINDS}  # faulty replies sent
        self.exhausted = {kind: 0 for kind in FAULT_KINDS}  # judgements that failed for good

    def reply(self, judgement: str) -> Reply | None:
        """The reply for one request (None: answer normally); called under the server's lock."""
        kind = self._plans.setdefault(judgement, self.cycle[len(self._plans) % len(self.cycle)])
        seen = self._seen[judgement] = self._seen.get(judgement, 0) + 1
        if kind == "ok" or (kind == "transient" and seen > 1):
            return None
        self.injected[kind] += 1
        if kind == "garbage" or (kind in RETRIED_EVERY_TIME and seen % self.attempts == 0):
            self.exhausted[kind] += 1
        return {"server_error": Reply.error(500), "timeout": Reply.hang(), "garbage": Reply.garbage(),
                "transient": Reply.error(500)}[kind]

    def failed(self) -> int:
        """Judgements that failed after every attempt the client makes."""
        return sum(self.exhausted.values())

    def retries(self) -> int:
        """Requests the client must have made again after a retryable fault."""
        retryable = ("transient", *RETRIED_EVERY_TIME)
        return sum(self.injected[k] for k in retryable) - sum(self.exhausted[k] for k in RETRIED_EVERY_TIME)

    def judgements(self) -> int:
        return len(self._plans)

    def counts(self) -> dict[str, object]:
        return {"judgements": self.judgements(), "injected": dict(self.injected), "exhausted": dict(self.exhausted),
                "failed": self.failed(), "retries": self.retries()}


@dataclass
class RecordedRequest:
    path: str
    body: dict[str, Any]
    authorization: str | None
    reply: Reply
    started: float
    finished: float = 0.0

    def _tag(self, name: str) -> str:
        for message in self.body.get("messages", []):
            match = _TAG[name].search(str(message.get("content", "")))
            if match:
                return match.group(1)
        return ""

    @property
    def response(self) -> str:
        return self._tag("response")

    @property
    def gold(self) -> list[str]:
        return self._tag("gold_answer").split(" | ")


def _plain(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def grade(response: str, gold: list[str]) -> tuple[bool, str]:
    """The server's own simple grader: the text after the last "Answer:" equals a gold alias."""
    answer = response.rsplit("Answer:", 1)[-1].strip()
    return any(_plain(answer) == _plain(g) for g in gold if _plain(g)), answer


class JudgeServer:
    def __init__(self, default: Reply | None = None, *, port: int = 0, faults: FaultSchedule | None = None) -> None:
        self.default = default or Reply.verdict()
        self.faults = faults  # after rules and script: every other request meets the schedule
        self._port = port
        self._lock = threading.Lock()
        self._script: deque[Reply] = deque()
        self._rules: list[tuple[str, deque[Reply]]] = []
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._release: asyncio.Event | None = None  # set at stop: hung requests end
        self.port = 0

    # ---- behaviour ----------------------------------------------------------------------
    def script(self, *replies: Reply) -> None:
        """Replies for the next requests, in arrival order (after ``when`` rules)."""
        with self._lock:
            self._script.extend(replies)

    def when(self, substring: str, *replies: Reply) -> None:
        """Requests whose messages contain ``substring`` get these replies in turn, then the
        usual ones: deterministic per item even when requests arrive concurrently."""
        with self._lock:
            self._rules.append((substring, deque(replies)))

    def reset(self, default: Reply | None = None) -> None:
        """Forget rules, script, fault schedule and requests, and end requests still hanging or
        sleeping, so one test's leftovers never count in the next one's in-flight maximum."""
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._release_waiting(), self._loop).result(timeout=10)
            deadline = time.monotonic() + 10
            while self.in_flight and time.monotonic() < deadline:
                time.sleep(0.01)
        with self._lock:
            self._script.clear()
            self._rules.clear()
            self.requests.clear()
            self.faults = None
            self.max_in_flight = self.in_flight
            if default is not None:
                self.default = default

    async def _release_waiting(self) -> None:
        assert self._release is not None
        self._release.set()
        self._release = asyncio.Event()

    def _choose(self, body: dict[str, Any]) -> Reply:
        text = json.dumps(body.get("messages", []), ensure_ascii=False)
        with self._lock:
            for substring, replies in self._rules:
                if replies and substring in text:
                    return replies.popleft()
            if self._script:
                return self._script.popleft()
            if self.faults is not None:
                return self.faults.reply(text) or self.default
            return self.default

    def requests_for(self, substring: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests
                    if substring in json.dumps(r.body.get("messages", []), ensure_ascii=False)]

    # ---- HTTP ---------------------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "body is not JSON"}}, status=400)
        reply = self._choose(body)
        record = RecordedRequest(request.path, body, request.headers.get("Authorization"), reply, time.monotonic())
        with self._lock:
            self.requests.append(record)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        release = self._release
        assert release is not None
        try:
            # Sleeping and hanging requests end early when the server resets or stops.
            if reply.kind == "hang" or reply.delay_s:
                timeout = None if reply.kind == "hang" else reply.delay_s
                try:
                    await asyncio.wait_for(release.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                if release.is_set():
                    return web.json_response({"error": {"message": "server resetting"}}, status=503)
            if reply.kind == "status":
                headers = {}
                if reply.retry_after is not None and reply.retry_after_as_date:
                    headers["Retry-After"] = email.utils.formatdate(time.time() + reply.retry_after, usegmt=True)
                elif reply.retry_after is not None:
                    headers["Retry-After"] = str(reply.retry_after)
                return web.json_response({"error": {"message": f"status {reply.status}", "code": reply.status}},
                                         status=reply.status, headers=headers)
            if reply.kind == "invalid_body":
                return web.Response(text='{"choices": [', content_type="application/json")
            if reply.kind == "garbage":
                content = reply.text
                if reply.echo_authorization:
                    content += f" (you sent {record.authorization})"
            else:
                correct, extracted = grade(record.response, record.gold)
                if reply.correct is not None:
                    correct = reply.correct
                verdict = json.dumps({"extracted_answer": extracted, "correct": correct})
                content = f"Here is my verdict:\n```json\n{verdict}\n```\n" if reply.fenced else verdict
            return web.json_response(_completion(body, content))
        finally:
            record.finished = time.monotonic()
            with self._lock:
                self.in_flight -= 1

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "judge-test", "object": "model"}]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _start(self) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, backlog=1024).start()

    async def _stop(self) -> None:
        assert self._release is not None and self._runner is not None
        self._release.set()
        await self._runner.cleanup()

    def start(self) -> "JudgeServer":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="judge-server", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> "JudgeServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def _completion(request: dict[str, Any], content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-judge-test", "object": "chat.completion", "created": int(time.time()),
        "model": request.get("model", "judge-test"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


# ---- records for the reward tests ------------------------------------------------------
def make_prompt(index: int | str = 0, *, scorer: str = "judge", gold: tuple[str, ...] = ("teal",),
                choices: tuple[str, ...] | None = None, question: str | None = None) -> Prompt:
    return Prompt(id=f"p{index}", question=question or f"What color is item {index}?", persona=None,
                  persona_setting="none", task_type="objective", gold=gold, scorer=scorer, choices=choices)


def make_rollout(prompt: Prompt, text: str, sample_index: int = 0) -> Rollout:
    """A Rollout carrying ``text``; token ids are placeholders (scoring reads only text)."""
    return Rollout(prompt=prompt, prompt_token_ids=[1, 2, 3], response_token_ids=[4, 5],
                   response_logprobs=[0.0, -0.5], text=text, mode=mode_of_text(text),
                   forced=False, finish_reason="stop", weight_version=0, sample_index=sample_index)


def start_subprocess(latency_s: float) -> tuple["subprocess.Popen[str]", str]:
    """This server in its own process (for benchmarks: a judge that shares no CPU time with
    the client's event loop); returns the process and its base URL. Closing its stdin stops it."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, __file__, "--delay", str(latency_s)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline().split()
    if len(line) != 2 or line[0] != "PORT":
        process.kill()
        raise RuntimeError(f"test judge server did not start (said {line!r})")
    return process, f"http://127.0.0.1:{line[1]}/v1"


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the test judge until stdin closes.")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every verdict")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with JudgeServer(Reply.verdict(delay_s=args.delay), port=args.port) as server:
        print(f"PORT {server.port}", flush=True)
        sys.stdin.read()  # the parent closes our stdin to stop us


if __name__ == "__main__":
    main()
