"""Conversion output is guarded: nothing at OUT is lost to a race, a second conversion, a wrong `--overwrite`, or a
killed run; killed runs' leftovers are reported and removable."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import engram_hf
from engram_hf.cli import main
from engram_hf.conversion import graft as graft_module
from engram_hf.conversion.output import RUN_MARKER, GuardedOutput, stale_temporaries
from test_conversion import TINY, _leftovers, qwen2_base  # noqa: F401 (a fixture)


def _engram_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"engram_layer_ids": [1]}))
    return path


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_folder_created_during_conversion_survives(qwen2_base, tmp_path, monkeypatch):
    out = tmp_path / "out"
    render = graft_module.render_card

    def render_and_race(*args, **kwargs):  # someone creates OUT while the conversion runs
        out.mkdir()
        (out / "theirs.txt").write_text("keep me")
        return render(*args, **kwargs)

    monkeypatch.setattr(graft_module, "render_card", render_and_race)
    with pytest.raises(FileExistsError, match="created while the conversion ran"):
        engram_hf.graft(qwen2_base, out, verify=False, **TINY)
    assert (out / "theirs.txt").read_text() == "keep me"
    assert _leftovers(out) == [out.name]


def test_second_conversion_into_the_same_output_is_refused(tmp_path):
    out = tmp_path / "out"
    with GuardedOutput(out) as tmp:
        (tmp / "config.json").write_text("{}")
        with pytest.raises(FileExistsError, match="Another conversion is writing"):
            with GuardedOutput(out):
                pass
    assert not out.exists() and _leftovers(out) == []  # left without commit: nothing written, lock gone


@pytest.mark.parametrize("where", ["base", "parent_of_base", "cwd", "file"])
def test_overwrite_refusals(qwen2_base, tmp_path, monkeypatch, where):
    if where == "base":
        out = qwen2_base
    elif where == "parent_of_base":
        out = qwen2_base.parent
    elif where == "cwd":
        out = _engram_folder(tmp_path / "here")
        monkeypatch.chdir(out)
    else:
        out = tmp_path / "a_file"
        out.write_text("data")
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()
    with pytest.raises((ValueError, FileExistsError)):
        engram_hf.graft(qwen2_base, out, overwrite=True, verify=False, **TINY)
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()) == before
    assert not list(out.parent.glob(f"{out.name}.*"))


def test_killed_runs_are_reported_and_cleaned(qwen2_base, tmp_path, caplog):
    out = tmp_path / "out"
    killed = tmp_path / "out.tmp-killed"
    killed.mkdir()
    (killed / RUN_MARKER).write_text(str(_dead_pid()))
    (killed / "model-00001.safetensors").write_bytes(b"\0" * 1000)
    running = tmp_path / "out.tmp-running"
    running.mkdir()
    (running / RUN_MARKER).write_text(str(os.getpid()))  # a live conversion: never reported or removed
    assert stale_temporaries(out) == [killed]
    with caplog.at_level(logging.WARNING):
        GuardedOutput(out)
    assert "out.tmp-killed" in caplog.text and "--clean" in caplog.text and killed.exists()
    code = main(["convert", str(qwen2_base), str(out), "--heads", "2", "--embed-per-ngram", "16", "--table-rows",
                 "500", "--quiet", "--no-verify", "--clean"])
    assert code == 0 and not killed.exists() and running.exists()


def test_sigterm_cleans_up(qwen2_base, tmp_path):
    """A conversion stopped with SIGTERM removes its temporary folder, like Ctrl-C."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engram_hf.cli", "convert", str(qwen2_base), str(out), "--heads", "2",
         "--embed-per-ngram", "16", "--table-rows", "2000000", "--quiet", "--no-verify"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob("out.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob("out.tmp-*")), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert _leftovers(out) == []


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "int8"])
def test_non_float_output_dtype_is_refused(qwen2_base, tmp_path, dtype):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="Unsupported output dtype"):
        engram_hf.graft(qwen2_base, out, dtype=dtype, verify=False, **TINY)
    assert _leftovers(out) == []


def test_size_check_before_writing(qwen2_base, tmp_path, capsys):
    """A plan larger than the free disk, or one with too many shard files: a clear error, nothing written."""
    out = tmp_path / "out"
    code = main(["convert", str(qwen2_base), str(out), "--heads", "2", "--embed-per-ngram", "16", "--table-rows",
                 "1000000000000", "--quiet"])
    assert code == 2 and "Not enough disk space" in capsys.readouterr().err
    code = main(["convert", str(qwen2_base), str(out), "--heads", "2", "--embed-per-ngram", "16", "--table-rows",
                 "500", "--max-shard-size", "100", "--quiet"])
    assert code == 2 and "choose a larger --max-shard-size" in capsys.readouterr().err
    assert _leftovers(out) == []


def test_tokenizer_config_carries_no_local_flags(qwen2_base, tmp_path):
    out = tmp_path / "out"
    engram_hf.graft(qwen2_base, out, verify=False, **TINY)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(config)
