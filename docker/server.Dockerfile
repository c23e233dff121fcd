# The Hivewire coordinator server. Build from the repository root:
#   docker build -f docker/server.Dockerfile -t hivewire-server .
# It installs the hivewire-server distribution only: the server needs neither torch nor aiortc. It also
# carries the volunteer client's wheel (built without its dependencies, never installed here), which it serves
# at /downloads so the join page's `pip install` works against this server.

# Stage 1 builds a virtual environment; the final image copies it and leaves the build backend and any
# download caches behind.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# Only the files the distribution is built from (.dockerignore keeps the rest, .env included, out).
COPY pyproject.toml ./
COPY server/ server/
COPY dashboard/ dashboard/
COPY migrations/ migrations/
RUN /opt/venv/bin/pip install --no-cache-dir .

# The client wheel: `pip wheel --no-deps` builds hivewire-<version>-py3-none-any.whl from volunteer_client/
# alone; torch and the rest are for the volunteer's pip to fetch from their own index.
FROM python:3.11-slim AS client-wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY volunteer_client/ volunteer_client/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ./volunteer_client

FROM python:3.11-slim
# CLIENT_WHEEL_DIR: the wheel copied below is served even by a bare `docker run` (compose sets it too).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CLIENT_WHEEL_DIR=/app/wheels
# A fixed uid, so the ownership of the server-data volume stays the same across rebuilds.
RUN groupadd --system --gid 10001 hivewire \
    && useradd --system --uid 10001 --gid hivewire --home-dir /app --no-create-home hivewire \
    && mkdir -p /app/var \
    && chown hivewire:hivewire /app/var
COPY --from=build /opt/venv /opt/venv
# Read-only for the server user (owned by root).
COPY --from=client-wheel /wheels/ /app/wheels/
COPY --chmod=0755 docker/prestart.sh /usr/local/bin/prestart.sh
# The server's relative paths (var/) resolve here; /app/var is the server-data volume in docker-compose.yml.
WORKDIR /app
# Numeric, so runtimes that enforce "run as non-root" can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8000
# python rather than curl: the slim image has no curl, and urlopen fails on any non-2xx answer.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# prestart.sh waits for the database and migrates, then runs the hivewire-server command given here.
ENTRYPOINT ["prestart.sh"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
