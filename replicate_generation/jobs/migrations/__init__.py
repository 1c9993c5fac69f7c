"""Alembic migrations of the job store's tables: run by every JobStore at start-up, and by
`migrate()` (the CLI's). Needs no alembic.ini: the script location is this package."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, func, select

from replicate_generation.jobs.schema import backend_of, open_engine, reachable
from replicate_generation.sqlite_db import sqlite_transaction

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key: one upgrade at a time per database, whatever the process.
_LOCK_KEY = 0x72675F6A6F6273  # "rg_jobs"


def migrate(target: str) -> str:
    """Upgrade the store at `target` (a path or a database URL) to head; return the revision."""
    engine = open_engine(target)
    try:
        return upgrade(engine)
    finally:
        engine.dispose()


def upgrade(engine: Engine) -> str:
    """Upgrade to head while holding the database's write lock (SQLite) or an advisory lock
    (PostgreSQL), so concurrent start-ups upgrade once; return the current revision."""
    with reachable(engine, connecting=True):
        conn = engine.connect()
    with reachable(engine), conn:
        if backend_of(engine) == "sqlite":
            # The SQLAlchemy transaction makes it Alembic's caller's: it neither begins nor ends.
            with conn.begin(), sqlite_transaction(conn, immediate=True, patience=None):
                return _upgrade_on(conn)
        with conn.begin():
            conn.execute(select(func.pg_advisory_xact_lock(_LOCK_KEY)))
            return _upgrade_on(conn)


def _upgrade_on(conn: Connection) -> str:
    # Alembic's INFO lines would repeat in every worker at every start; ours says what changed.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    config = _config(conn)
    head = ScriptDirectory.from_config(config).get_current_head()
    current = MigrationContext.configure(conn).get_current_revision()
    if current == head and head is not None:
        return head  # every start-up but the first after an upgrade: nothing to do or log
    command.upgrade(config, "head")
    revision = MigrationContext.configure(conn).get_current_revision()
    if revision is None:
        raise RuntimeError("the job store's migrations recorded no revision")
    log.info("job store schema upgraded from %s to %s", current or "nothing", revision)
    return revision


def _config(conn: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    # env.py runs on this connection, inside the caller's transaction.
    config.attributes["connection"] = conn
    return config
