"""Run a script in a fresh Python process where `engram_hf` cannot be imported: only a folder's remote code loads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

_BLOCK_ENGRAM_HF = """\
import sys
sys.modules["engram_hf"] = None  # the package must not be importable: everything comes from the saved code
try:
    import engram_hf  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("engram_hf is importable")
"""


def run_without_engram_hf(script: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run `script` (offline, fresh modules cache under `cwd`) with `args` as `sys.argv[1:]`; fail on a non-zero exit.

    Every warning is shown (`PYTHONWARNINGS=always`), so callers can check the captured stderr for deprecations."""
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(cwd / "modules"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "always",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),  # a transformers version under test stays in place
        **env,
    }
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCK_ENGRAM_HF + textwrap.dedent(script), *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc
