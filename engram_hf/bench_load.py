"""`engram-hf bench-load`: tables larger than RAM load as memory maps and generate within base + 1 GiB of RSS.

A checkpoint with `table_gib` GiB of tables in shards of `max_shard_size` (tables stored as aligned row slices) is
grafted in one fresh process, then loaded through remote code and used to generate in another, whose peak RSS is
measured against the target (base model + 1 GiB). The decode ratio compares, in one process and interleaved, the
memory-mapped tables with the same tables copied into RAM, on a checkpoint whose tables fit (`ratio_table_gib`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

from .bench_convert import GIB, _CHILD as GRAFT_CHILD, measure

_LOAD_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], trust_remote_code=True).eval()
    load_s = time.perf_counter() - start
    tables = [m.weight for n, m in model.named_modules() if n.endswith("engram.table")]
    ids = torch.tensor([spec["prompt"]]) % model.config.vocab_size  # a fixed prompt (SmolLM2 ids)
    config = GenerationConfig(max_new_tokens=spec["tokens"], min_new_tokens=spec["tokens"], do_sample=False)

    def seconds_per_token(m):
        begin = time.perf_counter()
        with torch.no_grad():
            m.generate(ids, generation_config=config)
        return (time.perf_counter() - begin) / spec["tokens"]

    result = {"load_s": load_s, "table_bytes": sum(t.numel() * t.element_size() for t in tables),
              "base_bytes": sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                if not n.endswith("engram.table.weight")),
              "cold_ms_per_token": 1e3 * seconds_per_token(model),
              "warm_ms_per_token": 1e3 * seconds_per_token(model)}
    if spec["ratio_rounds"]:  # the same tables copied into RAM, timed interleaved with the mapped ones
        in_ram = AutoModelForCausalLM.from_pretrained(spec["folder"], trust_remote_code=True).eval()
        for name, module in in_ram.named_modules():
            if name.endswith("engram.table"):
                module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)
        seconds_per_token(in_ram)
        times = {"mapped": [], "in_ram": []}
        for _ in range(spec["ratio_rounds"]):
            times["mapped"].append(seconds_per_token(model))
            times["in_ram"].append(seconds_per_token(in_ram))
        result["decode_ratio"] = sorted(times["in_ram"])[len(times["in_ram"]) // 2] / sorted(
            times["mapped"])[len(times["mapped"]) // 2]
    print(json.dumps(result))
    """
)


def _graft(base: Path, folder: Path, table_gib: float, max_shard_size: str, log: Path) -> dict:
    budget = f"{table_gib * GIB / 4 / 1e6:.6f}M"  # float32 table parameters over all Engram layers
    kwargs = dict(base=str(base), output_dir=str(folder), table_rows=budget, dtype="float32",
                  max_shard_size=max_shard_size, verify=False, progress=False)
    run = measure([sys.executable, "-c", GRAFT_CHILD, json.dumps(kwargs)], log)
    if run["returncode"] != 0:
        raise RuntimeError(f"Conversion failed (exit {run['returncode']}):\n{run['output'][-4000:]}")
    return json.loads(run["output"].strip().splitlines()[-1])


def _load(folder: Path, tokens: int, ratio_rounds: int, threads: int, log: Path) -> dict:
    spec = dict(folder=str(folder), prompt=[504, 3458, 282, 4649, 314], tokens=tokens, ratio_rounds=ratio_rounds,
                threads=threads)
    run = measure([sys.executable, "-c", _LOAD_CHILD, json.dumps(spec)], log)
    if run["returncode"] != 0:
        raise RuntimeError(f"Loading failed (exit {run['returncode']}):\n{run['output'][-4000:]}")
    child = json.loads(run.pop("output").strip().splitlines()[-1])
    return {**child, "peak_rss_gib": run["peak_rss_bytes"] / GIB, "peak_rss_anon_gib": (run["peak_rss_anon_bytes"] or 0)
            / GIB, "peak_rss_file_gib": (run["peak_rss_file_bytes"] or 0) / GIB, "wall_s": run["wall_s"]}


def bench_load(
    base: str | os.PathLike | None = None,
    table_gib: float = 32.0,
    ratio_table_gib: float = 2.0,
    max_shard_size: str = "2GB",
    tokens: int = 32,
    ratio_rounds: int = 5,
    threads: int = 0,
    workdir: str | os.PathLike | None = None,
) -> dict:
    """Graft, load and generate with `table_gib` GiB of tables (peak RSS vs base + 1 GiB), then the decode ratio of
    memory-mapped vs in-RAM tables on `ratio_table_gib` GiB; outputs go under `workdir` and are deleted after."""
    from .bundled import bundled_smollm2_gguf

    base = Path(base) if base is not None else bundled_smollm2_gguf()
    threads = threads or os.cpu_count() or 1
    results = {"base": str(base), "max_shard_size": max_shard_size, "tokens": tokens, "threads": threads, "runs": []}
    root = Path(tempfile.mkdtemp(prefix="engram-bench-load-", dir=workdir))
    try:
        for gib, rounds in ((table_gib, 0), (ratio_table_gib, ratio_rounds)):
            folder = root / "graft"
            graft = _graft(base, folder, gib, max_shard_size, root / "graft.log")
            run = _load(folder, tokens, rounds, threads, root / "load.log")
            shutil.rmtree(folder, ignore_errors=True)
            entry = {"table_gib": run["table_bytes"] / GIB, "graft_s": graft["seconds"], "shards": graft["shards"]}
            if not rounds:  # the ratio run copies its tables into RAM on purpose: no memory target
                target = run["base_bytes"] + GIB
                entry.update(target_gib=target / GIB, within_target=run["peak_rss_gib"] * GIB <= target)
            results["runs"].append({**entry, **run})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results
