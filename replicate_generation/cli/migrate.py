"""The `migrate` command: bring the job store's schema (SQLite file or PostgreSQL) to the head."""

from __future__ import annotations

import argparse
import sys

from replicate_generation.backends import job_store_target, jobs_backend
from replicate_generation.errors import SettingsError, StoreUnavailable
from replicate_generation.library import load_settings


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `migrate`."""
    command = commands.add_parser(
        "migrate", help="upgrade the job store (DATABASE_URL, else STATE_FILE) to this version's "
                        "schema; the service also does it at start-up")
    command.set_defaults(func=run_migrate)


def run_migrate(_args: argparse.Namespace) -> int:
    from replicate_generation.jobs.migrations import migrate  # noqa: PLC0415 - loads alembic

    try:
        settings = load_settings()
        head = migrate(job_store_target(settings))
    except (SettingsError, StoreUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{jobs_backend(settings)} job store at revision {head}")
    return 0
