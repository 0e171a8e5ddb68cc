"""Federation: relationships with other trust domains, their bundles, and the federation revision.

Revision ID: 0002
Revises: 0001
Create Date: 2026-05-20

Written out in full rather than importing ``controlplane.store.schema``, as 0001 is.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    counters = sa.table("counters", sa.column("name", sa.String(64)), sa.column("value", sa.BigInteger()))
    op.bulk_insert(counters, [{"name": "federation_revision", "value": 0}])
    op.create_table(
        "federation_relationships",
        sa.Column("trust_domain", sa.Text(), nullable=False),
        sa.Column("bundle_endpoint_url", sa.Text(), nullable=False),
        sa.Column("profile", sa.String(16), nullable=False),
        sa.Column("endpoint_spiffe_id", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("refreshed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.CheckConstraint("profile IN ('https_web', 'https_spiffe')", name="ck_federation_relationships_profile"),
        sa.PrimaryKeyConstraint("trust_domain", name="pk_federation_relationships"),
    )
    op.create_table(
        "federated_bundles",
        sa.Column("trust_domain", sa.Text(), nullable=False),
        sa.Column("document", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["trust_domain"],
            ["federation_relationships.trust_domain"],
            name="fk_federated_bundles_trust_domain_federation_relationships",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("trust_domain", name="pk_federated_bundles"),
    )


def downgrade() -> None:
    op.drop_table("federated_bundles")
    op.drop_table("federation_relationships")
    op.execute("DELETE FROM counters WHERE name = 'federation_revision'")
