"""Outputs in an S3-compatible bucket (AWS S3, Cloudflare R2, GCS interoperability, MinIO).

A published file is uploaded from its local temp file to `<prefix><group>/<file>`: one PUT up to a
part's size, else a multipart upload, completed only once every part is in and aborted on any
error, so a crash leaves no object under the name. Both are conditional (If-None-Match: *): a name
is never written twice. Its SHA-256 goes with it (metadata `sha256`) and is checked on every read.
When the bucket cannot be reached, the file stays in the local spool under its final name; a
background thread uploads it once the bucket is back, and reads fall back to the spool meanwhile.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from replicate_generation.outputs.formats import content_type_for
from replicate_generation.outputs.placement import publish as publish_on_disk
from replicate_generation.outputs.storage import (
    READ_CHUNK_BYTES,
    FileInfo,
    Opened,
    OutputStoreUnavailable,
    check_relative,
    file_sha256,
    fsync_dir,
    local_info,
    opened_locally,
    remove_local_group,
    verified,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

# S3's smallest part is 5 MiB; one part is held in memory while it is sent.
PART_BYTES = 8 * 1024 * 1024
SHA256_META = "sha256"
SERVING_CHOICES = ("stream", "signed")
# Replicate keeps outputs an hour: after this long, nothing downloads into a request's directory.
SPOOL_DIR_IDLE_SECONDS = 6 * 3600
_MAX_RENAMES = 100
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_EXTENSION = re.compile(r"\.[0-9A-Za-z]+$")
# Answers that say the name is taken (412), or that a conditional write of it is under way (409).
_TAKEN = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})


class Location(NamedTuple):
    bucket: str
    prefix: str  # "" or ending in "/"


def parse_s3_url(url: str) -> Location:
    """`s3://bucket/prefix` as bucket and key prefix; ValueError names what is wrong."""
    if not url.startswith("s3://"):
        raise ValueError(f"must look like s3://bucket/prefix, got {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    if not _BUCKET.match(bucket):
        raise ValueError(f"{bucket!r} is not a valid bucket name")
    prefix = prefix.strip("/")
    if prefix and check_relative(prefix) is None:
        raise ValueError(f"the prefix {prefix!r} must be plain path parts")
    return Location(bucket, f"{prefix}/" if prefix else "")


class _NameTaken(Exception):
    """The key exists already: try the next name."""


class _Missing(OutputStoreUnavailable):
    """No such key (404); unexpected on a write, so it keeps the file in the spool there."""


class _Unsupported(OutputStoreUnavailable):
    """The store does not implement what was asked (501), e.g. If-None-Match."""


class S3Storage:
    """Outputs as objects in one bucket under one prefix; see the module's doc."""

    kind = "s3"

    def __init__(self, url: str, spool: Path, *, endpoint_url: str | None = None,
                 region: str | None = None, serving: str = "stream",
                 url_expiry_seconds: int = 3600, part_bytes: int = PART_BYTES,
                 retry_seconds: float = 10.0, start_uploader: bool = True) -> None:
        if serving not in SERVING_CHOICES:
            raise ValueError(f"serving must be one of {SERVING_CHOICES}, not {serving!r}")
        self._where = parse_s3_url(url)
        self.root = spool.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._serving = serving
        self._expiry = url_expiry_seconds
        self._part_bytes = max(part_bytes, 5 * 1024 * 1024)
        self._client = _client(endpoint_url, region)
        self._conditional = True  # If-None-Match is honoured, until the store says otherwise
        self._state = "ok"
        self._upload_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._retry_seconds = retry_seconds
        self._thread: threading.Thread | None = None
        if start_uploader:
            self._thread = threading.Thread(target=self._upload_loop, name="outputs-spool",
                                            daemon=True)
            self._thread.start()

    def location(self) -> str:
        return f"s3://{self._where.bucket}/{self._where.prefix}"

    def _key(self, relative: str) -> str:
        checked = check_relative(relative)
        if checked is None:
            raise ValueError("not a stored output's name")
        return self._where.prefix + checked

    # -- writing ------------------------------------------------------------------------------

    def publish(self, tmp: Path, relative: str, sha256: str, content_type: str) -> str:
        for candidate in _candidates(relative):
            try:
                with tmp.open("rb") as source:
                    self.upload(source, candidate, sha256, content_type)
            except _NameTaken:
                continue
            except OutputStoreUnavailable as exc:
                # Under the first name not known to be taken in the bucket.
                return self._keep_in_spool(tmp, candidate, str(exc))
            tmp.unlink(missing_ok=True)
            self._state = "ok"
            return candidate
        raise OSError(17, f"no free name for {relative} after {_MAX_RENAMES} tries")

    def _keep_in_spool(self, tmp: Path, relative: str, why: str) -> str:
        """Paid for: keep it here under its final name, to upload when the bucket is back."""
        self._state = f"unreachable: {why}"
        final = publish_on_disk(tmp, self.root / relative)
        fsync_dir(final.parent)
        log.warning("output %s kept in the local spool: the bucket is %s", relative, self._state)
        self._wake.set()
        return final.relative_to(self.root).as_posix()

    def upload(self, source: IO[bytes], relative: str, sha256: str, content_type: str) -> None:
        """Stream `source` to the object `relative`, never over one there (_NameTaken)."""
        key = self._key(relative)
        first = _read_part(source, self._part_bytes)
        fields = {"Bucket": self._where.bucket, "Key": key, "ContentType": content_type,
                  "Metadata": {SHA256_META: sha256}}
        if len(first) < self._part_bytes:
            self._conditionally(lambda cond: self._call(
                self._client.put_object, Body=first, **fields, **cond), key)
            return
        self._multipart(source, first, fields)

    def _multipart(self, source: IO[bytes], first: bytes, fields: dict[str, Any]) -> None:
        """Parts as they are read; complete (conditional) or abort: never half an object."""
        key = str(fields["Key"])
        # Cheap, and spares sending every part to a name that is taken; the complete decides.
        self._refuse_if_present(key)
        created = self._call(self._client.create_multipart_upload, **fields)
        upload = {"Bucket": fields["Bucket"], "Key": key, "UploadId": created["UploadId"]}
        try:
            parts: list[dict[str, Any]] = []
            block = first
            while block:
                answer = self._call(self._client.upload_part, Body=block,
                                    PartNumber=len(parts) + 1, **upload)
                parts.append({"ETag": answer["ETag"], "PartNumber": len(parts) + 1})
                block = _read_part(source, self._part_bytes)
            self._conditionally(lambda cond: self._call(
                self._client.complete_multipart_upload, MultipartUpload={"Parts": parts},
                **upload, **cond), key, check_first=False)
        except BaseException:
            with suppress(BotoCoreError, ClientError):
                self._client.abort_multipart_upload(**upload)
            raise

    def _conditionally(self, write: Callable[[dict[str, str]], object], key: str, *,
                       check_first: bool = True) -> None:
        """Write with If-None-Match: *; where the store does not implement it, look first."""
        if self._conditional:
            try:
                write({"IfNoneMatch": "*"})
                return
            except _Unsupported:
                log.warning("the bucket does not honour If-None-Match: looking before writing")
                self._conditional = False
        # Head-then-put: a writer between the two could be overwritten; names are unique per
        # request and per item, so only a retry of the same item could race here.
        if check_first:
            self._refuse_if_present(key)
        write({})

    def _refuse_if_present(self, key: str) -> None:
        try:
            self._call(self._client.head_object, Bucket=self._where.bucket, Key=key)
        except _Missing:
            return
        raise _NameTaken(key)

    def _call(self, method: Callable[..., Any], **kwargs: Any) -> Any:
        """One request; the store's answers as _NameTaken, _Missing, _Unsupported, or
        OutputStoreUnavailable (a message without credentials or signed URLs)."""
        try:
            return method(**kwargs)
        except ClientError as exc:
            raise _translated(exc) from None
        except BotoCoreError as exc:
            raise OutputStoreUnavailable(type(exc).__name__) from None

    # -- the spool ----------------------------------------------------------------------------

    def pending(self) -> list[Path]:
        """Files kept in the spool, waiting for the bucket, in name order. A request's directory
        left empty for SPOOL_DIR_IDLE_SECONDS goes: no download of it can still be under way."""
        found: list[Path] = []
        idle_since = time.time() - SPOOL_DIR_IDLE_SECONDS
        with suppress(OSError):
            for group in sorted(self.root.iterdir()):
                if not group.is_dir() or group.name.startswith("."):
                    continue
                entries = sorted(group.iterdir())
                found.extend(p for p in entries if p.is_file() and not p.name.startswith("."))
                if not entries and group.stat().st_mtime < idle_since:
                    with suppress(OSError):
                        group.rmdir()
        return found

    def upload_pending(self) -> int:
        """Upload every spooled file, under the name it was reported with; return how many
        left the spool. Stops at the first sign that the bucket is still away."""
        done = 0
        with self._upload_lock:
            for path in self.pending():
                relative = path.relative_to(self.root).as_posix()
                try:
                    self._upload_spooled(path, relative)
                except FileNotFoundError:
                    continue  # its job was removed meanwhile
                except OutputStoreUnavailable as exc:
                    self._state = f"unreachable: {exc}"
                    return done
                done += 1
            self._state = "ok"
        return done

    def _upload_spooled(self, path: Path, relative: str) -> None:
        digest = file_sha256(path)
        try:
            with path.open("rb") as source:
                self.upload(source, relative, digest, content_type_for(path.suffix))
        except _NameTaken:
            if self._stored_sha256(relative) != digest:
                # Never overwrite: it stays here, served from this machine's spool.
                log.error("output %s: another object holds its name in the bucket; "
                          "kept in the local spool", relative)
                return
        path.unlink(missing_ok=True)
        log.info("output %s uploaded from the local spool", relative)

    def _stored_sha256(self, relative: str) -> str | None:
        head = self._call(self._client.head_object, Bucket=self._where.bucket,
                          Key=self._key(relative))
        stored: str | None = head.get("Metadata", {}).get(SHA256_META)
        return stored

    def _upload_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._retry_seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.pending():
                    self.upload_pending()
                elif self._state != "ok":
                    self.probe_write()  # back: /health says so without waiting for an upload
            except OutputStoreUnavailable:
                pass  # still away: status() says so
            except Exception:  # noqa: BLE001 - the uploader must outlive one bad file
                log.exception("uploading the spooled outputs failed; retrying")

    # -- reading ------------------------------------------------------------------------------

    def _spooled(self, relative: str) -> Path | None:
        checked = check_relative(relative)
        path = self.root / checked if checked is not None else None
        return path if path is not None and path.is_file() else None

    def local_path(self, relative: str) -> Path | None:
        return self._spooled(relative)

    def stat(self, relative: str) -> FileInfo | None:
        spooled = self._spooled(relative)
        info = local_info(spooled) if spooled is not None else None
        if info is not None:
            return info
        try:
            head = self._call(self._client.head_object, Bucket=self._where.bucket,
                              Key=self._key(relative))
        except _Missing:
            return None
        return _info(head)

    def open_file(self, relative: str) -> Opened | None:
        """From the spool while it waits there, else one GET (its headers say the rest)."""
        spooled = self._spooled(relative)
        if spooled is not None:
            opened = opened_locally(spooled)
            if opened is not None:
                return opened
        try:
            answer = self._call(self._client.get_object, Bucket=self._where.bucket,
                                Key=self._key(relative))
        except _Missing:
            return None
        info = _info(answer)
        return Opened(info, verified(_body_pieces(answer["Body"]), info.sha256))

    def signed_url(self, relative: str) -> str | None:
        if self._serving != "signed" or self._spooled(relative) is not None:
            return None
        url: str = self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self._where.bucket, "Key": self._key(relative)},
            ExpiresIn=self._expiry)
        return url

    def locate(self, relative: str) -> str:
        spooled = self._spooled(relative)
        return str(spooled) if spooled is not None else self.location() + relative

    # -- upkeep -------------------------------------------------------------------------------

    def remove_group(self, group: str) -> None:
        """Delete a request's objects (1,000 a call) and its spool directory."""
        prefix = self._key(group) + "/"
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self._where.bucket, Prefix=prefix)
        try:
            for page in pages:
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    self._call(self._client.delete_objects, Bucket=self._where.bucket,
                               Delete={"Objects": keys, "Quiet": True})
        except ClientError as exc:
            raise _translated(exc) from None
        except BotoCoreError as exc:
            raise OutputStoreUnavailable(type(exc).__name__) from None
        remove_local_group(self.root, group)

    def status(self) -> str:
        waiting = len(self.pending())
        if waiting:
            return f"{self._state}; {waiting} file(s) waiting in the local spool"
        return self._state

    def probe_write(self) -> None:
        """Write and delete a tiny object: the only proof that uploads would work now."""
        key = f"{self._where.prefix}.probe/{uuid.uuid4().hex}"
        try:
            self._call(self._client.put_object, Bucket=self._where.bucket, Key=key, Body=b"")
            self._call(self._client.delete_object, Bucket=self._where.bucket, Key=key)
        except (OutputStoreUnavailable, _NameTaken) as exc:
            self._state = f"unreachable: {exc}"
            raise OutputStoreUnavailable(f"cannot write to the bucket: {exc}") from None
        self._state = "ok"
        if self.pending():
            self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._client.close()


def _translated(exc: ClientError) -> Exception:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in _TAKEN or status == 412:
        return _NameTaken(code)
    if code in ("NoSuchKey", "NotFound", "404"):
        return _Missing(code)
    if code == "NotImplemented" or status == 501:
        return _Unsupported(code)
    return OutputStoreUnavailable(f"the bucket answered {code or status}")


def _client(endpoint_url: str | None, region: str | None) -> S3Client:
    """A client from the standard AWS settings; credentials from boto3's own chain."""
    config = Config(
        retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60,
        signature_version="s3v4",
        # Path-style: MinIO and most S3-compatible endpoints need it; AWS still serves it.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        # Our own SHA-256 guards the bytes; the newer CRC headers trip some S3-compatibles.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required")
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def _info(answer: Any) -> FileInfo:
    """What a HEAD or GET's headers say of an object."""
    return FileInfo(size=int(answer["ContentLength"]),
                    content_type=str(answer.get("ContentType") or "application/octet-stream"),
                    modified=answer["LastModified"].timestamp(),
                    sha256=answer.get("Metadata", {}).get(SHA256_META))


def _read_part(source: IO[bytes], size: int) -> bytes:
    """Up to `size` bytes: fewer only at the end (a pipe may give less per read)."""
    pieces: list[bytes] = []
    left = size
    while left > 0 and (piece := source.read(min(left, READ_CHUNK_BYTES))):
        pieces.append(piece)
        left -= len(piece)
    return b"".join(pieces)


def _body_pieces(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(READ_CHUNK_BYTES)
    except BotoCoreError as exc:
        raise OutputStoreUnavailable(type(exc).__name__) from None
    finally:
        body.close()


def _candidates(relative: str) -> Iterator[str]:
    """`relative`, then `<stem>-2<ext>`, `<stem>-3<ext>`... as the disk names them."""
    directory, _, name = relative.rpartition("/")
    match = _EXTENSION.search(name)
    stem, ext = (name[:match.start()], match.group()) if match else (name, "")
    yield relative
    for number in range(2, _MAX_RENAMES):
        yield f"{directory}/{stem}-{number}{ext}" if directory else f"{stem}-{number}{ext}"
