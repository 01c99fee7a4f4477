"""`engram-hf bench-convert`: peak memory and wall time of a conversion (`graft`), each run in a fresh process.

The target: grafting tables of any size peaks at no more than the base model's size + 1 GiB of RSS, since the tables
are generated in row chunks and streamed to disk. Verification (reloading the output) is measured as a separate run:
it materialises the tables, so its peak grows with them.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

GIB = 2**30
_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path

    start = time.perf_counter()
    from engram_hf.conversion.graft import graft

    kwargs = json.loads(sys.argv[1])
    result = graft(**kwargs)
    out = Path(kwargs["output_dir"])
    sizes = [(out / name).stat().st_size for name in result.shards]
    print(json.dumps({
        "seconds": time.perf_counter() - start, "base_parameters": result.base_parameters,
        "table_parameters": result.table_parameters, "table_rows": result.table_rows, "layer_ids": result.layer_ids,
        "shards": len(sizes), "output_bytes": sum(sizes), "largest_shard_bytes": max(sizes),
        "max_abs_diff": result.max_abs_diff,
    }))
    """
)


def _memory_sample(pid: int) -> dict[str, int]:
    """RssAnon and RssFile of a live process, in bytes (empty where /proc is not available)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split() for line in lines if line.startswith(("RssAnon:", "RssFile:")))
    return {name.rstrip(":"): int(kib) * 1024 for name, kib, *_ in fields}


def measure(argv: list[str], log: Path, interval: float = 0.05) -> dict:
    """Run `argv` in a child process; its peak RSS (`ru_maxrss` from `wait4`), the peaks of its anonymous and
    file-backed resident memory (sampled from /proc), its wall time, return code and standard output."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        peaks: dict[str, int] = {}
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            for name, value in _memory_sample(proc.pid).items():
                peaks[name] = max(peaks.get(name, 0), value)
            time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, with the child's own resource usage
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return {
        "returncode": proc.returncode,
        "wall_s": time.perf_counter() - start,
        "peak_rss_bytes": usage.ru_maxrss * scale,
        "peak_rss_anon_bytes": peaks.get("RssAnon"),
        "peak_rss_file_bytes": peaks.get("RssFile"),
        "output": log.read_text(),
    }


def bench_convert(
    base: str | os.PathLike | None = None,
    table_gib: float = 8.0,
    verify: tuple[bool, ...] = (False,),
    workdir: str | os.PathLike | None = None,
    max_shard_size: str = "2GB",
    dtype: str = "float32",
) -> dict:
    """Convert `base` (default: the bundled SmolLM2-135M GGUF) with `table_gib` GiB of tables in a fresh process, once
    per entry of `verify`, and report each run's peak RSS against the target (base size + 1 GiB).

    Every output goes to a temporary folder under `workdir` (default: the system temporary folder) and is deleted
    after its run. The geometry is `graft`'s default (layers 1 and half depth, 2- and 3-grams, 8 heads, 512 dims).
    """
    import torch

    from .bundled import bundled_smollm2_gguf

    base = Path(base) if base is not None else bundled_smollm2_gguf()
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    budget = f"{table_gib * GIB / itemsize / 1e6:.6f}M"  # table parameters over all Engram layers
    results = {
        "base": str(base),
        "base_file_bytes": sum(p.stat().st_size for p in ([base] if base.is_file() else base.glob("*.safetensors"))),
        "table_gib_requested": table_gib,
        "max_shard_size": max_shard_size,
        "dtype": dtype,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "runs": [],
    }
    root = Path(tempfile.mkdtemp(prefix="engram-bench-convert-", dir=workdir))
    try:
        for check in verify:
            out = root / "graft"
            kwargs = dict(base=str(base), output_dir=str(out), table_rows=budget, dtype=dtype,
                          max_shard_size=max_shard_size, verify=check, progress=False)
            run = measure([sys.executable, "-c", _CHILD, json.dumps(kwargs)], root / "log.txt")
            shutil.rmtree(out, ignore_errors=True)
            if run["returncode"] != 0:
                raise RuntimeError(f"Conversion failed (exit {run['returncode']}):\n{run['output'][-4000:]}")
            child = json.loads(run.pop("output").strip().splitlines()[-1])
            base_bytes = child["base_parameters"] * itemsize
            target = base_bytes + GIB
            results["runs"].append({
                "verify": check,
                "peak_rss_gib": run["peak_rss_bytes"] / GIB,
                "peak_rss_anon_gib": (run["peak_rss_anon_bytes"] or 0) / GIB,  # sampled; 0 without /proc
                "peak_rss_file_gib": (run["peak_rss_file_bytes"] or 0) / GIB,
                "base_gib": base_bytes / GIB,
                "table_gib": child["table_parameters"] * itemsize / GIB,
                "target_gib": target / GIB,
                "within_target": run["peak_rss_bytes"] <= target,
                "wall_s": run["wall_s"],
                "graft_s": child["seconds"],
                "output_gib": child["output_bytes"] / GIB,
                "shards": child["shards"],
                "largest_shard_bytes": child["largest_shard_bytes"],
                "table_rows": child["table_rows"],
                "layer_ids": child["layer_ids"],
                "max_abs_diff": child["max_abs_diff"],
            })
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results
