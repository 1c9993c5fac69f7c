"""File routes: the output files of predictions (``/_sim/outputs/``, until the TTL ends, with
the download delay and failure knobs, and the hostile outputs of prompt markers: redirects, drips,
sizes, gzip bombs) and the ``/v1/files`` upload API."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, g, request

from replicate_generation.devtools.simulator.config import Shared
from replicate_generation.devtools.simulator.ledger import Ledger, new_id
from replicate_generation.devtools.simulator.lifecycle import Prediction
from replicate_generation.devtools.simulator.markers import OutputTricks, output_tricks
from replicate_generation.devtools.simulator.output_files import (
    CONTENT_TYPES,
    gzip_bomb,
    output_bytes,
)
from replicate_generation.devtools.simulator.web import (
    FILE_NOT_FOUND,
    FILE_TOO_BIG,
    INTERNAL_ERROR,
    NOT_FOUND,
    UNAUTHENTICATED,
    ApiError,
    base_url,
    field_error,
    json_response,
    problem_response,
    request_token,
    validation_problem,
)

_MAX_FILE_BYTES = 100 * 1024 * 1024
_DRIP_TICK_S = 0.05  # a drip sends a piece at most this often


@dataclass
class _StoredFile:
    id: str
    name: str
    content_type: str
    data: bytes
    metadata: dict[str, Any]
    created: float
    token_hash: str


class FileRoutes:
    """Serves output files and keeps the uploaded ones."""

    def __init__(self, shared: Shared, ledger: Ledger) -> None:
        self._shared = shared
        self._ledger = ledger
        self._files: dict[str, _StoredFile] = {}

    def clear_locked(self) -> None:
        self._files.clear()

    def add_routes(self, app: Flask) -> None:
        route = app.add_url_rule
        route("/_sim/outputs/<pid>/<filename>", view_func=self._serve_output, methods=["GET"])
        route("/v1/files", view_func=self._upload_file, methods=["POST"])
        route("/v1/files", view_func=self._list_files, methods=["GET"])
        route("/v1/files/<fid>", view_func=self._get_file, methods=["GET"])
        route("/v1/files/<fid>", view_func=self._delete_file, methods=["DELETE"])
        route("/v1/files/<fid>/download", view_func=self._download_file, methods=["GET"])

    def _serve_output(self, pid: str, filename: str) -> Response:
        """GET /_sim/outputs/{id}/{n}.{ext}: the bytes of one output, until the TTL ends."""
        token = request_token()
        with self._shared.lock:
            cfg = self._shared.config
            if cfg.require_auth_for_files and (token is None or token in cfg.invalid_tokens):
                return problem_response(401, UNAUTHENTICATED)
            pred, ext = self._output_lookup_locked(pid, filename)
            self._ledger.count_locked(pred.token_hash, "downloads")
            fail = cfg.download_failures > 0
            if fail:
                cfg.download_failures -= 1
            delay = cfg.download_delay_seconds
        if delay > 0:
            time.sleep(delay)
        if fail:
            return problem_response(500, INTERNAL_ERROR)
        tricks = output_tricks(pred.picture()["prompt"])
        if tricks.redirect_to is not None:
            return Response(b"", 302, headers={"Location": tricks.redirect_to})
        data = output_bytes(ext, f"{pid}/{filename.split('.')[0]}",
                            tricks.size or cfg.output_bytes, **pred.picture())
        return self._output_response(data, ext, tricks)

    def _output_response(self, data: bytes, ext: str, tricks: OutputTricks) -> Response:
        """The file as the markers serve it: gzip-bombed, dripped, or plainly."""
        headers = {"Content-Length": ""}
        if tricks.gzip_bomb is not None:
            data = gzip_bomb(data, tricks.gzip_bomb)
            headers["Content-Encoding"] = "gzip"
        headers["Content-Length"] = str(len(data))
        body: bytes | Iterator[bytes] = data
        if tricks.drip is not None:
            body = self._drip(data, tricks.drip)
        return Response(body, 200, mimetype=CONTENT_TYPES[ext], headers=headers)

    def _drip(self, data: bytes, rate: float) -> Iterator[bytes]:
        """Send `data` at `rate` bytes a second; reset and stop end it (the socket closes)."""
        tick = max(_DRIP_TICK_S, 1.0 / max(rate, 1e-6))
        step = max(1, round(rate * tick))
        shared = self._shared
        with shared.changed:
            generation = shared.generation
        for start in range(0, len(data), step):
            yield data[start:start + step]
            until = time.monotonic() + tick
            with shared.changed:
                while shared.generation == generation and time.monotonic() < until:
                    shared.changed.wait(until - time.monotonic())
                if shared.generation != generation:
                    return

    def _output_lookup_locked(self, pid: str, filename: str) -> tuple[Prediction, str]:
        """Return the prediction and extension behind an output URL, or raise 404."""
        pred = self._ledger.predictions.get(pid)
        index, _, ext = filename.partition(".")
        if pred is None or ext != pred.ext or not index.isdigit():
            raise ApiError(404, NOT_FOUND)
        now = self._shared.now()
        end = pred.terminal_time()
        alive = (
            pred.status(now) == "succeeded"
            and end is not None
            and now < end + self._shared.config.output_ttl_seconds
        )
        if not alive or pred.empty or int(index) >= pred.n_outputs:
            raise ApiError(404, NOT_FOUND)
        return pred, ext

    def _upload_file(self) -> Response:
        """POST /v1/files: multipart ``content`` (+ ``metadata`` JSON); 201 File."""
        part = request.files.get("content")
        if part is None:
            raise ApiError(
                422,
                validation_problem([field_error("required", "content", "content is required")]),
            )
        data = part.read()
        if len(data) >= _MAX_FILE_BYTES:
            raise ApiError(413, FILE_TOO_BIG)
        stored = _StoredFile(
            id=new_id(),
            name=part.filename or "file",
            content_type=part.mimetype or "application/octet-stream",
            data=data,
            metadata=_parse_metadata(request.form.get("metadata")),
            created=self._shared.now(),
            token_hash=g.token_hash,
        )
        with self._shared.lock:
            self._files[stored.id] = stored
        return json_response(201, self._file_json(stored, base_url()))

    def _owned_file(self, fid: str) -> _StoredFile:
        with self._shared.lock:
            stored = self._files.get(fid)
        if stored is None or stored.token_hash != g.token_hash:
            raise ApiError(404, FILE_NOT_FOUND)
        return stored

    def _get_file(self, fid: str) -> Response:
        """GET /v1/files/{id}."""
        return json_response(200, self._file_json(self._owned_file(fid), base_url()))

    def _list_files(self) -> Response:
        """GET /v1/files."""
        base = base_url()
        with self._shared.lock:
            mine = [f for f in self._files.values() if f.token_hash == g.token_hash]
        return json_response(
            200,
            {"next": None, "previous": None, "results": [self._file_json(f, base) for f in mine]},
        )

    def _delete_file(self, fid: str) -> Response:
        """DELETE /v1/files/{id}: 204 (the client checks for exactly 204)."""
        stored = self._owned_file(fid)
        with self._shared.lock:
            self._files.pop(stored.id, None)
        return Response(b"", 204)

    def _download_file(self, fid: str) -> Response:
        """GET /v1/files/{id}/download: the uploaded bytes."""
        stored = self._owned_file(fid)
        return Response(stored.data, 200, mimetype=stored.content_type)

    def _file_json(self, stored: _StoredFile, base: str) -> dict[str, Any]:
        md5 = hashlib.md5(stored.data, usedforsecurity=False).hexdigest()
        return {
            "id": stored.id,
            "name": stored.name,
            "content_type": stored.content_type,
            "size": len(stored.data),
            "etag": md5,
            "checksums": {"sha256": hashlib.sha256(stored.data).hexdigest(), "md5": md5},
            "metadata": stored.metadata,
            "created_at": self._shared.iso(stored.created),
            "expires_at": self._shared.iso(stored.created + 24 * 3600),
            "urls": {"get": f"{base}/v1/files/{stored.id}"},
        }


def _parse_metadata(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ApiError(
            422,
            validation_problem(
                [field_error("invalid_type", "metadata", "metadata must be a JSON object")]
            ),
        )
    return value
