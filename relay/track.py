"""The seam to tracking injection: the handler delivers the copies ``prepare`` returns
(one for all recipients, or one per recipient). This minimal version tracks nothing."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from shared.config import Settings
from shared.models import Link, Message


@dataclass(frozen=True)
class Submission:
    message_id: int
    sender: str
    recipients: list[str]
    data: bytes
    auth_user: str
    client_ip: str


@dataclass
class Copy:
    recipients: list[str]
    data: bytes


@dataclass
class Prepared:
    copies: list[Copy]
    message: Message  # row filled, not saved
    links: list[Link]
    tracked_recipients: set[str]


class Tracker:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine

    async def prepare(self, submission: Submission) -> Prepared:
        s, size = submission, len(submission.data)
        message = Message(id=s.message_id, sender=s.sender, auth_user=s.auth_user,
                          client_ip=s.client_ip, size_in=size, size_out=size)  # fmt: skip
        return Prepared([Copy(list(s.recipients), s.data)], message, [], set())
