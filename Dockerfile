# An exact patch release on Debian 13 "trixie" (what python:3.11-slim points at), so a rebuild
# cannot silently change the interpreter or the OS under us. Bump it on purpose. For byte-for-byte
# reproducible builds also pin the digest once it is resolved with registry access:
#   FROM python:3.11.17-slim-trixie@sha256:<index digest from `docker buildx imagetools inspect`>
FROM python:3.11.17-slim-trixie

# Unbuffered so log lines reach `docker logs` at once; no .pyc files in a read-only code layer;
# no pip cache in the image; no pip self-update check at build time.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# A fixed, unprivileged UID/GID (10001, outside the host's usual 1000-range users) with no home
# and no login shell. Only the two runtime directories are writable by it: the code stays
# root-owned, so a compromised process cannot rewrite the service. output/ holds generated files,
# data/ the SQLite state file; both are volumes in docker-compose.yml.
RUN groupadd --gid 10001 appuser \
    && useradd --uid 10001 --gid appuser --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin appuser \
    && mkdir -p /app/output /app/data \
    && chown appuser:appuser /app/output /app/data

# Dependencies before code: this layer is rebuilt only when requirements.txt changes.
# requirements.txt pins every runtime dependency (no dev tools in the image); PIP_NO_CACHE_DIR
# above keeps pip's download cache out of the layer.
COPY requirements.txt ./
RUN pip install -r requirements.txt

# The package, installed into site-packages (root-owned, so the service cannot rewrite itself).
# Its source goes to /src, outside WORKDIR; --no-deps because the layer above installed them.
# .dockerignore keeps tests/, bench/, .env and the rest out of the build context.
COPY pyproject.toml requirements.txt /src/
COPY replicate_generation /src/replicate_generation
RUN pip install --no-deps /src

# appuser, by number: runtimes that enforce a non-root user (Kubernetes runAsNonRoot) can only
# verify a numeric UID without reading the image's /etc/passwd.
USER 10001:10001

# Documentation only: the port actually bound is FLASK_PORT (default 5003), see gunicorn.conf.py.
EXPOSE 5003

# gunicorn's graceful shutdown signal: stop accepting, finish in-flight requests for
# graceful_timeout (30 s), then exit. (Also Docker's default; stated so nobody changes it.)
STOPSIGNAL SIGTERM

# slim has no curl, so probe with the interpreter the image already has. Exec form runs no shell,
# so ${FLASK_PORT:-5003} would not be expanded; Python reads FLASK_PORT from the container's
# environment (env_file included) at probe time instead, with the same "unset or empty -> 5003"
# rule. ProxyHandler({}) ignores any HTTP(S)_PROXY in the environment, which would otherwise route
# this loopback request through a proxy. A non-2xx status, refused connection or timeout raises,
# and the uncaught exception exits 1 = unhealthy. The 4 s socket timeout stays under --timeout.
# Liveness (/health), not /ready: a restart cannot fix an unusable state volume, and Docker only
# restarts, it never holds traffic back; orchestrators that route should probe /ready instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; port = os.environ.get('FLASK_PORT', '').strip() or '5003'; u.build_opener(u.ProxyHandler({})).open(f'http://127.0.0.1:{port}/health', timeout=4)"]

# gunicorn as PID 1 (exec form, no shell in between), so it receives SIGTERM itself and reaps its
# own workers. The package's gunicorn_conf sets bind, gthread workers/threads, timeouts and
# header-free access logs from the environment.
CMD ["gunicorn", "-c", "python:replicate_generation.gunicorn_conf", "replicate_generation.app:create_app()"]
