"""``lifecycle.forever``, the one loop of every background task: it goes on after an
error, wakes early when kicked, and ends when told to."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.common.lifecycle import forever, stop_tasks


async def test_an_error_is_logged_and_the_next_round_comes(caplog: pytest.LogCaptureFixture) -> None:
    rounds: list[int] = []
    third = asyncio.Event()

    async def step() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("a blip")
        if len(rounds) == 3:
            third.set()

    with caplog.at_level(logging.WARNING):
        task = asyncio.create_task(forever("probe", step, interval=0.01))
        await asyncio.wait_for(third.wait(), 5)
        await stop_tasks([task])
    assert task.done() and len(rounds) >= 3
    assert any("probe failed" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_a_kick_runs_the_next_round_at_once_and_until_ends_it() -> None:
    kick, ran = asyncio.Event(), asyncio.Event()
    rounds = 0
    stopping = False

    async def step() -> None:
        nonlocal rounds
        rounds += 1
        ran.set()

    task = asyncio.create_task(forever("kicked", step, interval=3600, kick=kick, until=lambda: stopping))
    await asyncio.wait_for(ran.wait(), 5)
    ran.clear()
    kick.set()  # an hour's interval, yet the next round comes now
    await asyncio.wait_for(ran.wait(), 5)
    assert rounds == 2
    stopping = True
    kick.set()
    await asyncio.wait_for(task, 5)  # returned by itself, not cancelled
    assert not task.cancelled()
