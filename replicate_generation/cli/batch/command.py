"""The `run` command's arguments, and the run from them: read, check, resume, stop on a signal."""

from __future__ import annotations

import argparse
import hashlib
import logging
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from types import FrameType

from replicate_generation.cli.batch.backend import Backend
from replicate_generation.cli.batch.errors import UsageError
from replicate_generation.cli.batch.files import refuse_taken_outputs
from replicate_generation.cli.batch.in_process import InProcessBackend
from replicate_generation.cli.batch.manifest import JobLog, Manifest
from replicate_generation.cli.batch.progress import Progress, say
from replicate_generation.cli.batch.reader import Row, read_rows, validate
from replicate_generation.cli.batch.remote import ServiceBackend
from replicate_generation.cli.batch.run import EXIT_USAGE, Run
from replicate_generation.errors import SettingsError
from replicate_generation.library import BatchClient, load_settings
from replicate_generation.outputs import IF_EXISTS_CHOICES
from replicate_generation.settings import Settings

DESCRIPTION = "Run a CSV or JSONL file of generation requests, resumably."


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `run` command."""
    run = commands.add_parser("run", help="run (or resume) every request of a CSV/JSONL file",
                              description=DESCRIPTION)
    run.set_defaults(func=run_cli)
    run.add_argument("input", type=Path, help="requests: .csv (header row) or .jsonl")
    run.add_argument("--format", choices=("csv", "jsonl"), help="when the extension does not say")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--service-url", help="run on this service (e.g. http://127.0.0.1:5003)")
    where.add_argument("--in-process", action="store_true",
                       help="run here, sharing the host's limits through STATE_FILE (default)")
    run.add_argument("--api-key", help="the service's admin key (default "
                     "$CONCURRENT_DOCKER_ADMIN_API_KEY); the server's token pays")
    run.add_argument("--replicate-token", help="a Replicate token that pays (default "
                     "$REPLICATE_API_TOKEN); sent as X-Replicate-API-Key to a service")
    run.add_argument("--manifest", type=Path, help="default: INPUT.manifest.jsonl")
    run.add_argument("--model", help="model for rows without model_name")
    run.add_argument("--output-dir", type=Path,
                     help="copy (or download) every item's files here")
    run.add_argument("--if-exists", choices=IF_EXISTS_CHOICES, default="refuse",
                     help="when a file's name is already taken (whatever its extension): stop "
                     "before anything is spent (refuse, default), write beside it under a new "
                     "name (rename: NAME-2.EXT), or replace it (overwrite)")
    _add_run_options(run)


def _add_run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument("--chunk-size", type=int, help="items per job (default MAX_BATCH_SIZE)")
    run.add_argument("--poll-interval", type=float, default=1.0, help="seconds between looks")
    run.add_argument("--grace", type=float, default=0.0,
                     help="in-process: seconds running items may take to finish after Ctrl-C "
                     "(default 0: leave them for the next run)")
    run.add_argument("--retry-failed", action="store_true",
                     help="run again the items the manifest lists as failed")
    run.add_argument("--no-fallback", action="store_true", help="never fall back to another model")
    run.add_argument("--fallback-on-content-policy", action="store_true",
                     help="also fall back when a model refuses a prompt on content policy")
    run.add_argument("--placeholder", action="store_true",
                     help="write a black placeholder for failed image items (reported as failed)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    run.add_argument("-v", "--verbose", action="store_true", help="log each job")


def run_cli(args: argparse.Namespace) -> int:
    """Run the file; the first Ctrl-C or SIGTERM stops the run cleanly, a second one at once."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop waiting for anything
        received.append(signum)
        say(f"\nstopping ({signal.Signals(signum).name}) ...")
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = run_command(args, stop)
    except (UsageError, SettingsError) as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        say("interrupted")
        return 128 + signal.SIGINT
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else code


def run_command(args: argparse.Namespace, stop: threading.Event) -> int:
    settings = load_settings()
    try:
        data = args.input.read_bytes()
    except OSError as exc:
        raise UsageError(f"{args.input}: {exc.strerror}") from None
    chunk_size = args.chunk_size or settings.max_batch_size
    if chunk_size < 1 or args.poll_interval <= 0 or args.grace < 0:
        raise UsageError("--chunk-size must be >= 1, --poll-interval > 0 and --grace >= 0")
    options = {"fallback": not args.no_fallback,
               "fallback_on_content_policy": args.fallback_on_content_policy,
               "placeholder": args.placeholder}
    # The backend reads models as its jobs will: the service's, or MODEL_POLICY's here.
    backend = _backend(args, settings)
    try:
        rows = read_rows(args.input, data, args.model, args.format, backend.parameter_types)
        validate(rows, chunk_size, options, backend.check)
        return _run(args, backend, rows, data, chunk_size, options, stop)
    finally:
        backend.close()


def _run(args: argparse.Namespace, backend: Backend, rows: list[Row], data: bytes,
         chunk_size: int, options: dict[str, bool], stop: threading.Event) -> int:
    """Refuse taken outputs, then run the checked rows, recording each in the manifest."""
    input_sha = hashlib.sha256(data).hexdigest()
    manifest_path = args.manifest or args.input.with_name(args.input.name + ".manifest.jsonl")
    manifest = Manifest(manifest_path, input_sha)
    try:
        if args.if_exists == "refuse":
            refuse_taken_outputs(rows, args.output_dir, manifest, args.retry_failed)
        run = Run(rows=rows, chunk_size=chunk_size, options=options, input_sha=input_sha,
                  manifest=manifest, joblog=JobLog(Path(str(manifest_path) + ".jobs")),
                  backend=backend, output_dir=args.output_dir, retry_failed=args.retry_failed,
                  poll_interval=args.poll_interval,
                  progress=Progress(len(rows), sys.stderr, not args.no_progress), stop=stop,
                  if_exists=args.if_exists)
        return run.execute()
    finally:
        manifest.close()


def _backend(args: argparse.Namespace, settings: Settings) -> Backend:
    if args.service_url:
        admin = args.api_key or (None if args.replicate_token else settings.admin_api_key)
        token = args.replicate_token or settings.replicate_api_token
        if admin:
            return ServiceBackend(args.service_url, {"X-Admin-API-Key": admin})
        if token:
            return ServiceBackend(args.service_url, {"X-Replicate-API-Key": token})
        raise UsageError("give --api-key or --replicate-token (or set "
                         "CONCURRENT_DOCKER_ADMIN_API_KEY / REPLICATE_API_TOKEN)")
    if args.api_key:
        raise UsageError("--api-key is for --service-url; in-process runs pay with "
                         "--replicate-token or REPLICATE_API_TOKEN")
    client = BatchClient(token=args.replicate_token,
                         settings=replace(settings, shutdown_grace_seconds=args.grace))
    return InProcessBackend(client, client.token())
