# The service image: nginx in front of gunicorn, both as an unprivileged user; see README "Docker".
# An exact release, bumped on purpose; pin @sha256:<digest> too for byte-for-byte rebuilds.
FROM python:3.11.17-slim-trixie

# Log lines reach `docker logs` at once; no .pyc files or pip cache in the layers.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Two malloc arenas, not 8 per core: each of a worker's many threads otherwise grows its own heap.
ENV MALLOC_ARENA_MAX=2

# nginx takes slow clients and odd requests off gunicorn. Debian's, of the release FROM fixes:
# its security updates replace the archive's version, so a pin would break rebuilds (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# A fixed unprivileged user who can write only output/ and data/ (volumes): the code stays root's.
RUN groupadd --gid 10001 appuser \
    && useradd --uid 10001 --gid appuser --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin appuser \
    && mkdir -p /app/output /app/data \
    && chown appuser:appuser /app/output /app/data

# Dependencies before code, so this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN pip install -r requirements.txt

# --no-deps: the layer above installed them.
COPY pyproject.toml requirements.txt /src/
COPY replicate_generation /src/replicate_generation
RUN pip install --no-deps /src

# By number: runAsNonRoot can verify a numeric UID without reading /etc/passwd.
USER 10001:10001

# Documentation only: nginx listens on FLASK_PORT; gunicorn only on a private Unix socket.
EXPOSE 5003

# Passed on: gunicorn and nginx finish in-flight requests (Docker's default, stated so it stays).
STOPSIGNAL SIGTERM

# Liveness (not /ready: a restart cannot fix the state volume), through nginx; Python: no curl.
# Exec form expands no ${FLASK_PORT}, so Python reads it; ProxyHandler({}) skips HTTP(S)_PROXY.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; port = os.environ.get('FLASK_PORT', '').strip() or '5003'; u.build_opener(u.ProxyHandler({})).open(f'http://127.0.0.1:{port}/health', timeout=4)"]

# Exec form: the edge supervisor is PID 1 (replicate_generation/edge/): it starts gunicorn and
# nginx, passes SIGTERM on to both, reaps orphans, and exits non-zero when either dies.
CMD ["replicate-generation", "edge"]
