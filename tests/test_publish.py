"""`publish` validation, as a Hub user would meet the folder: its own remote code, whole shards, no pickle files or
stray executables; Hub-side failures are clear errors. Only `HfApi`'s network calls are faked."""

from __future__ import annotations

import shutil

import httpx2
import pytest

from engram_hf.cli import main
from engram_hf.conversion.publish import publish, validate_folder
from test_conversion import qwen2_base, qwen2_graft  # noqa: F401 (fixtures)


@pytest.fixture
def folder(qwen2_graft, tmp_path):  # noqa: F811
    copy = tmp_path / "repo"
    shutil.copytree(qwen2_graft[0], copy)
    return copy


def test_broken_remote_code_is_refused(folder):
    """The folder's own code is imported (engram_hf out of the way), not the installed package's classes."""
    code = folder / "modeling_engram.py"
    code.write_text(code.read_text() + "\nraise ImportError('broken on purpose')\n")
    with pytest.raises(ValueError, match="does not load as a Hub user would load it: .*broken on purpose"):
        validate_folder(folder)


def test_truncated_shard_is_refused(folder):
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{shard.name} is truncated"):
        validate_folder(folder)


def test_pickle_and_stray_code_refused_unless_allowed(folder, capsys):
    extras = ["pytorch_model.bin", "optimizer.pt", "helper.py"]
    for extra in extras:
        (folder / extra).write_bytes(b"data")
        assert main(["publish", str(folder), "--repo-id", "me/x", "--dry-run"]) == 2
        assert extra in capsys.readouterr().err
        (folder / extra).unlink()
    for extra in extras:
        (folder / extra).write_bytes(b"data")
    assert main(["publish", str(folder), "--repo-id", "me/x", "--dry-run", "--allow-extra"]) == 0
    listed = capsys.readouterr().out
    assert all(extra in listed for extra in extras)


def test_network_failure_is_a_clear_error(folder, monkeypatch, capsys):
    from huggingface_hub import HfApi

    def offline(self, *args, **kwargs):
        raise httpx2.ConnectError("no route to host")  # what huggingface_hub raises offline

    monkeypatch.setattr(HfApi, "create_repo", offline)
    with pytest.raises(OSError, match="Upload of .* to me/x failed: ConnectError"):
        publish(folder, "me/x", token="hf_fake")
    assert main(["publish", str(folder), "--repo-id", "me/x", "--token", "hf_fake"]) == 2
    err = capsys.readouterr().err
    assert "error: Upload of" in err and "Traceback" not in err
