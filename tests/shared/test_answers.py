"""The classifier (shared/answers.py) on real delivery and complaint reports and on
replies and out-of-office answers in the formats real clients write.

``tests/data/answers/corpus/`` holds every delivery, disposition and complaint
report of ../shared/corpus (verbatim, SOURCES.md there); the table below is
the verdict for each, so a rule that changes its mind fails here.
"""

from __future__ import annotations

import email
import email.policy

import pytest

from shared.answers import KINDS, RULES, Finding, classify
from tests.support.paths import CORPUS, DATA

HERE = DATA / "answers"
COPIES = HERE / "corpus"

# (kind, reason, recipient, bounce_type, status) per finding, for every report file.
V = tuple[str, str, str, str, str]


def hard(reason: str, recipient: str, status: str) -> V:
    return ("bounce", reason, recipient, "hard", status)


def soft(reason: str, recipient: str, status: str) -> V:
    return ("bounce", reason, recipient, "soft", status)


CORPUS_VERDICTS: dict[str, list[V]] = {
    "enmime/dsn__testdata__delayed_dsn.raw.eml": [
        soft("dsn-delayed", "thomas@de-montfort.ac.uk", "4.0.0")
    ],
    "enmime/dsn__testdata__dsn_with_multipart_alternative.raw.eml": [
        hard("dsn-failed-permanent", "non-existing@example.com", "5.1.10")
    ],
    "enmime/dsn__testdata__multi_recipient_dsn.raw.eml": [
        hard("dsn-failed-permanent", "arathib@vnet.ibm.com", "5.0.0"),
        soft("dsn-delayed", "johnh@hpnjld.njd.hp.com", "4.0.0"),
        hard("dsn-failed-permanent", "wsnell@sdcc13.ucsd.edu", "5.0.0"),
    ],
    "enmime/dsn__testdata__simple_dsn.raw.eml": [
        soft("dsn-failed-transient", "louisl@larry.slip.umd.edu", "4.0.0")
    ],
    "enmime/dsn__testdata__simple_dsn_with_html.raw.eml": [
        soft("dsn-failed-transient", "louisl@larry.slip.umd.edu", "4.0.0")
    ],
    # A report without a boundary: nothing readable, and no wording we know.
    "enmime/testdata__mail__multipart-wo-boundary.raw.eml": [],
    "mikel-mail/mime_emails__raw_email_with_mimepart_without_content_type.eml": [
        soft("dsn-delayed", "larose.julie@courrier.uqam.ca", "4.5.0")
    ],
    "mikel-mail/multipart_report_emails__multi_address_bounce1.eml": [
        hard("dsn-failed-permanent", f"{local}@gmail.com", "5.1.1")
        for local in (
            "bbbbvhvbbvkjbhfbvbvjhb",
            "bscdbcjhasbcjhbdscbhbsdhcbj",
            "egyfefsdvsfvvhjsd",
            "kfhejkfbsjkjsbhds",
            "qfvhgsvhgsduiohncdhcvhsdfvsfygusd",
        )
    ],
    "mikel-mail/multipart_report_emails__multipart_report_multiple_status.eml": [
        hard("dsn-failed-permanent", "u@ci.com", "5.3.0")
    ],
    "mikel-mail/multipart_report_emails__report_422.eml": [
        soft("dsn-delayed", "fraser@oooooooo.com.au", "4.2.2")
    ],
    "mikel-mail/multipart_report_emails__report_530.eml": [
        hard("dsn-failed-permanent", "edwin@zzzzzzz.com", "5.3.0")
    ],
    # Postfix behind Proofpoint: the per-recipient fields base64-encoded in the report.
    "mimekit/messages__bounce.eml": [
        hard("dsn-failed-permanent", "netec.test@netecgc.com", "5.1.1")
    ],
    "mimekit/messages__delivery-status-multiple-blank-lines.eml": [
        hard("dsn-status-permanent", "orig_recip@customer.com", "5.5.0")
    ],
    "mimekit/messages__delivery-status-no-blank-line.eml": [
        hard("dsn-failed-permanent", "newsletter-request@imusic.com", "")
    ],
    # Every letter replaced by x: no address, no action left to read.
    "mimekit/messages__delivery-status.anonymized.eml": [],
    "mimekit/messages__delivery-status.eml": [
        hard("dsn-failed-permanent", "newsletter-request@imusic.com", "")
    ],
    "mimekit/messages__delivery-status2.eml": [
        hard("dsn-failed-permanent", "source@domain.com", "5.0.0")
    ],
    # Read receipts say nothing about delivery.
    "mimekit/messages__disposition-notification.anonymized.eml": [],
    "mimekit/messages__disposition-notification.eml": [],
    "nodemailer-mailparser/test__fixtures__delivery-status.eml": [
        hard("dsn-failed-permanent", "xxxx@xxxx.com", "5.1.1")
    ],
    # Truncated after the first part's text: no report part to read.
    "php-mime-mail-parser/failure.eml": [],
    "postal-mime/arf.eml": [("complaint", "arf", "user@example.com", "", "")],
    "postal-mime/bounce.eml": [
        hard("dsn-failed-permanent", "htfgvhyufthdgcvhgjyfthgc@ethereal.email", "5.0.0")
    ],
}


def verdicts(findings: list[Finding]) -> list[V]:
    return [(f.kind, f.reason, f.recipient, f.bounce_type, f.status) for f in findings]


@pytest.mark.parametrize("name", sorted(CORPUS_VERDICTS))
def test_every_corpus_report_gets_its_verdict(name: str) -> None:
    findings = classify((COPIES / name).read_bytes())
    assert verdicts(findings) == CORPUS_VERDICTS[name]
    for f in findings:
        assert f.kind in KINDS
        assert f.reason in RULES


def test_the_table_names_every_report_in_the_corpus() -> None:
    """Every report of ../shared/corpus is copied here and has its line in the table."""
    copies = {str(p.relative_to(COPIES)) for p in COPIES.rglob("*.eml")}
    assert copies == set(CORPUS_VERDICTS)
    if not (CORPUS / "eml").is_dir():
        pytest.skip("../shared/corpus is not next to this checkout")
    reports = {
        str(p.relative_to(CORPUS / "eml"))
        for p in (CORPUS / "eml").rglob("*.eml")
        if b"multipart/report" in p.read_bytes().lower()
    }
    assert reports <= copies
    for name in copies:
        assert (COPIES / name).read_bytes() == (CORPUS / "eml" / name).read_bytes()


def test_a_bounce_names_the_returned_message_and_the_server_words() -> None:
    [f] = classify((COPIES / "mimekit/messages__bounce.eml").read_bytes())
    assert f.message_ids == (
        "<44565655.JitbitHelpdesk.13439.691a0afc-a0a0-457c-8208-f20b7c4a4cb1@jitbit.com>",
    )
    assert f.diagnostic == (
        "550 5.1.1 <netec.test@netecgc.com>: Recipient address rejected: User unknown"
    )


def test_a_report_with_text_rfc822_headers_names_the_original_message_id() -> None:
    [f] = classify((HERE / "postfix_plain_bounce.eml").read_bytes())
    assert f.message_ids == ("<invoice-1234@sender.example>",)


# (file, kind, reason, recipient, bounce_type, status, first original Message-ID)
FIXTURES = [
    ("exchange2003_ndr.eml", "bounce", "ndr-exchange", "jane.doe@corp.example", "hard", "5.1.1",
     "<quarterly-2026-03@sender.example>"),
    ("outlook_ndr.eml", "bounce", "ndr-exchange", "bob.smith@customer.example", "hard", "5.1.1",
     "<proposal-march@sender.example>"),
    ("qmail_bounce.eml", "bounce", "ndr-qmail", "carl@example.net", "hard", "5.1.1",
     "<meeting-friday@sender.example>"),
    ("postfix_plain_bounce.eml", "bounce", "ndr-postfix", "carol@example.org", "soft", "4.2.2",
     "<invoice-1234@sender.example>"),
    ("gmail_bounce.eml", "bounce", "ndr-gmail", "dave@example.com", "hard", "5.1.1",
     "<CAF3kZ0b8nq=Xy5gq7Vd0pP9bXw@mail.gmail.com>"),
    ("gmail_delayed.eml", "bounce", "ndr-gmail-delayed", "erin@slow.example", "soft", "",
     "<CAF3kZ0c9@mail.gmail.com>"),
    ("exim_bounce.eml", "bounce", "ndr-exim", "frank@example.com", "hard", "5.1.1",
     "<hello-frank@sender.example>"),
    ("thunderbird_reply.eml", "reply", "in-reply-to", "grace@customer.example", "", "",
     "<proposal-march@sender.example>"),
    ("outlook_reply.eml", "reply", "in-reply-to", "heidi.klum@customer.example", "", "",
     "<proposal-march@sender.example>"),
    ("gmail_reply.eml", "reply", "in-reply-to", "ivan.petrov@gmail.com", "", "",
     "<proposal-march@sender.example>"),
    ("outlook_ooo.eml", "auto_reply", "auto-submitted", "heidi.klum@customer.example", "", "",
     "<proposal-march@sender.example>"),
    ("gmail_vacation.eml", "auto_reply", "auto-submitted", "ivan.petrov@gmail.com", "", "",
     "<proposal-march@sender.example>"),
    ("notes_abwesenheit.eml", "auto_reply", "out-of-office-subject", "klaus.meier@kunde.example",
     "", "", "<proposal-march@sender.example>"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "kind", "reason", "recipient", "type_", "status", "first"), FIXTURES
)
def test_client_and_mta_formats(
    name: str, kind: str, reason: str, recipient: str, type_: str, status: str, first: str
) -> None:
    [f] = classify((HERE / name).read_bytes())
    assert (f.kind, f.reason, f.recipient, f.bounce_type, f.status) == (
        kind, reason, recipient, type_, status
    )  # fmt: skip
    assert f.message_ids[0] == first


def test_a_gmail_reply_lists_the_parent_first_then_references_newest_first() -> None:
    [f] = classify((HERE / "gmail_reply.eml").read_bytes())
    assert f.message_ids == ("<proposal-march@sender.example>", "<older-thread@sender.example>")


def test_a_parsed_message_gets_the_same_findings_as_its_bytes() -> None:
    data = (HERE / "outlook_ndr.eml").read_bytes()
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    assert classify(parsed) == classify(data)


def answer(subject: str, extra: str = "") -> bytes:
    return (
        f"From: Someone <someone@customer.example>\r\nTo: alice@sender.example\r\n"
        f"Subject: {subject}\r\nIn-Reply-To: <sent-1@sender.example>\r\n{extra}\r\nHi\r\n"
    ).encode()


@pytest.mark.parametrize(
    "subject",
    [
        "Out of Office: Proposal",
        "Automatic reply: Proposal",
        "AutoReply: Proposal",
        "Abwesend: Angebot",
        "Abwesenheitsnotiz: Angebot",
        "Automatische Antwort: Angebot",
        "Absence: Proposition",
        "Réponse automatique : Proposition",
        "=?utf-8?q?R=C3=A9ponse_automatique_=3A_Proposition?=",
        "Fuera de la oficina: Propuesta",
        "Respuesta automática: Propuesta",
        "Risposta automatica: Proposta",
        "Fuori sede: Proposta",
        "Automatisch antwoord: Voorstel",
        "Afwezig: Voorstel",
        "Resposta automática: Proposta",
        "Fora do escritório: Proposta",
    ],
)
def test_out_of_office_subjects_are_auto_replies_never_replies(subject: str) -> None:
    [f] = classify(answer(subject))
    assert (f.kind, f.reason) == ("auto_reply", "out-of-office-subject")


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ("Auto-Submitted: auto-replied\r\n", "auto-submitted"),
        ("X-Autoreply: yes\r\n", "x-autoreply"),
        ("X-Autorespond: yes\r\n", "x-autorespond"),
        ("Precedence: auto_reply\r\n", "precedence"),
        ("Precedence: bulk\r\n", "precedence"),
        ("Precedence: junk\r\n", "precedence"),
    ],
)
def test_auto_reply_headers(extra: str, reason: str) -> None:
    [f] = classify(answer("Re: Proposal", extra))
    assert (f.kind, f.reason) == ("auto_reply", reason)


@pytest.mark.parametrize(
    "subject", ["Re: Proposal", "Re: absence policy for March", "Re: the away team"]
)
def test_a_person_writing_about_absence_is_a_reply(subject: str) -> None:
    [f] = classify(answer(subject, "Auto-Submitted: no\r\n"))
    assert (f.kind, f.reason, f.recipient) == ("reply", "in-reply-to", "someone@customer.example")


def test_references_alone_make_a_reply() -> None:
    data = b"From: a@b.example\r\nReferences: <one@s.example> <two@s.example>\r\n\r\nx"
    [f] = classify(data)
    assert (f.kind, f.reason, f.message_ids) == (
        "reply", "references", ("<two@s.example>", "<one@s.example>")
    )  # fmt: skip


def test_a_message_that_answers_nothing_finds_nothing() -> None:
    assert classify(b"From: a@b.example\r\nSubject: Hello\r\n\r\nNew thread") == []
    assert classify(b"") == []


def test_a_report_without_action_and_a_4xx_status_is_soft() -> None:
    data = (
        b"From: MAILER-DAEMON@mx.example\r\nSubject: Delayed\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nLater.\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example\r\n"
        b"\r\nFinal-Recipient: rfc822; <Kim@Example.COM>\r\nStatus: 4.4.7\r\n\r\n--b--\r\n"
    )
    assert verdicts(classify(data)) == [soft("dsn-status-transient", "kim@example.com", "4.4.7")]


def test_every_rule_is_tested() -> None:
    fired = {reason for row in CORPUS_VERDICTS.values() for _, reason, *_ in row}
    fired |= {row[2] for row in FIXTURES}
    fired |= {"x-autoreply", "x-autorespond", "precedence", "references", "dsn-status-transient"}
    assert set(RULES) == fired
