"""A small aiohttp app for a service's admin port: ``/healthz`` (alive), ``/readyz`` (dependencies
reachable) and ``/metrics`` (Prometheus text format from the default registry)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared import http_server

log = structlog.get_logger()

# Returns None when ready, else a short reason.
ReadinessCheck = Callable[[], Awaitable[str | None]]


def add_health_routes(app: web.Application, readiness: ReadinessCheck) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        try:
            problem = await readiness()
        except Exception as exc:  # a readiness probe reports, it never crashes the service
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            return web.json_response({"status": "unavailable", "reason": problem}, status=503)
        return web.json_response({"status": "ready"})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def add_metrics_route(app: web.Application) -> None:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics)


def admin_app(readiness: ReadinessCheck) -> web.Application:
    app = web.Application()
    add_health_routes(app, readiness)
    add_metrics_route(app)
    return app


# How long an idle admin connection stays open (aiohttp's default: about an hour). Prometheus scrapes
# every 15-60 s on one kept-alive connection, which this outlasts.
ADMIN_IDLE_TIMEOUT_S = 75.0
# aiohttp's request handler for an admin port logs here (shared.http_server).
ADMIN_SERVER_LOG = http_server.server_logger("admin")


async def start_admin_server(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` with the same connection limits and logging of client faults as
    the webhook port (shared.http_server), whichever service runs it."""
    options = http_server.server_options(idle_timeout_s=ADMIN_IDLE_TIMEOUT_S, logger=ADMIN_SERVER_LOG)
    runner = web.AppRunner(app, access_log=None, **options)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("admin_server_started", host=host, port=port)
    return runner
