"""ReplyCache: one computation per request id, also when the retry overlaps the first."""

from __future__ import annotations

import threading
import time

import pytest

from lossd.server.replies import ReplyCache


def test_a_retry_during_the_first_attempt_waits_for_its_answer() -> None:
    cache, calls = ReplyCache(), []

    def slow() -> str:
        calls.append(1)
        time.sleep(0.2)
        return "answer"

    answers: list[str] = []
    threads = [
        threading.Thread(target=lambda: answers.append(cache.run("id", slow))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == ["answer"] * 3 and len(calls) == 1


def test_a_failed_attempt_is_forgotten() -> None:
    cache, calls = ReplyCache(), []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first attempt fails")
        return "second"

    with pytest.raises(ValueError):
        cache.run("id", flaky)
    assert cache.run("id", flaky) == "second" and len(calls) == 2
    assert cache.run("id", flaky) == "second" and len(calls) == 2


def test_only_recent_answers_are_kept() -> None:
    cache = ReplyCache(capacity=2)
    for i in range(4):
        cache.run(str(i), lambda i=i: i)
    assert cache.run("0", lambda: "recomputed") == "recomputed"
    assert cache.run("3", lambda: "recomputed") == 3
    assert cache.run("", lambda: "no id") == "no id"
