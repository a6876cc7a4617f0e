# One image for every jiralake service; the command picks the service (see compose.yaml).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY jiralake ./jiralake
COPY receiver ./receiver
COPY consumer ./consumer
COPY exporter ./exporter
COPY shared ./shared
COPY ops ./ops
COPY backfill ./backfill
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 jiralake
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER jiralake
# Credentials come from the task/instance role (the standard AWS chain), never from the image.
ENTRYPOINT ["jiralake"]
CMD ["--help"]
