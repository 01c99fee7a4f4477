"""Multi-process training: `EngramTrainer` under DDP (torchrun, gloo on CPU) equals one process with the same global
batch, sparse table gradients and row-wise optimizer state included; FSDP is refused with a clear error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_model

SCRIPT = Path(__file__).parent / "distributed_train.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(folder: Path, out: Path, processes: int) -> subprocess.CompletedProcess:
    launcher = [] if processes == 1 else [
        "-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={_free_port()}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *launcher, str(SCRIPT), str(folder), str(out), "4"],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp") / "tiny-engram"
    tiny_model("llama").save_pretrained(folder)  # non-zero Engram weights, ShortConv on
    return folder


def test_ddp_two_processes_equal_one(checkpoint, tmp_path):
    for processes in (1, 2):
        proc = _run(checkpoint, tmp_path / f"p{processes}", processes)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = torch.load(tmp_path / "p1.rank0.pt")
    ranks = [torch.load(tmp_path / f"p2.rank{r}.pt") for r in (0, 1)]
    assert one["world"] == 1 and ranks[0]["world"] == 2
    initial = dict(tiny_model("llama").named_parameters())
    for method in ("rowwise_adagrad", "adam"):
        for name, value in one[method]["params"].items():
            assert (value - initial[name]).abs().max() > 1e-3, name  # every trained parameter moved
            # both ranks hold the same parameters and optimizer state, equal to the 1-process run's
            assert torch.equal(ranks[0][method]["params"][name], ranks[1][method]["params"][name]), name
            torch.testing.assert_close(ranks[0][method]["params"][name], value, rtol=1e-4, atol=5e-5)
        for name, state in one[method]["optimizer"].items():
            for key, value in state.items():
                assert torch.equal(ranks[0][method]["optimizer"][name][key], ranks[1][method]["optimizer"][name][key])
                scale = float(value.abs().max())  # moments of near-zero gradients differ at float32 rounding
                torch.testing.assert_close(ranks[0][method]["optimizer"][name][key], value, rtol=1e-3,
                                           atol=1e-4 * scale)
        assert "sum" in one[method]["optimizer"]["model.layers.0.engram.table.weight"] or method == "adam"
    for rank in ranks:  # FSDP refused with a clear error naming DDP
        assert "EngramTrainer does not support FSDP" in rank["fsdp_error"] and "DDP" in rank["fsdp_error"]
