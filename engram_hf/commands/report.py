"""The bench commands' JSON report."""

from __future__ import annotations

import json
from pathlib import Path


def print_report(results: dict, out: str | None) -> int:
    """Print a bench's JSON report (and write it to `out` when given); the command's exit code."""
    text = json.dumps(results, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    print(text)
    return 0
