"""Run the receiver until SIGTERM/SIGINT, then shut down gracefully.

Shutdown order: stop listening and mark /readyz unavailable; let requests in flight finish (their
bodies may still be arriving; then they wait for their SQS batch); close the connections; send
whatever entries still wait; close the SQS client; exit. Each wait is bounded by
``shutdown_grace_s``. The signal handlers in place before are restored afterwards.
"""

from __future__ import annotations

import asyncio
import signal

import aiobotocore
import structlog
from aiohttp import web

from receiver.app import RECEIVER, WEBHOOK_PATH, build_app, finish_in_flight, server_options
from receiver.batcher import SqsBatcher
from receiver.file_descriptors import accept_errors_as_warnings, raise_open_files_limit
from receiver.settings import ReceiverSettings
from shared import aws
from shared.admin_server import admin_app, start_admin_server
from shared.shutdown import stop_on_signals

log = structlog.get_logger()

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The User-Agent of the receiver's SQS calls (botocore appends "botocore/<version>"); it also tells
# the receiver's calls apart in CloudTrail.
SQS_USER_AGENT = f"jiralake-receiver aiobotocore/{aiobotocore.__version__}"
# aiohttp's own wait for requests at shutdown, after finish_in_flight has waited the grace period:
# what is still running then only gets this long before it is cancelled.
CLOSE_WAIT_S = 1.0


async def serve(settings: ReceiverSettings, *, stop: asyncio.Event | None = None) -> None:
    """Serve webhooks (and the admin port) until ``stop`` is set or a stop signal arrives."""
    stop = stop or asyncio.Event()
    open_files_limit = raise_open_files_limit()
    with stop_on_signals(stop), accept_errors_as_warnings():
        if settings.webhook_secret is None:
            log.warning(
                "webhook_signatures_disabled",
                detail="started with --insecure-no-signature: anyone who can reach the port can "
                "enqueue events; use this for local runs only",
            )
        # The client's pool covers every batch in flight plus the readiness probe.
        pool = settings.max_inflight_batches + 2
        # Every entry is built by Envelope.send_entry and sized by intake.admit, so botocore's
        # client-side parameter validation (~10% of the CPU of each SendMessageBatch) is skipped;
        # SQS still validates, and a refused call fails its entries as retryable either way. A fixed
        # User-Agent saves botocore rebuilding it twice per call.
        client = aws.sqs_client(
            settings.aws,
            timeout_s=settings.sqs_timeout_s,
            max_pool=pool,
            parameter_validation=False,
            user_agent=SQS_USER_AGENT,
        )
        async with client as sqs:
            app = build_app(settings, sqs)
            runner = web.AppRunner(
                app, access_log=None, shutdown_timeout=CLOSE_WAIT_S, **server_options(settings)
            )
            await runner.setup()
            site: web.TCPSite | None = None
            admin: web.AppRunner | None = None
            try:
                listening = web.TCPSite(runner, settings.host, settings.port)
                await listening.start()
                site = listening
                if settings.admin_port is not None:
                    admin = await start_admin_server(
                        admin_app(app[RECEIVER].readiness), settings.admin_host, settings.admin_port
                    )
                log.info(
                    "receiver_started",
                    host=settings.host,
                    port=runner.addresses[0][1],  # the one bound, also when --port 0 asked for any
                    admin_host=settings.admin_host,
                    admin_port=settings.admin_port,
                    path=WEBHOOK_PATH,
                    queue_url=settings.queue_url,
                    unsigned_webhooks_accepted=settings.webhook_secret is None,
                    rotation_in_progress=settings.webhook_secret_previous is not None,
                    open_files_limit=open_files_limit,
                )
                await until_stopped(stop, app[RECEIVER].batcher)
                log.info("receiver_shutdown_started")
            finally:
                if site is not None:
                    await site.stop()  # stop listening; open connections still read their requests
                    await finish_in_flight(app, settings.shutdown_grace_s)
                # Closes the connections, then flushes the batcher.
                await runner.cleanup()
                if admin is not None:
                    await admin.cleanup()
    log.info("receiver_stopped")


class BatcherStopped(Exception):
    """The sqs-batcher task ended while the receiver was serving: a bug."""


async def until_stopped(stop: asyncio.Event, batcher: SqsBatcher) -> None:
    """Wait until ``stop`` is set. If the batcher's task ends first (it only does by a bug), every
    webhook would get 503 while /healthz said ok, and no supervisor would restart the process:
    raise :class:`BatcherStopped` instead, so the receiver shuts down and exits non-zero."""
    stopping = asyncio.create_task(stop.wait(), name="receiver-stop-wait")
    batcher_ended = asyncio.create_task(batcher.ended(), name="sqs-batcher-watch")
    try:
        await asyncio.wait({stopping, batcher_ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (stopping, batcher_ended):
            task.cancel()
        await asyncio.gather(stopping, batcher_ended, return_exceptions=True)
    if not stop.is_set():
        log.error("receiver_stopping_batcher_ended")
        raise BatcherStopped("the sqs-batcher task ended; the receiver cannot queue webhooks")
