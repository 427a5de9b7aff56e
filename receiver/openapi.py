"""The OpenAPI 3.1 document of the JSON API (receiver/api/).

Written by hand, next to the routes it describes, and held to them by a test:
every route is documented, every documented operation exists, and sample
responses validate against these schemas (JSON Schema 2020-12, as OpenAPI 3.1
uses it).
"""

from __future__ import annotations

from typing import Any

from shared.policies import MAX_RECIPIENT_CAP, MODES
from shared.verdicts import VERDICTS

_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_INT = {"type": "integer"}
_TIME = {"type": "string", "format": "date-time"}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_ID = {"type": "string", "pattern": "^[0-9]+$", "description": "63-bit id, as a string"}


def _obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _list(key: str, item: str, **extra: Any) -> dict[str, Any]:
    return _obj({key: {"type": "array", "items": _ref(item)}, **extra})


_MESSAGE = {
    "id": _ID,
    "created_at": _TIME,
    "sender": _STR,
    "from": _STR,
    "subject": _STR,
    "message_id_header": _STR,
    "status": {"enum": ["sent", "partial", "failed"]},
    "track_opens": _BOOL,
    "track_clicks": _BOOL,
    "per_recipient": _BOOL,
    "listener": {
        **_STR,
        "description": "the listener it came through: submission, implicit_tls, plain, gateway"
        " ('' for mail relayed before this was recorded)",
    },
    "opens": {
        **_INT,
        "description": "opens judged human or proxy (machine opens and scanners are not opens)",
    },
    "clicks": {
        **_INT,
        "description": "clicks judged human or proxy (scanners and the sender are not clicks)",
    },
    "first_opened_at": _TIME_OR_NULL,
    "first_clicked_at": _TIME_OR_NULL,
    "replies": {
        **_INT,
        "description": "recipients who replied (an automatic reply is never a reply)",
    },
    "first_replied_at": _TIME_OR_NULL,
    "auto_replies": {
        **_INT,
        "description": "recipients who answered automatically",
    },
    "bounces": {**_INT, "description": "recipients whose mail bounced, hard or soft"},
    "bounce_type": {"enum": ["", "hard", "soft"], "description": "hard if any bounce was"},
    "complaints": {**_INT, "description": "recipients who reported it as spam (ARF)"},
}

SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _STR}),
    "Message": _obj({**_MESSAGE, "recipients": {"type": "array", "items": _STR}}),
    "MessageList": _list(
        "messages",
        "Message",
        total={**_INT, "description": "matches, exact up to 10,000 (see total_capped)"},
        total_capped={**_BOOL, "description": "true: more than 10,000 match; total is 10,000"},
        limit=_INT,
        offset=_INT,
        next_cursor={
            "type": ["string", "null"],
            "description": "pass as cursor= for the next (older) page; null on the last",
        },
    ),
    "Recipient": _obj(
        {
            "position": _INT,
            "address": _STR,
            "tracked": _BOOL,
            "status": _STR,
            "reply_code": _INT,
            "reply_text": _STR,
            "first_opened_at": _TIME_OR_NULL,
            "clicks": _INT,
            "replied_at": {**_TIME_OR_NULL, "description": "the first reply from this address"},
            "auto_replied_at": {**_TIME_OR_NULL, "description": "the first out-of-office etc."},
            "bounced_at": _TIME_OR_NULL,
            "complained_at": {**_TIME_OR_NULL, "description": "the first spam report (ARF)"},
            "bounce_type": {"enum": ["", "hard", "soft"], "description": "hard wins over soft"},
        }
    ),
    "Link": _obj({"position": _INT, "url": _STR, "clicks": _INT}),
    "Event": _obj(
        {
            "id": _INT,
            "message_id": _ID,
            "kind": {
                "enum": ["open", "click", "reply", "auto_reply", "bounce", "complaint"],
                "description": "answers (reply ... complaint) come from the intake listener",
            },
            "recipient_position": {
                **_INT,
                "description": "0: a message-level token, or an answer from an address that"
                " is no recipient (a reply from someone else; the address is not stored)",
            },
            "link_position": {**_INT, "description": "0 for opens"},
            "occurred_at": _TIME,
            "verdict": {"enum": list(VERDICTS)},
            "reasons": {"type": "array", "items": _STR},
            "ip": {**_STR, "description": "truncated to /24 or /48 unless configured"},
            "user_agent": _STR,
            "bounce_type": {"enum": ["hard", "soft"], "description": "bounces only"},
            "status": {**_STR, "description": "bounces only: 5.1.1, or the SMTP code"},
            "diagnostic": {**_STR, "description": "bounces only: the remote server's words"},
        },
        required=[
            "id",
            "message_id",
            "kind",
            "recipient_position",
            "link_position",
            "occurred_at",
            "verdict",
            "reasons",
            "ip",
            "user_agent",
        ],
    ),
    "MessageDetail": _obj(
        {
            **_MESSAGE,
            "recipients": {"type": "array", "items": _ref("Recipient")},
            "links": {"type": "array", "items": _ref("Link")},
            "events": {
                "type": "array",
                "items": _ref("Event"),
                "description": "a page of the message's events, latest first",
            },
            "event_count": {**_INT, "description": "all the message's events"},
            "events_next": {
                "type": ["string", "null"],
                "description": "pass as events_before= for the next (older) page; null: no more",
            },
        }
    ),
    "EventList": _list("events", "Event", next_after={**_INT, "description": "pass as after="}),
    "Policy": _obj(
        {
            "id": _INT,
            "pattern": _STR,
            "mode": {"enum": list(MODES)},
            "allow_opens": _BOOL,
            "allow_clicks": _BOOL,
            "allow_text_links": _BOOL,
            "per_recipient": _BOOL,
            "recipient_cap": _INT,
            "notify": _BOOL,
            "updated_at": _TIME,
        }
    ),
    "PolicyInput": _obj(
        {
            "pattern": {**_STR, "description": "a@b.c, @b.c or *"},
            "mode": {"enum": list(MODES)},
            "allow_opens": _BOOL,
            "allow_clicks": _BOOL,
            "allow_text_links": _BOOL,
            "per_recipient": _BOOL,
            "recipient_cap": {**_INT, "minimum": 1, "maximum": MAX_RECIPIENT_CAP},
            "notify": _BOOL,
        },
        required=["pattern"],
    ),
    "PolicyList": _list("policies", "Policy"),
    "Suppression": _obj({"address": _STR, "source": _STR, "created_at": _TIME}),
    "SuppressionList": _list("suppressions", "Suppression"),
    "AddressInput": _obj({"address": _STR}),
    "Consent": _obj({"address": _STR, "source": _STR, "created_at": _TIME}),
    "ConsentInput": _obj({"address": _STR, "source": _STR}, required=["address"]),
    "ConsentMode": _obj(
        {
            "domain": {**_STR, "description": "a domain, or * for the default"},
            "mode": {"enum": ["opt-out", "opt-in"]},
        }
    ),
    "ConsentList": _list(
        "consents", "Consent", modes={"type": "array", "items": _ref("ConsentMode")}
    ),
}


def _json(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ref(name)}}}


def _ok(name: str, description: str = "OK", code: str = "200") -> dict[str, Any]:
    return {code: {"description": description, **_json(name)}}


_ERRORS = {
    "400": {"description": "bad parameter or body", **_json("Error")},
    "401": {"description": "missing, unknown or revoked token", **_json("Error")},
}
_ADMIN = {**_ERRORS, "403": {"description": "needs an admin token", **_json("Error")}}
_NOT_FOUND = {"404": {"description": "not found (or not yours)", **_json("Error")}}
_NO_CONTENT = {"204": {"description": "done"}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _path(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": responses, **extra}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, **_json(name)}


_FLAG = {"type": "boolean"}

PATHS: dict[str, Any] = {
    "/openapi.json": {
        "get": _op("This document", {"200": {"description": "OpenAPI 3.1"}}, security=[])
    },
    "/messages": {
        "get": _op(
            "Messages, newest first (senders see only their own)",
            {**_ok("MessageList"), **_ERRORS},
            parameters=[
                _query("tracked", _FLAG, "tracking was on for opens or clicks"),
                _query("opened", _FLAG, "has a counted open; false: tracked for opens, none yet"),
                _query("clicked", _FLAG, "has a counted click; false: tracked for clicks, none"),
                _query(
                    "replied",
                    _FLAG,
                    "a recipient replied; false: no reply (auto-replies never count as replies)",
                ),
                _query("bounced", _FLAG, "a recipient bounced (hard or soft); false: none did"),
                _query(
                    "follow_up_days",
                    {"type": "integer", "minimum": 1, "maximum": 90},
                    "the follow-up list: opened, no reply, sent more than this many days ago",
                ),
                _query("sender", _STR, "envelope sender, exact"),
                _query("since", _STR, "date (YYYY-MM-DD) or ISO 8601 time, inclusive"),
                _query("until", _STR, "date (whole day) or ISO 8601 time, inclusive"),
                _query("q", _STR, "text in the subject or a recipient address (% and _ literal)"),
                _query(
                    "limit", {"type": "integer", "minimum": 1, "maximum": 200}, "page size (50)"
                ),
                _query("cursor", _STR, "next_cursor of the previous page (keyset paging)"),
                {
                    **_query(
                        "offset",
                        {"type": "integer", "minimum": 0},
                        "rows to skip; deprecated (slow on deep pages): use cursor",
                    ),
                    "deprecated": True,
                },
            ],
        )
    },
    "/messages/{message_id}": {
        "get": _op(
            "One message with recipients, links and a page of its events",
            {**_ok("MessageDetail"), **_ERRORS, **_NOT_FOUND},
            parameters=[
                _path("message_id", _ID),
                _query("events_before", _STR, "events_next of the previous page"),
            ],
        )
    },
    "/events": {
        "get": _op(
            "Events after a cursor, oldest first",
            {**_ok("EventList"), **_ERRORS},
            parameters=[
                _query("after", {"type": "integer", "minimum": 0}, "last event id seen (0)"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "(100)"),
            ],
        )
    },
    "/policies": {
        "get": _op("Per-sender policies (admin)", {**_ok("PolicyList"), **_ADMIN}),
        "put": _op(
            "Create or replace the policy of a pattern (admin)",
            {**_ok("Policy"), **_ADMIN},
            requestBody=_body("PolicyInput"),
        ),
    },
    "/policies/{policy_id}": {
        "delete": _op(
            "Remove a policy (admin)",
            {**_NO_CONTENT, **_ADMIN, **_NOT_FOUND},
            parameters=[_path("policy_id", _INT)],
        )
    },
    "/suppressions": {
        "get": _op("Recipients never tracked (admin)", {**_ok("SuppressionList"), **_ADMIN}),
        "post": _op(
            "Stop tracking a recipient (admin)",
            {**_ok("Suppression", "suppressed", "201"), **_ADMIN},
            requestBody=_body("AddressInput"),
        ),
    },
    "/suppressions/{address}": {
        "delete": _op(
            "Track a recipient again (admin)",
            {**_NO_CONTENT, **_ADMIN, **_NOT_FOUND},
            parameters=[_path("address", _STR)],
        )
    },
    "/consents": {
        "get": _op("Consents and consent modes (admin)", {**_ok("ConsentList"), **_ADMIN}),
        "post": _op(
            "Record a consent (admin)",
            {**_ok("Consent", "recorded", "201"), **_ADMIN},
            requestBody=_body("ConsentInput"),
        ),
    },
    "/consents/{address}": {
        "delete": _op(
            "Withdraw a consent (admin)",
            {**_NO_CONTENT, **_ADMIN, **_NOT_FOUND},
            parameters=[_path("address", _STR)],
        )
    },
    "/consent-modes": {
        "put": _op(
            "Set opt-in or opt-out for a recipient domain or * (admin)",
            {**_ok("ConsentMode"), **_ADMIN},
            requestBody=_body("ConsentMode"),
        )
    },
}


def document(server_url: str = "/api/v1") -> dict[str, Any]:
    """The whole document; ``server_url`` is where the API is mounted."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "trackrelay API",
            "version": "1",
            "description": (
                "Messages, open and click events, policies, suppression and consent. "
                "Authenticate with 'Authorization: Bearer <token>' (trackrelay token create). "
                'Errors are {"error": message}.'
            ),
        },
        "servers": [{"url": server_url}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
        },
        "paths": PATHS,
    }
