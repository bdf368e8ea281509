"""Votes say how much better the winner is (``votes.strength``, see annotation/schema.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHECK = "strength IS NULL OR strength IN ('negligible', 'slight', 'clear', 'strong')"


def upgrade() -> None:
    # batch: SQLite cannot add a table constraint in place, so the table is copied (other databases ALTER)
    with op.batch_alter_table("votes") as batch:
        batch.add_column(sa.Column("strength", sa.String(length=16), nullable=True))
        batch.create_check_constraint(op.f("ck_votes_strength"), _CHECK)


def downgrade() -> None:
    with op.batch_alter_table("votes") as batch:
        batch.drop_constraint(op.f("ck_votes_strength"), type_="check")
        batch.drop_column("strength")
