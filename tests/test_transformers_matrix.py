"""Exactness on the older transformers releases we declare: the generation and remote-code tests run again, in a
subprocess, under each release of `transformers_matrix.VERSIONS` (the newest is the environment's own)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.version import Version

from engram_hf.modeling.integration_engram import MIN_TRANSFORMERS, NEWEST_TESTED, check_transformers_version
from transformers_matrix import ROOT, SUBSET, VERSIONS, target


def test_declared_range_is_the_tested_range():
    """pyproject's lower bound is the lowest release tested here, and the remote code's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirement = next(r for r in project["dependencies"] if r.startswith("transformers"))
    assert requirement == f"transformers>={MIN_TRANSFORMERS},<6"
    assert VERSIONS[0] == MIN_TRANSFORMERS
    assert all(Version(version) < Version(NEWEST_TESTED) for version in VERSIONS)


def test_version_gate(caplog):
    """Older than the range: a clear error naming it; newer than the newest tested: one warning naming the range."""
    with pytest.raises(ImportError, match=rf"transformers>={re.escape(MIN_TRANSFORMERS)},<6.*5\.15\.1"):
        check_transformers_version("5.15.1")
    with caplog.at_level("WARNING"):
        check_transformers_version(MIN_TRANSFORMERS)
        check_transformers_version(NEWEST_TESTED)
        assert not caplog.records
        for _ in range(2):
            check_transformers_version("5.99.0")
    assert len(caplog.records) == 1
    assert "5.99.0 is newer" in caplog.text and f"{MIN_TRANSFORMERS} to {NEWEST_TESTED}" in caplog.text


@pytest.mark.parametrize("version", VERSIONS)
def test_generation_and_remote_code_under(version):
    folder = target(version)
    assert folder.is_dir(), f"transformers {version} is not installed at {folder}: run scripts/setup.sh"
    env = {**os.environ, "PYTHONPATH": str(folder), "ENGRAM_HF_EXPECT_TRANSFORMERS": version}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and " passed" in summary and "skipped" not in summary, (
        f"under transformers {version}: {summary}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    )
