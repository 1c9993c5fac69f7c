"""Console routes: pages, sign-in/out, assets, and /console/api/<path>, which runs the JSON API
in-process with the session's key (the one authorization path, ownership included)."""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import cast

from flask import (
    Blueprint,
    Response,
    current_app,
    redirect,
    render_template,
    request,
    send_from_directory,
    session,
)
from werkzeug.exceptions import NotFound
from werkzeug.test import run_wsgi_app
from werkzeug.wrappers import Response as WerkzeugResponse

from replicate_generation.errors import TokenRejected
from replicate_generation.http import context
from replicate_generation.http.auth import same_secret, token_shaped, verify_user_token
from replicate_generation.http.errors import ApiError, error_response
from replicate_generation.web.sessions import ConsoleSession, SessionStore

HERE = Path(__file__).resolve().parent
bp = Blueprint("console", __name__, template_folder="templates")
ASSETS = {"console.css", "console.js", "job.js", "common.js", "usage.js", "keys.js"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "media-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
       "frame-ancestors 'none'; object-src 'none'")
# What the console may reach of the JSON API (no /configure, no webhook secret).
# /keys answers only the admin (the API's own check); event streams pass through unbuffered.
FORWARDED = re.compile(r"^(models|status|generate-batch|events|usage|jobs(/[A-Za-z0-9_-]+"
                       r"(/(cancel|retry|archive|items|events))?)?|keys(/[A-Za-z0-9_-]+(/rotate)?)?"
                       r"|files/.+)$")
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
NOT_ACCEPTED = "That key was not accepted."


def _store() -> SessionStore:
    return cast(SessionStore, current_app.extensions["console_sessions"])


def _current() -> ConsoleSession | None:
    session_id = session.get("sid")
    return _store().get(session_id) if isinstance(session_id, str) else None


@bp.after_request
def _security_headers(response: WerkzeugResponse) -> WerkzeugResponse:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _page(template: str, **context: object) -> WerkzeugResponse | str:
    current = _current()
    if current is None:
        return _sign_in_page()
    return render_template(template, csrf=current.csrf, admin=current.admin, **context)


def _sign_in_page(error: str | None = None, status: int = 200) -> WerkzeugResponse:
    # A pre-session CSRF token in the signed cookie: no one else's page can sign you in.
    pre = session.get("pre_csrf")
    if not isinstance(pre, str):
        pre = session["pre_csrf"] = secrets.token_urlsafe(32)
    html = render_template("signin.html", csrf=pre, error=error)
    return Response(html, status=status, mimetype="text/html")


@bp.get("/")
def index() -> WerkzeugResponse | str:
    """The console: the new-generation form, the jobs list and the status panel."""
    return _page("console.html")


@bp.get("/console/jobs/<job_id>")
def job_page(job_id: str) -> WerkzeugResponse | str:
    """One job: its gallery, cancel, retry and the zip."""
    return _page("job.html", job_id=job_id)


@bp.get("/console/usage")
def usage_page() -> WerkzeugResponse | str:
    """Spend by key, model and day, as a chart and a table (from GET /usage)."""
    return _page("usage.html")


@bp.get("/console/keys")
def keys_page() -> WerkzeugResponse | str:
    """The admin's issued keys: mint, rotate, revoke (the secret shown once)."""
    return _page("keys.html")


@bp.post("/console/sign-in")
def sign_in() -> WerkzeugResponse:
    """Check the key (a token with Replicate) and open a session; the key stays on the server."""
    if not _csrf_ok(session.get("pre_csrf"), request.form.get("csrf_token")):
        return _plain(403, "Missing or wrong CSRF token")
    kind, key = request.form.get("kind", "admin"), request.form.get("key", "")
    admin = kind == "admin"
    refused = _refusal(admin, key)
    if refused is not None:
        return _sign_in_page(*refused)
    previous = session.get("sid")
    if isinstance(previous, str):
        _store().delete(previous)
    session.clear()
    session["sid"], _ = _store().create(admin, key)
    return redirect("/", 303)


@bp.post("/console/sign-out")
def sign_out() -> WerkzeugResponse:
    current = _current()
    if current is None or not _csrf_ok(current.csrf, request.form.get("csrf_token")):
        return _plain(403, "Missing or wrong CSRF token")
    _store().delete(str(session["sid"]))
    session.clear()
    return redirect("/", 303)


@bp.get("/console/static/<filename>")
def asset(filename: str) -> WerkzeugResponse:
    if filename not in ASSETS:
        raise NotFound("No such console file")
    return send_from_directory(HERE / "static", filename, max_age=0)


@bp.get("/console/api/<path:path>")
def api_read(path: str) -> WerkzeugResponse:
    """The JSON API as the session's account."""
    return _api(path)


@bp.post("/console/api/<path:path>")
def api_write(path: str) -> WerkzeugResponse:
    """The JSON API as the session's account; needs the X-CSRF-Token header."""
    return _api(path)


@bp.delete("/console/api/<path:path>")
def api_delete(path: str) -> WerkzeugResponse:
    """DELETE on the JSON API (a key's revocation) as the session's account; needs CSRF."""
    return _api(path)


def _api(path: str) -> WerkzeugResponse:
    current = _current()
    if current is None:
        return error_response(401, "Sign in to the console first")
    if request.method in STATE_CHANGING and not _csrf_ok(current.csrf,
                                                        request.headers.get("X-CSRF-Token")):
        return error_response(403, "Missing or wrong CSRF token")
    if not FORWARDED.match(path):
        return error_response(404, "Not a console route")
    return _forward(path, current)


def _forward(path: str, current: ConsoleSession) -> WerkzeugResponse:
    environ = {k: v for k, v in request.environ.items()
               if k not in ("HTTP_COOKIE", "HTTP_X_ADMIN_API_KEY", "HTTP_X_REPLICATE_API_KEY",
                            "werkzeug.request")}
    environ["PATH_INFO"] = "/" + path
    environ["HTTP_X_OUTPUT_DELIVERY"] = "stream"  # the page's CSP admits no bucket's URL
    if current.admin:
        environ["HTTP_X_ADMIN_API_KEY"] = context.settings().admin_api_key or ""
    else:
        environ["HTTP_X_REPLICATE_API_KEY"] = current.token or ""
    body, status, headers = run_wsgi_app(current_app.wsgi_app, environ)
    if headers.get("Content-Type", "").startswith("application/json"):
        response = Response(_drain(body), status=status, headers=headers)  # hooks may edit it
    else:  # files and zips stream through as they are
        response = Response(body, status=status, headers=headers, direct_passthrough=True)
    response.headers.pop("Set-Cookie", None)  # the inner request must not touch the session
    return response


def _drain(body: Iterable[bytes]) -> bytes:
    try:
        return b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


def _refusal(admin: bool, key: str) -> tuple[str, int] | None:
    """Why the key opens no session (the page's message and status), or None: a token only
    once Replicate accepts it, so an invented one leaves nothing behind."""
    if admin:
        return None if same_secret(key, context.settings().admin_api_key) else (NOT_ACCEPTED, 401)
    if not token_shaped(key):
        return NOT_ACCEPTED, 401
    try:
        verify_user_token(key)
    except TokenRejected:
        return NOT_ACCEPTED, 401
    except ApiError as exc:
        return "Replicate could not be reached to check that token; try again shortly.", exc.status
    return None


def _csrf_ok(expected: object, given: str | None) -> bool:
    return (isinstance(expected, str) and given is not None
            and hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogatepass")))


def _plain(status: int, message: str) -> WerkzeugResponse:
    return Response(message, status=status, mimetype="text/plain")
