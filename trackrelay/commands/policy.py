"""``trackrelay policy``: per-sender tracking policies (kept by shared/policies.py).

The flags are named after the policy's fields (``--opens`` sets
``allow_opens``), so the parsed arguments go to ``set_policy`` through
``policies.policy_values`` as the dashboard's form does; a flag left out keeps
the stored value.
"""

from __future__ import annotations

import argparse

from shared import policies
from shared.config import Settings
from shared.models import Policy
from trackrelay.commands import Commands, command, group
from trackrelay.commands.tables import listing, removal
from trackrelay.database import database

_FLAGS = (
    ("opens", "allow_opens", "may track opens"),
    ("clicks", "allow_clicks", "may track clicks"),
    ("text-links", "allow_text_links", "may rewrite links in text/plain parts"),
    ("per-recipient", "per_recipient", "one copy per recipient (who opened, not just whether)"),
    ("notify", "notify", "notify the sender of opens and clicks"),
)


def register(commands: Commands) -> None:
    policy = group(commands, "policy", "per-sender tracking policies")
    p = command(policy, "set", policy_set, "create or change the policy of a sender, @domain or *")
    p.add_argument("pattern", help="a@b.c, @b.c or '*'")
    p.add_argument("--mode", choices=policies.MODES, help="header: track when asked (default)")
    for flag, field, what in _FLAGS:
        p.add_argument(f"--{flag}", dest=field, action=argparse.BooleanOptionalAction, help=what)
    p.add_argument(
        "--cap",
        dest="recipient_cap",
        type=int,
        metavar="N",
        help="per-recipient copies up to N recipients",
    )
    rows = listing(policies.list_policies, _line)
    command(policy, "list", rows, "list policies, most specific first")
    remove = removal(policies.remove_policy, "pattern", "removed the policy for {}")
    command(policy, "remove", remove, "remove a policy").add_argument("pattern")


def policy_set(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings) as engine:
        policy = policies.set_policy(engine, args.pattern, **policies.policy_values(args))
    print(_line(policy))
    return 0


def _line(policy: Policy) -> str:
    return f"{policy.pattern}\t{policies.describe(policy)}"
