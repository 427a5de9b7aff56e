"""Where the suite finds its files, wherever a test module sits in tests/."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
DATA = ROOT / "tests" / "data"
# ../shared/corpus from the repository root; a worktree elsewhere can point
# TRACKRELAY_TEST_CORPUS at it.
CORPUS = Path(os.environ.get("TRACKRELAY_TEST_CORPUS") or ROOT.parent / "shared" / "corpus")


def pinned(package: str) -> str | None:
    """The exact version pyproject.toml pins ``package`` to (``name==X``), or None."""
    import tomllib

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in dependencies:
        name, _, version = dependency.partition("==")
        if name.strip() == package:
            return version.strip()
    return None
