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

from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

from engram_hf import EngramLlamaModel
from engram_hf.modeling.integration_engram import (
    CACHE_KWARG,
    MIN_TRANSFORMERS,
    NEWEST_TESTED,
    check_cache_argument,
    check_transformers_version,
    pop_cache,
)
from engram_hf.modeling.modeling_engram import EngramDecoderLayerMixin
from tiny_models import tiny_config
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


class _RenamedCacheLayer(LlamaDecoderLayer):
    """A decoder layer as a future release might write it: the cache under yet another name."""

    def forward(self, hidden_states, attention_mask=None, kv_state=None, **kwargs):
        return super().forward(hidden_states, attention_mask=attention_mask, **{CACHE_KWARG: kv_state}, **kwargs)


class _RenamedEngramLayer(EngramDecoderLayerMixin, _RenamedCacheLayer):
    pass


class _RenamedEngramModel(EngramLlamaModel):
    decoder_layer_class = _RenamedEngramLayer


def test_renamed_cache_argument_stops_loading():
    """A base decoder layer that no longer takes the cache under the name we pass: a clear error, not wrong output."""
    check_cache_argument(LlamaModel.forward, LlamaDecoderLayer.forward)
    config = tiny_config("llama")
    EngramLlamaModel(config)  # the real family builds
    with pytest.raises(RuntimeError, match=rf"_RenamedCacheLayer.forward in transformers .* `{CACHE_KWARG}`"):
        _RenamedEngramModel(config)


def test_pop_cache_takes_either_name_and_refuses_two_caches():
    first, second = object(), object()
    for kwargs in ({"cache": first}, {"past_key_values": first}, {"cache": first, "past_key_values": first}):
        assert pop_cache(kwargs) is first and kwargs == {}
    assert pop_cache({"cache": None, "past_key_values": first}) is first
    with pytest.raises(ValueError, match="Two different caches"):
        pop_cache({"cache": first, "past_key_values": second})
