"""The consumer process: settings from the environment, signal handling, run until SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Mapping

import structlog

from consumer.settings import ConsumerSettings
from consumer.worker import ConsumerStats, run_consumer

log = structlog.get_logger()

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def serve(settings: ConsumerSettings) -> ConsumerStats:
    """Run until SIGTERM or SIGINT: then stop receiving, finish the batches in flight, and return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}

    def request_stop(sig: signal.Signals) -> None:
        log.info("consumer_stopping", signal=sig.name)
        stop.set()

    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, request_stop, sig)
    try:
        return await run_consumer(settings, stop)
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)


def main(env: Mapping[str, str]) -> ConsumerStats:
    return asyncio.run(serve(ConsumerSettings.from_env(env)))
