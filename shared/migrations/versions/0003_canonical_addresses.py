"""canonical addresses: IDNA domains in consents, consent modes, users' addresses, suppressions

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 09:30:00.000000

Addresses and domains are now stored as shared/addresses.py spells them: the
domain in its IDNA ASCII form (UTS 46), the local part lower-cased. Until now
consents, consent domains and users' addresses kept an IDN domain in Unicode
(``bücher.example``), and so did suppressions from the public page before it
was fixed; the relay looks recipients up in ASCII (``xn--bcher-kva.example``),
so those rows never matched. This rewrites them. Policies were always stored
in the IDNA form and are left alone.

The spelling is copied here rather than imported, so this migration keeps
doing what it does today. A row it cannot read is left as it is. When the new
spelling is already stored, that row is kept and the other removed (for a
consent mode the stricter one, opt-in, wins). Schema unchanged; downgrade
changes nothing back (which rows were spelled in Unicode is not kept, and
either spelling is valid data for the older code).
"""

from collections.abc import Callable, Sequence

import idna
import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _domain(value: str) -> str | None:
    domain = value.strip().rstrip(".").lower()
    if not domain or any(c.isspace() or c == "@" for c in domain):
        return None
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError:
            return None
    labels = domain.split(".")
    return domain if len(labels) >= 2 and all(labels) else None


def _address(value: str) -> str | None:
    """``a@b.c`` or ``@b.c``, canonical; None when it cannot be read."""
    text = value.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    local, at, domain = text.rpartition("@")
    canonical = _domain(domain) if at else None
    return None if canonical is None else f"{local.lower()}@{canonical}"


def _consent_domain(value: str) -> str | None:
    return value if value == "*" else _domain(value)


def _rewrite(
    table: sa.TableClause,
    column: str,
    canonical: Callable[[str], str | None],
    scope: str | None = None,
    merge: Callable[[sa.Row[tuple[object, ...]], sa.Row[tuple[object, ...]]], None] | None = None,
) -> None:
    """Respell ``column`` of every row (unique within ``scope`` when given)."""
    conn = op.get_bind()
    value = table.c[column]
    for row in conn.execute(sa.select(table)).all():
        old = row._mapping[column]
        new = canonical(old)
        if new is None or new == old:
            continue
        same = [value == new]
        mine = [value == old]
        if scope is not None:
            same.append(table.c[scope] == row._mapping[scope])
            mine.append(table.c[scope] == row._mapping[scope])
        kept = conn.execute(sa.select(table).where(*same)).first()
        if kept is None:
            conn.execute(sa.update(table).where(*mine).values({column: new}))
            continue
        if merge is not None:
            merge(kept, row)
        conn.execute(sa.delete(table).where(*mine))


def upgrade() -> None:
    suppressions = sa.table("suppressions", sa.column("id"), sa.column("address"))
    consents = sa.table("consents", sa.column("id"), sa.column("address"))
    user_addresses = sa.table(
        "user_addresses", sa.column("id"), sa.column("user_id"), sa.column("address")
    )
    modes = sa.table("consent_modes", sa.column("domain"), sa.column("mode"))

    def stricter(kept: sa.Row[tuple[object, ...]], other: sa.Row[tuple[object, ...]]) -> None:
        if other._mapping["mode"] == "opt-in" and kept._mapping["mode"] != "opt-in":
            op.get_bind().execute(
                sa.update(modes)
                .where(modes.c.domain == kept._mapping["domain"])
                .values(mode="opt-in")
            )

    _rewrite(suppressions, "address", _address)
    _rewrite(consents, "address", _address)
    _rewrite(user_addresses, "address", _address, scope="user_id")
    _rewrite(modes, "domain", _consent_domain, merge=stricter)


def downgrade() -> None:
    pass
