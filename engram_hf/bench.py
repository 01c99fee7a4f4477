"""`engram-hf bench`: speed and memory of an Engram model against its base, side by side in one process."""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache, StaticCache

from .bundled import load_base
from .conversion.twin import engram_twin
from .modeling.hashing_engram import NgramHasher, layer_multipliers
from .modeling.integration_engram import CACHE_KWARG, output_cache


def numpy_reference_hash(compressed: np.ndarray, multipliers: list[list[int]], moduli: list[list[int]], n: int, k: int, pad: int):
    """The reference definition in plain NumPy: full-sequence recompute, a loop over layers, orders and heads."""
    out = []
    for mults, mods in zip(multipliers, moduli):
        padded = np.concatenate([np.full((compressed.shape[0], n - 1), pad, dtype=np.int64), compressed], axis=1)
        seq = compressed.shape[1]
        cols = []
        for order in range(2, n + 1):
            mix = np.zeros_like(compressed)
            for j in range(order):
                mix ^= padded[:, n - 1 - j : n - 1 - j + seq] * np.int64(mults[j])
            for head in range(k):
                cols.append(mix % mods[(order - 2) * k + head])
        out.append(np.stack(cols, -1))
    return out


def _median_time(
    fn: Callable[[], object], reps: int, warmup: int = 1, sync: Callable[[], None] = lambda: None
) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Runner:
    """Prefill and greedy decode of one model, as `generate` runs them: a dynamic cache; or (`compiled`) a static cache
    made once and reset per round, an eager prefill and a `torch.compile`d decode step (CUDA graphs on a GPU)."""

    def __init__(self, model: nn.Module, compiled: bool = False, max_len: int = 0):
        self.model, self.cache, self.step = model, None, model
        if compiled:
            self.cache = StaticCache(config=model.config, max_cache_len=max_len)
            mode = "reduce-overhead" if next(model.parameters()).is_cuda else "default"
            self.step = torch.compile(model, mode=mode, fullgraph=True)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> tuple[object, torch.Tensor]:
        if self.cache is not None:
            self.cache.reset()
        out = self.model(prompt, **{CACHE_KWARG: self.cache}, use_cache=True, logits_to_keep=1)
        return output_cache(out), out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def decode(self, token: torch.Tensor, cache, position: int) -> torch.Tensor:
        positions = torch.full_like(token, position)  # explicit: no host read of the cache length in a compiled step
        out = self.step(token, position_ids=positions, **{CACHE_KWARG: cache}, use_cache=True)
        return out.logits[:, -1:].argmax(-1)


def _timed_round(
    runners: dict[str, _Runner], prompt: torch.Tensor, new_tokens: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """One round: each model prefills the prompt (as `generate` does: cached, last logits only) in turn, then they
    decode `new_tokens` greedy tokens, one step of each model after the other, so machine noise hits all alike.

    Returns `{label: prefill seconds}` and `{label: [seconds of each decode step]}`.
    """
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)

    def timed(fn: Callable[[], object]) -> tuple[object, float]:
        start = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - start

    prefill_s, step_s, caches, tokens = {}, {label: [] for label in runners}, {}, {}
    for label, runner in runners.items():
        (caches[label], tokens[label]), prefill_s[label] = timed(partial(runner.prefill, prompt))
    for step in range(new_tokens):
        for label, runner in runners.items():
            tokens[label], seconds = timed(partial(runner.decode, tokens[label], caches[label], prompt.shape[1] + step))
            step_s[label].append(seconds)
    return prefill_s, step_s


def _prefill_and_decode(
    runners: dict[str, _Runner], prompt: torch.Tensor, new_tokens: int, reps: int, quiet: bool = True
) -> dict[str, tuple[float, float]]:
    """`{label: (prefill tokens/s, greedy decode tokens/s)}` from `reps` interleaved rounds after a warm-up round:
    the median prefill time and the median time of one decode step."""
    prefill_s = {label: [] for label in runners}
    step_s = {label: [] for label in runners}
    for round_ in tqdm(range(reps + 1), desc=" vs ".join(runners), disable=quiet):  # round 0 warms up (compiles)
        prefills, steps = _timed_round(runners, prompt, new_tokens)
        for label in runners:
            prefill_s[label] += [prefills[label]] if round_ else []
            step_s[label] += steps[label] if round_ else []
    return {
        label: (prompt.numel() / statistics.median(prefill_s[label]), prompt.shape[0] / statistics.median(step_s[label]))
        for label in runners
    }


# view and metadata ops: no kernel of their own
_NO_KERNEL = {
    "aten::" + name for name in (
        "view", "reshape", "slice", "select", "unsqueeze", "squeeze", "expand", "transpose", "t", "permute", "unfold",
        "flatten", "as_strided", "alias", "detach", "empty", "empty_strided", "result_type", "lift_fresh", "unbind",
        "_unsafe_view", "split", "chunk", "narrow", "resolve_conj", "resolve_neg", "item", "_local_scalar_dense",
        "is_nonzero", "empty_like", "to", "type_as", "contiguous",
    )
}


def _kernels_per_step(runner: _Runner, prompt: torch.Tensor) -> int:
    """Kernels one eager decode step runs: CUDA kernels on a GPU; on the CPU the innermost aten ops that compute (a
    composite op counts as its parts; views, no-op casts and metadata ops count as nothing)."""
    from torch.profiler import ProfilerActivity, profile

    cache, token = runner.prefill(prompt)
    runner.decode(token, cache, prompt.shape[1])  # the first step may still set up cache layers
    activities = [ProfilerActivity.CUDA] if prompt.is_cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        runner.decode(token, cache, prompt.shape[1] + 1)
        if prompt.is_cuda:
            torch.cuda.synchronize()
    if prompt.is_cuda:
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    computing = [e for e in prof.events() if e.name.startswith("aten::") and e.name not in _NO_KERNEL]
    parents = {id(e.cpu_parent) for e in computing if e.cpu_parent is not None}
    return sum(1 for e in computing if id(e) not in parents)  # innermost computing ops


def _table_variant(model, rows_per_head: int) -> tuple[NgramHasher, dict[int, nn.Embedding]]:
    """A hasher and Engram tables of `model` for `rows_per_head`-sized heads (uninitialised, lazily committed memory)."""
    cfg = copy.copy(model.config)
    cfg.engram_vocab_size = [rows_per_head] * (cfg.engram_max_ngram_size - 1)
    decoder = model.get_decoder()
    old = decoder.engram_hasher
    hasher = NgramHasher.from_config(cfg, compression_map=old.compression_map).to(old.multipliers.device)
    tables = {}
    for layer_id in cfg.engram_layer_ids:
        engram, rows = decoder.layers[layer_id].engram, hasher.rows_per_layer(layer_id)
        weight = torch.empty(rows, engram.head_dim, dtype=engram.table.weight.dtype)
        tables[layer_id] = nn.Embedding(rows, engram.head_dim, _weight=weight)
    return hasher, tables


def _use_tables(model, variant: tuple[NgramHasher, dict[int, nn.Embedding]]) -> None:
    decoder = model.get_decoder()
    decoder.engram_hasher, tables = variant
    for layer_id, table in tables.items():
        decoder.layers[layer_id].engram.table = table


def _peak_rss_of(code: str) -> float:
    """Peak RSS (GiB) of a fresh Python process running `code`.

    Read from the child's own `VmHWM` (Linux): its `ru_maxrss` would not do, since Linux carries the RSS high-water
    mark across `exec` from the process that forked it, so every child would report at least this process's peak.
    """
    script = f"{code}\nprint(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20  # kB -> GiB


def run_bench(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    base, tokenizer, name, source = load_base(args.model, args.tiny, args.random_weights, args.shape)
    dtype = getattr(torch, args.dtype)
    base.to(dtype)
    engram = engram_twin(
        base, tokenizer, engram_n_head_per_ngram=8, engram_max_ngram_size=3, engram_table_device=args.table_device
    )
    device = torch.device(args.device)
    engram.to(device)  # tables in host memory stay there
    engram_gpu_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    base.to(device)
    cfg = engram.config
    results: dict = {
        "model": name,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "geometry": {"engram_layer_ids": cfg.engram_layer_ids, "engram_max_ngram_size": cfg.engram_max_ngram_size,
                     "engram_n_head_per_ngram": cfg.engram_n_head_per_ngram,
                     "engram_n_embed_per_ngram": cfg.engram_n_embed_per_ngram,
                     "engram_vocab_size": cfg.engram_vocab_size, "compressed_vocab_size": cfg.engram_compressed_vocab_size},
        "reps": args.reps,
        "settings": {"dtype": args.dtype, "batch_size": args.batch_size, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "compile": args.compile, "table_device": args.table_device,
                     "transformers": transformers.__version__},
    }
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, len(tokenizer), (args.batch_size, args.prompt_len), generator=generator)
    prompt = prompt.to(device)
    if device.type == "cuda":
        tables = [engram.get_decoder().layers[i].engram.table.weight for i in cfg.engram_layer_ids]
        results["gpu"] = {
            "name": torch.cuda.get_device_name(device),
            "table_devices": sorted({str(t.device) for t in tables}),
            "table_gib": sum(t.numel() * t.element_size() for t in tables) / 2**30,
            "engram_model_gpu_memory_gib": engram_gpu_gib,
        }

    # 1. base vs Engram, interleaved step by step so that machine noise hits both alike
    max_len = args.prompt_len + args.new_tokens + 2
    runners = {label: _Runner(model, args.compile, max_len) for label, model in (("base", base), ("engram", engram))}
    figures = _prefill_and_decode(runners, prompt, args.new_tokens, args.reps, args.quiet)
    speed = {label: {"prefill_tok_s": prefill, "decode_tok_s": decode} for label, (prefill, decode) in figures.items()}
    speed["decode_ratio"] = speed["engram"]["decode_tok_s"] / speed["base"]["decode_tok_s"]
    speed["prefill_ratio"] = speed["engram"]["prefill_tok_s"] / speed["base"]["prefill_tok_s"]
    results["speed"] = speed
    eager = {"base": _Runner(base), "engram": _Runner(engram)}
    kernels = {label: _kernels_per_step(runner, prompt[:, :32]) for label, runner in eager.items()}
    kernels["per_engram_layer"] = (kernels["engram"] - kernels["base"]) / len(cfg.engram_layer_ids)
    results["kernels_per_decode_step"] = kernels

    # 2. decode time as the per-layer table grows (O(1) lookups: flat)
    # (one round at a time for each size in turn, so that machine noise spreads over all sizes alike)
    n_heads = (cfg.engram_max_ngram_size - 1) * cfg.engram_n_head_per_ngram
    original = (engram.get_decoder().engram_hasher, {i: engram.get_decoder().layers[i].engram.table
                                                     for i in cfg.engram_layer_ids})
    variants = {log2: _table_variant(engram, max(2, 2**log2 // n_heads)) for log2 in args.table_log2}
    step_s = {log2: [] for log2 in args.table_log2}
    for round_ in tqdm(range(args.reps + 1), desc="table sweep", disable=args.quiet):  # round 0 warms up
        for log2, variant in variants.items():
            _use_tables(engram, variant)
            _, steps = _timed_round({"engram": _Runner(engram)}, prompt[:, :32], args.new_tokens)
            step_s[log2] += steps["engram"] if round_ else []
    _use_tables(engram, original)
    results["table_sweep"] = [
        {"log2_rows": log2, "rows_per_layer": hasher.rows_per_layer(cfg.engram_layer_ids[0]),
         "decode_ms_per_token": 1e3 * statistics.median(step_s[log2])}
        for log2, (hasher, _) in variants.items()
    ]
    sweep = results["table_sweep"]
    results["table_sweep_ratio"] = sweep[0]["decode_ms_per_token"] / sweep[-1]["decode_ms_per_token"]

    # 3. hashing: per decode step at two context lengths, and prefill throughput against NumPy
    # (a decode step: the model's own path from one new raw id and the cached N-1 compressed ids to the row ids)
    decoder, hasher = engram.get_decoder(), engram.get_engram_hasher()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    hashing = {}
    for context_len in (128, 4096):
        ids = torch.randint(0, len(tokenizer), (1, context_len + 1), device=device)
        cache = DynamicCache(config=cfg)
        decoder.engram_hash(ids[:, :-1], None, cache)  # the context enters the cache, as in a prefill
        step = partial(decoder.engram_hash, ids[:, -1:], None, cache)
        hashing[f"decode_step_us_ctx{context_len}"] = 1e6 * _median_time(
            step, reps=max(50, args.reps * 50), warmup=10, sync=sync
        )
    window = hasher.compress(ids[:, -hasher.max_ngram_size :])  # the hashing alone: one new id and its N-1 context
    hashing["decode_step_hash_only_us"] = 1e6 * _median_time(
        partial(hasher.hash_compressed, window[:, -1:], window[:, :-1]), reps=max(50, args.reps * 50), warmup=10,
        sync=sync,
    )
    long_ids = torch.randint(0, len(tokenizer), (1, args.hash_len), device=device)
    compressed = hasher.compress(long_ids)
    torch_s = _median_time(partial(hasher.hash_compressed, compressed), args.reps, sync=sync)
    mults = [layer_multipliers(l, cfg.engram_max_ngram_size, cfg.engram_compressed_vocab_size, cfg.engram_seed)
             for l in cfg.engram_layer_ids]
    np_ids = compressed.cpu().numpy()
    numpy_s = _median_time(
        lambda: numpy_reference_hash(np_ids, mults, hasher.moduli.tolist(), cfg.engram_max_ngram_size,
                                     cfg.engram_n_head_per_ngram, hasher.compressed_pad_id), args.reps)
    hashing["prefill_tokens"] = args.hash_len
    hashing["prefill_tok_s_torch"] = args.hash_len / torch_s
    hashing["prefill_tok_s_numpy_reference"] = args.hash_len / numpy_s
    hashing["prefill_speedup"] = numpy_s / torch_s
    results["hashing"] = hashing

    # 4. peak RSS of loading the base and building the Engram model, each in a fresh process
    results["memory"] = {"bench_process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if source != "tiny":
        model_id, load = source
        loader = (f"import torch; from transformers import AutoModelForCausalLM as A; "
                  f"A.from_pretrained({model_id!r}, dtype=torch.float32, **{load!r})")
        results["memory"]["load_base_peak_rss_gib"] = _peak_rss_of(loader)
        results["memory"]["load_and_graft_peak_rss_gib"] = _peak_rss_of(
            f"{loader.replace('A.from_pretrained', 'b = A.from_pretrained')}\n"
            f"from transformers import AutoTokenizer; from engram_hf.conversion.twin import engram_twin\n"
            f"engram_twin(b, AutoTokenizer.from_pretrained({model_id!r}, **{load!r}))"
        )
    return results
