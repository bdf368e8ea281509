"""Initial schema of the preference store (see annotation/schema.py).

Revision ID: 0001
Revises:
Create Date: 2026-11-22 21:01:32.193081

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # in dependency order: a table comes after the tables its foreign keys name
    _create_annotators()
    _create_prompts()
    _create_generations()
    _create_items()
    _create_sessions()
    _create_assignments()
    _create_item_responses()
    _create_votes()


def _create_annotators() -> None:
    op.create_table(
        "annotators",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=True),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("role IN ('annotator', 'admin', 'external')", name=op.f("ck_annotators_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotators")),
        sa.UniqueConstraint("username", name=op.f("uq_annotators_username")),
    )


def _create_prompts() -> None:
    op.create_table(
        "prompts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uid", sa.String(length=255), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(length=255), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompts")),
        sa.UniqueConstraint("uid", name=op.f("uq_prompts_uid")),
    )


def _create_generations() -> None:
    op.create_table(
        "generations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("model", sa.String(length=512), nullable=False),
        sa.Column("checkpoint", sa.String(length=1024), nullable=True),
        sa.Column("sampling", sa.JSON(), nullable=False),
        sa.Column("chat_template_sha256", sa.String(length=64), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["prompt_id"], ["prompts.id"], name=op.f("fk_generations_prompt_id_prompts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_generations")),
    )
    op.create_index(op.f("ix_generations_prompt_id"), "generations", ["prompt_id"], unique=False)


def _create_items() -> None:
    op.create_table(
        "items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("overlap", sa.Integer(), nullable=False),
        sa.Column("assigned", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Float(), nullable=False),
        sa.Column("gold_choice", sa.String(length=16), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("batch", sa.String(length=128), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint(
            "gold_choice IS NULL OR gold_choice IN ('A', 'B', 'C', 'D', 'tie', 'both_bad')",
            name=op.f("ck_items_gold_choice"),
        ),
        sa.CheckConstraint("status IN ('open', 'closed')", name=op.f("ck_items_status")),
        sa.CheckConstraint("assigned >= 0 AND assigned <= overlap", name=op.f("ck_items_assigned")),
        sa.CheckConstraint("overlap >= 1", name=op.f("ck_items_overlap")),
        sa.ForeignKeyConstraint(["prompt_id"], ["prompts.id"], name=op.f("fk_items_prompt_id_prompts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_items")),
    )
    op.create_index(op.f("ix_items_prompt_id"), "items", ["prompt_id"], unique=False)
    op.create_index(
        "ix_items_queue",
        "items",
        [sa.literal_column("priority DESC"), "id"],
        unique=False,
        sqlite_where=sa.text("status = 'open' AND gold_choice IS NULL AND assigned < overlap"),
        postgresql_where=sa.text("status = 'open' AND gold_choice IS NULL AND assigned < overlap"),
    )


def _create_sessions() -> None:
    op.create_table(
        "sessions",
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["annotator_id"],
            ["annotators.id"],
            name=op.f("fk_sessions_annotator_id_annotators"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token_sha256", name=op.f("pk_sessions")),
    )
    op.create_index(op.f("ix_sessions_annotator_id"), "sessions", ["annotator_id"], unique=False)


def _create_assignments() -> None:
    op.create_table(
        "assignments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("skips", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("status IN ('pending', 'done', 'skipped')", name=op.f("ck_assignments_status")),
        sa.ForeignKeyConstraint(
            ["annotator_id"], ["annotators.id"], name=op.f("fk_assignments_annotator_id_annotators")
        ),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name=op.f("fk_assignments_item_id_items")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assignments")),
        sa.UniqueConstraint("item_id", "annotator_id", name=op.f("uq_assignments_item_id_annotator_id")),
        sa.UniqueConstraint("item_id", "slot", name=op.f("uq_assignments_item_id_slot")),
    )
    op.create_index(op.f("ix_assignments_item_id"), "assignments", ["item_id"], unique=False)
    op.create_index("ix_assignments_queue", "assignments", ["annotator_id", "status"], unique=False)


def _create_item_responses() -> None:
    op.create_table(
        "item_responses",
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("generation_id", sa.Integer(), nullable=False),
        sa.CheckConstraint("position >= 0 AND position < 4", name=op.f("ck_item_responses_position")),
        sa.ForeignKeyConstraint(
            ["generation_id"], ["generations.id"], name=op.f("fk_item_responses_generation_id_generations")
        ),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name=op.f("fk_item_responses_item_id_items")),
        sa.PrimaryKeyConstraint("item_id", "position", name=op.f("pk_item_responses")),
        sa.UniqueConstraint("item_id", "generation_id", name=op.f("uq_item_responses_item_id_generation_id")),
    )
    op.create_index(
        op.f("ix_item_responses_generation_id"), "item_responses", ["generation_id"], unique=False
    )


def _create_votes() -> None:
    op.create_table(
        "votes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uid", sa.String(length=64), nullable=False),
        sa.Column("assignment_id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("choice", sa.String(length=16), nullable=False),
        sa.Column("ratings", sa.JSON(), nullable=False),
        sa.Column("rationale", sa.Text(), nullable=False),
        sa.Column("time_spent_s", sa.Float(), nullable=True),
        sa.Column("guideline_version", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("retracted_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint("choice IN ('A', 'B', 'C', 'D', 'tie', 'both_bad')", name=op.f("ck_votes_choice")),
        sa.CheckConstraint("time_spent_s IS NULL OR time_spent_s >= 0", name=op.f("ck_votes_time_spent")),
        sa.ForeignKeyConstraint(
            ["annotator_id"], ["annotators.id"], name=op.f("fk_votes_annotator_id_annotators")
        ),
        sa.ForeignKeyConstraint(
            ["assignment_id"], ["assignments.id"], name=op.f("fk_votes_assignment_id_assignments")
        ),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name=op.f("fk_votes_item_id_items")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_votes")),
        sa.UniqueConstraint("uid", name=op.f("uq_votes_uid")),
    )
    op.create_index("ix_votes_annotator", "votes", ["annotator_id", "id"], unique=False)
    op.create_index(op.f("ix_votes_item_id"), "votes", ["item_id"], unique=False)
    op.create_index(
        "uq_votes_active_assignment",
        "votes",
        ["assignment_id"],
        unique=True,
        sqlite_where=sa.text("retracted_at IS NULL"),
        postgresql_where=sa.text("retracted_at IS NULL"),
    )


def downgrade() -> None:
    for table in (
        "votes",
        "item_responses",
        "assignments",
        "sessions",
        "items",
        "generations",
        "prompts",
        "annotators",
    ):
        op.drop_table(table)  # drops its indexes too
