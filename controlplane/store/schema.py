"""The store's tables, as SQLAlchemy Core metadata. Alembic migrations must produce exactly this.

Decisions (see ``docs/architecture.md``):

- **Entry selectors** live in a child table, ``entry_selectors``: the one place they are stored,
  with an index on a digest of ``type:value`` so "entries with selector S" is an index lookup
  among 50,000 entries. The digest, not the text, is indexed because a selector value may be up
  to 1024 characters (4 KiB of UTF-8), beyond PostgreSQL's B-tree row limit.
- **Duplicate entries** are refused by a UNIQUE column, ``similarity_key``: a SHA-256 digest of
  the parent ID, SPIFFE ID and sorted selectors. A constraint, unlike a check-then-insert, holds
  when two servers insert the same entry at once.
- **DNS names and federated trust domains** are JSON arrays in the entry row: the store never
  queries by them, and a page of entries is read without a join for them.
- **Agent selectors** are a JSON array too: agents are read by ID, never searched by selector.
- **Revisions**: ``counters`` holds the global entry revision and the bundle sequence. A writer
  increments its counter row first, inside its transaction, so it holds that row's lock until it
  commits: revisions become visible in commit order, and a reader that has seen revision R has
  seen every revision before it (a database sequence would hand out numbers that commit out of
  order). ``entry_events`` records every create, update and delete by revision.
- **Join tokens** are stored as SHA-256 digests, never in clear: a copy of the database yields no
  usable token.
- **Times** are ``TIMESTAMP WITH TIME ZONE`` on PostgreSQL; SQLite stores them as UTC text.
- **Federation** (revision 0002): ``federation_relationships`` holds one row per foreign trust
  domain with how its last fetch went; ``federated_bundles`` its bundle as the canonical SPIFFE
  bundle JSON, deleted with the relationship. Bundles of different trust domains are separate rows,
  never merged. Every change agents could see (a relationship created or deleted, a new bundle
  stored) bumps the ``federation_revision`` counter, which serializes the writers as the other
  counters do: two servers storing the same fetched bundle store it once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
)

NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Names of the rows of ``counters``.
ENTRY_REVISION: Final = "entry_revision"
BUNDLE_SEQUENCE: Final = "bundle_sequence"
EVENTS_PRUNED_BEFORE: Final = "events_pruned_before"
FEDERATION_REVISION: Final = "federation_revision"
COUNTER_NAMES: Final = (ENTRY_REVISION, BUNDLE_SEQUENCE, EVENTS_PRUNED_BEFORE, FEDERATION_REVISION)
FEDERATION_PROFILES: Final = ("https_web", "https_spiffe")

ENTRY_ID_LENGTH: Final = 255


class UTCDateTime(TypeDecorator[datetime]):
    """An aware datetime, stored in UTC and always read back aware (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("store: times must carry a time zone")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata: Final = MetaData(naming_convention=NAMING_CONVENTION)

counters: Final = Table(
    "counters",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

registration_entries: Final = Table(
    "registration_entries",
    metadata,
    Column("id", String(ENTRY_ID_LENGTH), primary_key=True),
    Column("spiffe_id", Text, nullable=False, index=True),
    Column("parent_id", Text, nullable=False, index=True),
    Column("similarity_key", LargeBinary, nullable=False, unique=True),
    Column("x509_svid_ttl", Integer, nullable=False),
    Column("jwt_svid_ttl", Integer, nullable=False),
    Column("dns_names", Text, nullable=False),
    Column("federates_with", Text, nullable=False),
    Column("admin", Boolean, nullable=False),
    Column("downstream", Boolean, nullable=False),
    Column("hint", Text, nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("revision", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

entry_selectors: Final = Table(
    "entry_selectors",
    metadata,
    Column(
        "entry_id",
        String(ENTRY_ID_LENGTH),
        ForeignKey("registration_entries.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("type", Text, nullable=False),
    Column("value", Text, nullable=False),
    Column("digest", LargeBinary, nullable=False),
    PrimaryKeyConstraint("entry_id", "digest"),
    Index(None, "digest"),
)

entry_events: Final = Table(
    "entry_events",
    metadata,
    Column("revision", BigInteger, primary_key=True, autoincrement=False),
    Column("entry_id", String(ENTRY_ID_LENGTH), nullable=False),
    Column("kind", String(8), nullable=False),
    CheckConstraint("kind IN ('create', 'update', 'delete')", name="kind"),
)

attested_agents: Final = Table(
    "attested_agents",
    metadata,
    Column("spiffe_id", Text, primary_key=True),
    Column("attestation_type", Text, nullable=False),
    Column("serial", Text, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("selectors", Text, nullable=False),
    Column("banned", Boolean, nullable=False),
    Column("can_reattest", Boolean, nullable=False),
)

join_tokens: Final = Table(
    "join_tokens",
    metadata,
    Column("digest", LargeBinary, primary_key=True),
    Column("expires_at", UTCDateTime, nullable=False, index=True),
    Column("alias", Text, nullable=True),
)

x509_authorities: Final = Table(
    "x509_authorities",
    metadata,
    Column("fingerprint", LargeBinary, primary_key=True),
    Column("server_id", Text, nullable=False),
    Column("der", LargeBinary, nullable=False),
    Column("not_after", UTCDateTime, nullable=False),
)

jwt_authorities: Final = Table(
    "jwt_authorities",
    metadata,
    Column("kid", Text, primary_key=True),
    Column("server_id", Text, nullable=False),
    Column("public_key", LargeBinary, nullable=False),
    Column("not_after", UTCDateTime, nullable=False),
)

federation_relationships: Final = Table(
    "federation_relationships",
    metadata,
    Column("trust_domain", Text, primary_key=True),
    Column("bundle_endpoint_url", Text, nullable=False),
    Column("profile", String(16), nullable=False),
    Column("endpoint_spiffe_id", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("refreshed_at", UTCDateTime, nullable=True),
    Column("last_attempt_at", UTCDateTime, nullable=True),
    Column("last_error", Text, nullable=False),
    CheckConstraint("profile IN ('https_web', 'https_spiffe')", name="profile"),
)

federated_bundles: Final = Table(
    "federated_bundles",
    metadata,
    Column(
        "trust_domain",
        Text,
        ForeignKey("federation_relationships.trust_domain", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("document", LargeBinary, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)
