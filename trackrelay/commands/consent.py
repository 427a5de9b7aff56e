"""``trackrelay consent``: tracking consent and the opt-in/opt-out modes (shared/consent.py)."""

from __future__ import annotations

import argparse

from shared import consent
from shared.config import Settings
from trackrelay.commands import CommandError, Commands, command, group
from trackrelay.database import database


def register(commands: Commands) -> None:
    consents = group(commands, "consent", "tracking consent (opt-in mode)", "tracking consent")
    p = command(consents, "add", consent_add, "record a recipient's consent")
    p.add_argument("address")
    p.add_argument("--source", default="cli", help="where the consent came from")
    p = command(consents, "remove", consent_remove, "withdraw a consent")
    p.add_argument("address")
    command(consents, "list", consent_list, "list consents and modes")
    p = command(consents, "mode", consent_mode, "show or set the mode (globally or per domain)")
    p.add_argument("mode", nargs="?", choices=["opt-in", "opt-out", "default"])
    p.add_argument("--domain", default="*", help="a recipient domain (default: all)")


def consent_add(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings) as engine:
        added = consent.add_consent(engine, args.address, args.source)
    print(f"consent {'recorded' if added else 'was already recorded'} for {args.address}")
    return 0


def consent_remove(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings) as engine:
        if not consent.remove_consent(engine, args.address):
            raise CommandError(f"no consent recorded for {args.address}")
    print(f"consent withdrawn for {args.address}")
    return 0


def consent_list(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings) as engine:
        modes, consents = consent.list_modes(engine), consent.list_consents(engine)
    for domain, mode in sorted(modes.items()):
        print(f"mode\t{domain}\t{mode}")
    for c in consents:
        print(f"consent\t{c.address}\t{c.source}\t{c.created_at:%Y-%m-%d}")
    return 0


def consent_mode(settings: Settings, args: argparse.Namespace) -> int:
    """Without a mode: show it; ``default``: a domain follows the global mode,
    and the global mode goes back to opt-out."""
    with database(settings) as engine:
        if args.mode is None:
            _show_modes(consent.list_modes(engine), args.domain)
        elif args.mode == "default":
            if args.domain == "*":
                consent.set_mode(engine, "opt-out")
            else:
                consent.clear_mode(engine, args.domain)
            print(f"{args.domain} now follows the default")
        else:
            consent.set_mode(engine, args.mode, args.domain)
            print(f"consent mode for {args.domain} is now {args.mode}")
    return 0


def _show_modes(modes: dict[str, str], domain: str) -> None:
    if domain == "*":
        for name, mode in sorted(modes.items()):
            print(f"{name}\t{mode}")
        return
    name = consent.normalize_domain(domain)
    print(f"{name}\t{consent.mode_for(modes, 'x@' + name)}")
