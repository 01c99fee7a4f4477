"""A non-editable install (a wheel) carries everything a conversion needs, the model-card template included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from test_conversion import TINY, qwen2_base  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import engram_hf
from engram_hf.conversion.card import CARD_TEMPLATE
assert engram_hf.__file__.startswith(sys.argv[1]), engram_hf.__file__  # the wheel's copy, not the checkout
assert CARD_TEMPLATE.is_file(), CARD_TEMPLATE
engram_hf.graft(sys.argv[2], sys.argv[3], verify=False, **eval(sys.argv[4]))
"""


def test_wheel_install_has_card_template(qwen2_base, tmp_path):  # noqa: F811
    source = tmp_path / "source"  # built from a copy: the build leaves nothing in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                                "bench_out", "out"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("engram_hf-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(site), str(qwen2_base), str(out), repr(TINY)],
                          env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = (out / "README.md").read_text()
    template_heading = "## Engram geometry"
    assert template_heading in (ROOT / "hub_cards" / "model_card.md").read_text() and template_heading in card
