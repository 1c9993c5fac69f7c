"""Alembic's environment: online only, on the connection `replicate_generation.migrations` hands
over (in config.attributes)."""

from __future__ import annotations

from alembic import context

from replicate_generation.jobs.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("run the job store's migrations with replicate_generation.migrations")
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
