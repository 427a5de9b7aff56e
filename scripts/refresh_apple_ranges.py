"""Rewrite receiver/data/apple_mpp_ranges.txt from Apple's published egress list.

Apple publishes the egress ranges of iCloud Private Relay — the network Mail
Privacy Protection fetches remote content through — as a CSV
(``prefix,country,region,city,``). This script downloads it, merges adjacent
prefixes (the CSV has hundreds of thousands of small ones) and rewrites the
data file with the date and source in its header. Run it from the repository
root on a machine with network access, review the diff, commit:

    python scripts/refresh_apple_ranges.py [--output PATH] [--from-file CSV]

``--from-file`` converts a CSV downloaded by other means. Restart the receiver
afterwards: the ranges are read once per process.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
import urllib.request
from collections.abc import Iterable
from pathlib import Path

SOURCE = "https://mask-api.icloud.com/egress-ip-ranges.csv"
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "receiver" / "data" / "apple_mpp_ranges.txt"
APPLE_OWN = "17.0.0.0/8"  # Apple's own network, not in the CSV


def download(url: str = SOURCE) -> str:
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - fixed https URL
        return str(response.read().decode("utf-8"))


def merge(lines: Iterable[str]) -> list[str]:
    """The first CSV field of every line, merged into as few CIDRs as possible."""
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
        ipaddress.ip_network(APPLE_OWN)
    ]
    for line in lines:
        field = line.split(",")[0].strip()
        if field and not field.startswith("#"):
            networks.append(ipaddress.ip_network(field, strict=False))
    merged: list[str] = []
    for version in (4, 6):
        merged += [
            str(n)
            for n in ipaddress.collapse_addresses(n for n in networks if n.version == version)
        ]
    return merged


def render(cidrs: list[str], source: str) -> str:
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    header = [
        "# Apple egress ranges used by Mail Privacy Protection "
        "(the iCloud Private Relay egress network).",
        f"# source: {source}",
        f"# date: {today}",
        f"# kind: full list, merged into {len(cidrs)} prefixes, plus Apple's own {APPLE_OWN}.",
        "#       Refresh with:  python scripts/refresh_apple_ranges.py",
        "# format: one CIDR per line (a CSV line is also accepted: the first field is used).",
    ]
    return "\n".join(header + cidrs) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--from-file", type=Path, help="a CSV already downloaded")
    args = parser.parse_args(argv)
    if args.from_file:
        text, source = args.from_file.read_text(encoding="utf-8"), SOURCE
    else:
        text, source = download(), SOURCE
    cidrs = merge(text.splitlines())
    if len(cidrs) < 10:
        print(f"refusing to write only {len(cidrs)} prefixes: is the download complete?")
        return 1
    args.output.write_text(render(cidrs, source), encoding="utf-8")
    print(f"wrote {len(cidrs)} prefixes to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
