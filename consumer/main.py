"""The consumer process: settings from the environment, signal handling, run until SIGTERM (or until
the queue is idle, with ``exit_when_idle_s``)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from consumer.service import run_consumer
from consumer.settings import ConsumerSettings
from consumer.worker import ConsumerStats
from shared.shutdown import stop_on_signals


async def serve(settings: ConsumerSettings) -> ConsumerStats:
    """Run until SIGTERM or SIGINT (or an idle queue, with ``exit_when_idle_s``): then stop receiving,
    finish the batches in flight, and return."""
    with stop_on_signals() as stop:
        return await run_consumer(settings, stop.event)


def main(env: Mapping[str, str]) -> ConsumerStats:
    return asyncio.run(serve(ConsumerSettings.from_env(env)))
