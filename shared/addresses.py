"""One spelling of a mail address or domain, wherever one is stored or looked up.

Suppressions, consents and consent domains, sender policies, users' addresses
and erasure are all compared with what the relay sees in MAIL FROM, RCPT TO and
headers. They must agree on one spelling, or a stored row never matches:

* the domain in its IDNA ASCII form, by UTS 46 (the ``idna`` package):
  ``Bücher.example`` and ``xn--bcher-kva.example`` are one domain. Python's
  own ``idna`` codec is IDNA 2003 and turns ``straße`` into ``strasse``, a
  different domain;
* the local part lower-cased. RFC 5321 lets a server tell ``Bob`` from
  ``bob``, but none we deliver to does, and a suppression or an erasure that
  misses ``Bob@`` for ``bob@`` fails the person who asked for it;
* spaces around, ``<...>`` and a final dot of the domain dropped.

:func:`normalize_address`, :func:`normalize_sender` and :func:`normalize_domain`
check what people type and raise :class:`UserError` with a message for them;
:func:`address_key` never raises, for matching what arrives in mail.
:func:`spellings` gives both forms of a canonical address, for columns that
keep what the mail said (a recipient as written in RCPT TO).
"""

from __future__ import annotations

import idna

from shared.errors import UserError

_NOT_IN_LOCAL = frozenset(' <>,;"@')


def normalize_domain(domain: str, *, field: str = "domain") -> str:
    """``Bücher.Example.`` -> ``xn--bcher-kva.example``; UserError if not a domain."""
    value = domain.strip().rstrip(".").lower()
    if not value or any(c.isspace() or c == "@" for c in value):
        raise UserError(f"{domain!r} is not a domain name (like example.com)", field)
    if not value.isascii():
        try:
            value = idna.encode(value, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise UserError(f"{domain!r} is not a valid domain name ({exc})", field) from None
    labels = value.split(".")
    if len(labels) < 2 or not all(labels):
        raise UserError(f"{domain!r} is not a domain name (like example.com)", field)
    return value


def normalize_address(address: str, *, field: str = "address") -> str:
    """One mail address in its canonical form; UserError if it is not one."""
    value = address.strip()
    if not value:
        raise UserError("enter an email address (like ann@example.com)", field)
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    local, at, domain = value.rpartition("@")
    if at and not local and domain:
        raise UserError(
            f"give one email address at a time, not a whole domain ({address!r})", field
        )
    if not at or not local or any(c in _NOT_IN_LOCAL or c.isspace() for c in local):
        raise UserError(f"{address!r} is not an email address (like ann@example.com)", field)
    try:
        return f"{local.lower()}@{normalize_domain(domain, field=field)}"
    except UserError as exc:
        raise UserError(f"{address!r}: {exc}", field) from None


def normalize_sender(value: str, *, field: str = "address") -> str:
    """An address or a whole ``@domain`` (what a user may send as), canonical."""
    text = value.strip()
    if text.startswith("@"):
        return "@" + normalize_domain(text[1:], field=field)
    return normalize_address(text, field=field)


def address_key(address: str) -> str:
    """The canonical form of an address from mail, for lookups; never raises
    (what cannot be parsed is only lower-cased: it then matches nothing stored)."""
    try:
        return normalize_address(address)
    except UserError:
        return address.strip().lower()


def domain_of(address: str) -> str:
    """The canonical domain of an address from mail ('' without one)."""
    key = address_key(address)
    return key.rpartition("@")[2] if "@" in key else ""


def spellings(address: str) -> list[str]:
    """A canonical address (or ``@domain``) as the mail may have written it:
    itself and, for an IDN domain, its Unicode form."""
    local, at, domain = address.rpartition("@")
    try:
        unicode = idna.decode(domain)
    except (idna.IDNAError, UnicodeError):
        return [address]
    return list(dict.fromkeys([address, f"{local}{at}{unicode}"]))
