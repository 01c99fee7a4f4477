"""The older transformers releases the suite also runs under, each installed into its own `--target` folder.

`scripts/setup.sh` runs this file to install them; `test_transformers_matrix.py` runs the generation and remote-code
tests again with each one first on `PYTHONPATH`. The newest release is the one the virtual environment resolves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# the lowest supported release (pyproject's lower bound) and the last one before the 5.24 cache rename
VERSIONS = ("5.16.0", "5.23.0")
# what runs again under each of them
SUBSET = ("tests/test_generation.py", "tests/test_remote_code.py")
ROOT = Path(__file__).resolve().parents[1]


def target(version: str) -> Path:
    return ROOT / ".venv" / f"transformers-{version}"


def install(version: str) -> None:
    """transformers `version` with the dependencies it resolves to, into `target(version)` (kept once complete)."""
    folder = target(version)
    if (folder / f"transformers-{version}.dist-info").is_dir():
        return
    partial = folder.with_name(folder.name + ".partial")
    subprocess.run(["rm", "-rf", str(partial)], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(partial),
         f"transformers=={version}"],
        check=True,
    )
    partial.rename(folder)


if __name__ == "__main__":
    for version in VERSIONS:
        install(version)
