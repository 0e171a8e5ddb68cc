"""Initial schema: entries and their events, agents, join tokens, bundle authorities, counters.

Revision ID: 0001
Revises:
Create Date: 2026-05-09

Written out in full rather than importing ``controlplane.store.schema``: a migration describes the
schema as it was at its revision, whatever the code says later.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    counters = op.create_table(
        "counters",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_counters"),
    )
    op.bulk_insert(
        counters,
        [
            {"name": "entry_revision", "value": 0},
            {"name": "bundle_sequence", "value": 0},
            {"name": "events_pruned_before", "value": 0},
        ],
    )
    op.create_table(
        "registration_entries",
        sa.Column("id", sa.String(255), nullable=False),
        sa.Column("spiffe_id", sa.Text(), nullable=False),
        sa.Column("parent_id", sa.Text(), nullable=False),
        sa.Column("similarity_key", sa.LargeBinary(), nullable=False),
        sa.Column("x509_svid_ttl", sa.Integer(), nullable=False),
        sa.Column("jwt_svid_ttl", sa.Integer(), nullable=False),
        sa.Column("dns_names", sa.Text(), nullable=False),
        sa.Column("federates_with", sa.Text(), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("downstream", sa.Boolean(), nullable=False),
        sa.Column("hint", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_registration_entries"),
        sa.UniqueConstraint("similarity_key", name="uq_registration_entries_similarity_key"),
    )
    op.create_index("ix_registration_entries_spiffe_id", "registration_entries", ["spiffe_id"])
    op.create_index("ix_registration_entries_parent_id", "registration_entries", ["parent_id"])
    op.create_table(
        "entry_selectors",
        sa.Column("entry_id", sa.String(255), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("digest", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_id"],
            ["registration_entries.id"],
            name="fk_entry_selectors_entry_id_registration_entries",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("entry_id", "digest", name="pk_entry_selectors"),
    )
    op.create_index("ix_entry_selectors_digest", "entry_selectors", ["digest"])
    op.create_table(
        "entry_events",
        sa.Column("revision", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("entry_id", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.CheckConstraint("kind IN ('create', 'update', 'delete')", name="ck_entry_events_kind"),
        sa.PrimaryKeyConstraint("revision", name="pk_entry_events"),
    )
    op.create_table(
        "attested_agents",
        sa.Column("spiffe_id", sa.Text(), nullable=False),
        sa.Column("attestation_type", sa.Text(), nullable=False),
        sa.Column("serial", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("selectors", sa.Text(), nullable=False),
        sa.Column("banned", sa.Boolean(), nullable=False),
        sa.Column("can_reattest", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("spiffe_id", name="pk_attested_agents"),
    )
    op.create_table(
        "join_tokens",
        sa.Column("digest", sa.LargeBinary(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("alias", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("digest", name="pk_join_tokens"),
    )
    op.create_index("ix_join_tokens_expires_at", "join_tokens", ["expires_at"])
    op.create_table(
        "x509_authorities",
        sa.Column("fingerprint", sa.LargeBinary(), nullable=False),
        sa.Column("server_id", sa.Text(), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("fingerprint", name="pk_x509_authorities"),
    )
    op.create_table(
        "jwt_authorities",
        sa.Column("kid", sa.Text(), nullable=False),
        sa.Column("server_id", sa.Text(), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("kid", name="pk_jwt_authorities"),
    )


def downgrade() -> None:
    for table in (
        "jwt_authorities",
        "x509_authorities",
        "join_tokens",
        "attested_agents",
        "entry_events",
        "entry_selectors",
        "registration_entries",
        "counters",
    ):
        op.drop_table(table)
