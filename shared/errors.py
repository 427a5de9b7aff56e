"""The error every operation in shared/ raises when people asked for something
that cannot be done (policies, consent, users, webhooks, addresses)."""

from __future__ import annotations


class UserError(ValueError):
    """An operation that cannot be done; the message is for people.

    The base of every such error in shared/ (policies, consent, webhooks), so
    the CLI, the API and the dashboard show them alike. ``field`` names the
    input the message is about ('' for the request as a whole), so a form can
    show it next to that input.
    """

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field
