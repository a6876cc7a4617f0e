# One image for every jiralake service; the command picks the service (see compose.yaml):
#   docker run jiralake:local receiver | consumer | export --schedule "0 3 * * *" | setup | ...
#
# Stage 1 builds wheels of jiralake and all its dependencies; the final stage installs only those
# wheels (no index, no compiler) on python:3.11-slim and runs as an unprivileged user. The wheels are
# bind-mounted, not copied, so they take no layer: this needs BuildKit (Docker's default builder).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY jiralake ./jiralake
COPY receiver ./receiver
COPY consumer ./consumer
COPY exporter ./exporter
COPY shared ./shared
COPY ops ./ops
COPY backfill ./backfill
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 jiralake \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin jiralake
# The plain package, no extras: moto's server (the `local` extra, for `jiralake up` on a laptop) and
# its web stack stay out of the production image; compose.yaml runs moto from its own image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels jiralake
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/jiralake
# receiver: webhooks 8080, admin 9090; consumer admin 9091; scheduled exporter admin 9092.
EXPOSE 8080 9090 9091 9092
# Health: fetch JIRALAKE_HEALTH_URL, the /healthz of the running service's admin port. The default
# fits the receiver; set it per service (consumer: port 9091, `export --schedule`: 9092). One-shot
# commands (setup, export --once, backfill, dlq ...) serve nothing: run them with
# `docker run --no-healthcheck`, or a long one (a backfill) turns unhealthy, which Swarm acts on.
# Proxies are bypassed: the probe targets this container. Any error or non-2xx answer exits 1.
ENV JIRALAKE_HEALTH_URL=http://127.0.0.1:9090/healthz
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.build_opener(r.ProxyHandler({})).open(os.environ['JIRALAKE_HEALTH_URL'], timeout=4)"]
# Credentials come from the task/instance role (the standard AWS chain), never from the image.
ENTRYPOINT ["jiralake"]
CMD ["--help"]
