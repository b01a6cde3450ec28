# GhostCloak Relay container image.
#   docker build -t ghostcloak-relay .
#   docker run -p 8443:8443 -e MIDNIGHT_NODE=ws://node:9944 ghostcloak-relay
# tests/test_container.py runs the install step and the start command below in a clean
# virtual environment, since these machines have no Docker engine.

# Build stage: the full Python image has the C compiler that mypyc and Cython need for the
# data plane (docs/operations.md, "Compiled data plane"); the result is one venv.
FROM python:3.12-bookworm AS build

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md hatch_build.py ./
COPY src ./src
COPY scripts/build_native.py ./scripts/

# install step: dependencies, mypy and Cython, compile, install the relay with its compiled
# modules, drop the build tools
RUN python -m venv /opt/relay \
    && /opt/relay/bin/pip install "/app[native]" \
    && /opt/relay/bin/python scripts/build_native.py \
    && /opt/relay/bin/pip install --no-deps --force-reinstall /app \
    && /opt/relay/bin/pip uninstall -y mypy cython setuptools librt pathspec ast-serialize

# Run stage: slim, the venv only; the same Debian release and Python as the build stage,
# so the compiled modules load (if they did not, the relay would run as pure Python).
FROM python:3.12-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

COPY --from=build /opt/relay /opt/relay

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay
USER 10001

ENV PATH=/opt/relay/bin:$PATH \
    PORT=8443 \
    RELAY_HOST=0.0.0.0
EXPOSE 8443

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-m", "ghostcloak_relay.healthcheck"]

STOPSIGNAL SIGTERM
CMD ["ghostcloak-relay", "serve"]
