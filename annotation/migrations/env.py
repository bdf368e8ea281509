"""Alembic environment of the preference store.

``Store`` runs ``upgrade head`` on open (``annotation.store.migrate``), handing over its own connection in
``config.attributes["connection"]``; the ``alembic`` command line works too, with the database URL in
``-x db=URL`` (e.g. ``alembic -c annotation/migrations/alembic.ini -x db=sqlite:///runs/annotation.db
revision --autogenerate -m "..."``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from glmwb.annotation.schema import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things in place
        compare_type=True,
    )


def run_migrations_offline() -> None:
    context.configure(
        url=context.get_x_argument(as_dictionary=True).get("db") or config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("db") or config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.connect() as connection:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
