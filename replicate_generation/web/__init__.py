"""The browser console at `/`: server-rendered pages, a little JavaScript, and a session that
keeps the caller's key on the server (see README, "Console")."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets

from flask import Flask

from replicate_generation.settings import Settings
from replicate_generation.web.sessions import SessionStore
from replicate_generation.web.views import bp

log = logging.getLogger(__name__)
SESSION_TTL_SECONDS = 12 * 3600


def register(app: Flask, settings: Settings) -> None:
    secret = session_secret(settings)
    app.secret_key = hmac.new(secret, b"cookie", hashlib.sha256).digest()
    app.config.update(SESSION_COOKIE_NAME="console_session", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict",
                      SESSION_COOKIE_SECURE=os.environ.get("SESSION_COOKIE_SECURE") == "1")
    app.extensions["console_sessions"] = SessionStore(
        settings.state_file, hmac.new(secret, b"seal", hashlib.sha256).digest(),
        SESSION_TTL_SECONDS, admin_key=settings.admin_api_key)
    app.register_blueprint(bp)


def session_secret(settings: Settings) -> bytes:
    """SESSION_SECRET; else one derived from the admin key (the same in every worker); else
    random per process (sessions then live only as long as the process, in one worker)."""
    configured = os.environ.get("SESSION_SECRET")
    if configured:
        return configured.encode()
    if settings.admin_api_key:
        return hmac.new(settings.admin_api_key.encode(), b"console-session-secret",
                        hashlib.sha256).digest()
    log.warning("neither SESSION_SECRET nor the admin key is set: console sessions use a "
                "random per-process secret")
    return secrets.token_bytes(32)
