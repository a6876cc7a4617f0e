"""shared/shutdown.py: steps that a stop must not split (the dead-letter replay's send-then-delete)."""

from __future__ import annotations

import asyncio

import pytest

from shared.shutdown import finish_then_cancel


async def _cancel_caller_twice_during_a_step() -> tuple[list[str], asyncio.Task[str]]:
    done: list[str] = []
    step_started = asyncio.Event()

    async def step() -> str:
        step_started.set()
        await asyncio.sleep(0.2)
        done.append("sent and deleted")
        return "result"

    caller = asyncio.create_task(finish_then_cancel(step(), name="test-step"))
    await step_started.wait()
    caller.cancel()  # Ctrl-C
    await asyncio.sleep(0.05)
    caller.cancel()  # Ctrl-C again while the step is still running
    await asyncio.gather(caller, return_exceptions=True)
    return done, caller


async def test_a_step_runs_to_its_end_however_often_its_caller_is_cancelled() -> None:
    # GIVEN a send-then-delete step in progress; WHEN the caller is cancelled twice meanwhile
    done, caller = await _cancel_caller_twice_during_a_step()
    # THEN the caller ends only once the step has ended, and is told it was cancelled
    assert done == ["sent and deleted"]
    assert caller.cancelled()


async def test_without_a_cancellation_the_steps_result_or_failure_comes_back() -> None:
    async def ok() -> str:
        return "result"

    async def fails() -> str:
        raise ValueError("SQS said no")

    assert await finish_then_cancel(ok(), name="ok") == "result"
    with pytest.raises(ValueError, match="SQS said no"):
        await finish_then_cancel(fails(), name="fails")
