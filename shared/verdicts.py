"""The verdicts a hit can get, and which of them count: said once for every reader.

receiver/classify.py gives each open and click one verdict; everything that
reads verdicts afterwards asks this module what they mean: the figures of the
dashboard and the API (receiver/readmodel/), the live notes (receiver/live.py),
what is notable for webhooks and notification mail (shared/notable.py). It
lives in shared/ because shared/notable.py is one of those readers and may
import neither side.

* ``human`` and ``proxy`` (a mailbox provider's image proxy fetching when the
  person opens) are a person: :data:`COUNTED` in first-open and unique-click
  figures, announced as opens and clicks.
* ``machine`` (privacy prefetch) and ``scanner`` (security gateways, tools)
  fetched without a person: :data:`AUTOMATED`, shown apart, never counted;
  a ``machine`` open is announced as such (:data:`MACHINE_OPENS`).
* ``self`` (the sender) and ``unknown`` are kept on the timeline only; an
  ``unknown`` click is still announced as a click (:data:`NOTIFIED_CLICKS`),
  because a person is its likeliest author and nothing said otherwise.

The sets are tuples, the order of :data:`VERDICTS`, so they go straight into
an SQL ``IN`` and a membership test on two or three items costs as little as
a frozenset's.
"""

from __future__ import annotations

HUMAN = "human"
PROXY = "proxy"
MACHINE = "machine"
SCANNER = "scanner"
SELF = "self"
UNKNOWN = "unknown"

#: Every verdict, in the order the dashboard and the API list them.
VERDICTS = (HUMAN, PROXY, MACHINE, SCANNER, SELF, UNKNOWN)
#: A person opened or clicked: first-open and unique-click figures count only these.
COUNTED = (HUMAN, PROXY)
#: Fetched without a person: shown apart ("automatic opens"), never counted.
AUTOMATED = (MACHINE, SCANNER)
#: Opens announced as machine opens (a scanner's fetch is no open at all).
MACHINE_OPENS = (MACHINE,)
#: Clicks announced to webhooks and notification mail.
NOTIFIED_CLICKS = (HUMAN, PROXY, UNKNOWN)
