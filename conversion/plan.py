"""The plan of a conversion: every input checked against the base and the Engram config built, before anything is
written; the size and free-space check."""

from __future__ import annotations

import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..families import Family, engram_config_from_base, family_of
from ..modeling.configuration_engram import default_engram_layer_ids
from ..modeling.hashing_engram import NgramHasher
from ..tokenization.tokenization_engram import build_compression_map
from .source import BaseSource, scan_safetensors, source_shards, stored_float_dtype

PROBE_PROMPT = "The Engram memory hashes the last few tokens of the context into large embedding tables."
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_SHARD_FILES = 10_000
logger = logging.getLogger(__name__)
_BYTE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}  # "500B" is 500 bytes
_COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}  # "2B" is 2 billion parameters


def check_space(output_dir: Path, plan: Plan, max_bytes: int) -> None:
    """Log the planned size and file count; refuse a plan that does not fit the free disk space or would write an
    unreasonable number of shard files."""
    source = plan.source
    base_files = [source.folder / source.gguf_file] if source.gguf_file else list(plan.shard_keys)
    itemsize = torch.empty(0, dtype=plan.out_dtype).element_size()
    table_params = plan.table_parameters
    planned = sum(f.stat().st_size for f in base_files) + table_params * itemsize
    files = math.ceil(planned / max_bytes)
    free = shutil.disk_usage(output_dir.parent if output_dir.parent.exists() else Path.cwd()).free
    logger.info("planned output: %.2f GiB (tables %.2f GiB) in about %d shard file(s); %.2f GiB free",
                planned / 2**30, table_params * itemsize / 2**30, files, free / 2**30)
    if planned > free:
        raise OSError(f"Not enough disk space for {output_dir}: the conversion writes about {planned / 2**30:.2f} GiB "
                      f"and {free / 2**30:.2f} GiB are free (smaller --table-rows, or another disk).")
    if files > MAX_SHARD_FILES:
        raise ValueError(f"max_shard_size {max_bytes:,} bytes would write about {files:,} shard files for "
                         f"{planned / 2**30:.2f} GiB; choose a larger --max-shard-size.")


def parse_size(text: str | int) -> int:
    """Bytes of a size such as 2GB, 500MB, 500B (bytes) or a plain byte count."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"Cannot parse size {text!r} (use e.g. 2GB, 500MB or a byte count).")
    number, unit = match.groups()
    return int(float(number) * _BYTE_UNITS[unit.upper()])


def output_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"Unknown dtype {dtype!r}.")
        dtype = getattr(torch, name)
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise ValueError(f"Unsupported output dtype {dtype}: choose one of "
                         f"{', '.join(str(d).replace('torch.', '') for d in OUTPUT_DTYPES)}.")
    return dtype


def _table_base_size(table_rows, compressed_vocab: int, n_layers: int, n_orders: int, n_heads: int, head_dim: int):
    """`engram_vocab_size` per order from `table_rows`: None (5 x V'), an int (rows of each head), "Nx" (N x V') or a
    parameter budget for all tables together ("2B", "300M")."""
    if table_rows is None:
        base = 5 * compressed_vocab
    elif isinstance(table_rows, bool):
        raise ValueError(f"table_rows must be an int or a string, got {table_rows!r}.")
    elif isinstance(table_rows, (int, float)):
        base = int(table_rows)
    else:
        text = str(table_rows).strip()
        if match := re.fullmatch(r"(-?[0-9]*\.?[0-9]+)\s*[xX]", text):
            base = int(float(match.group(1)) * compressed_vocab)
        elif match := re.fullmatch(r"(-?[0-9]*\.?[0-9]+)\s*([KMGBT]?)", text, flags=re.IGNORECASE):
            budget = float(match.group(1)) * _COUNT_UNITS[match.group(2).upper()]
            if not match.group(2):  # a plain number string: rows per head
                base = int(budget)
            else:
                base = int(budget // (n_layers * n_orders * n_heads * head_dim))
        else:
            raise ValueError(f"Cannot parse table_rows {table_rows!r} (int rows, '5x' of V', or a budget like '2B').")
    if base <= 1:
        raise ValueError(f"Engram table size must be positive (got {base} rows per head from table_rows={table_rows!r}).")
    return base


@dataclass
class Plan:
    """Everything decided (and checked) before anything is written."""

    source: BaseSource
    base_config: object
    family: Family
    config: object  # the Engram config
    tokenizer: object
    hasher: NgramHasher
    table_rows: dict[int, int]  # layer id -> rows of its table
    out_dtype: torch.dtype
    command: str
    shard_keys: dict[Path, list[str]] | None  # the base's safetensors shards and their keys (None: a GGUF)

    @property
    def table_parameters(self) -> int:
        head_dim = self.config.engram_n_embed_per_ngram // self.config.engram_n_head_per_ngram
        return sum(self.table_rows.values()) * head_dim


def _load_tokenizer(source: BaseSource):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **source.load_kwargs)
    except Exception as error:
        raise ValueError(f"No usable tokenizer found with the base model {source.label}: the compression map is "
                         f"built from it ({type(error).__name__}: {error}).") from error
    if tokenizer is None or not hasattr(tokenizer, "batch_decode") or len(tokenizer) < 2 or not tokenizer(
        PROBE_PROMPT
    )["input_ids"]:
        raise ValueError(f"No usable tokenizer found with the base model {source.label} (tokenizer files missing?): "
                         "the compression map is built from it.")
    return tokenizer


def make_plan(source: BaseSource, dtype, layer_ids, max_ngram_size, n_head_per_ngram, n_embed_per_ngram, embed_per_head,
          table_rows, short_conv, kernel_size, seed) -> Plan:
    """Check every input against the base and build the Engram config (nothing written yet)."""
    from transformers import AutoConfig

    try:
        base_config = AutoConfig.from_pretrained(source.folder, **source.load_kwargs)
    except Exception as error:
        raise ValueError(f"Cannot read the base model's config from {source.label}: {error}") from error
    family = family_of(base_config)
    num_layers = base_config.num_hidden_layers
    layer_ids = default_engram_layer_ids(num_layers) if layer_ids is None else [int(i) for i in layer_ids]
    bad = [i for i in layer_ids if not 0 <= i < num_layers]
    if bad or not layer_ids or len(set(layer_ids)) != len(layer_ids):
        raise ValueError(f"Engram layer ids {layer_ids} must be distinct and within 0..{num_layers - 1} "
                         f"(the base model has {num_layers} decoder layers).")
    if embed_per_head is not None:
        n_embed_per_ngram = n_head_per_ngram * int(embed_per_head)
    if max_ngram_size < 2 or n_head_per_ngram <= 0 or not n_embed_per_ngram or n_embed_per_ngram <= 0:
        raise ValueError("max_ngram_size must be >= 2 and n_head_per_ngram, n_embed_per_ngram positive.")
    if n_embed_per_ngram % n_head_per_ngram:
        raise ValueError(f"n_embed_per_ngram ({n_embed_per_ngram}) must be divisible by n_head_per_ngram "
                         f"({n_head_per_ngram}).")
    head_dim = n_embed_per_ngram // n_head_per_ngram
    # every shard header is read now: a truncated or corrupt base fails before anything is written
    shard_keys = None if source.gguf_file else scan_safetensors(source_shards(source.folder))
    out_dtype = dtype or stored_float_dtype(shard_keys)
    tokenizer = _load_tokenizer(source)
    if isinstance(table_rows, int):  # fail before the (slow) compression map
        _table_base_size(table_rows, 1, 1, 1, 1, 1)
    compression_map, compressed_vocab = build_compression_map(tokenizer)
    base_vocab = _table_base_size(table_rows, compressed_vocab, len(layer_ids), max_ngram_size - 1,
                                  n_head_per_ngram, head_dim)
    config = engram_config_from_base(
        base_config, engram_layer_ids=layer_ids, engram_max_ngram_size=max_ngram_size,
        engram_n_embed_per_ngram=n_embed_per_ngram, engram_n_head_per_ngram=n_head_per_ngram,
        engram_vocab_size=[base_vocab] * (max_ngram_size - 1), engram_kernel_size=kernel_size, engram_seed=seed,
        engram_compressed_vocab_size=compressed_vocab, engram_map_size=len(tokenizer), engram_use_short_conv=short_conv,
    )
    config.dtype = out_dtype
    hasher = NgramHasher.from_config(config, compression_map=compression_map)
    command = f"engram-hf convert {source.hub_id or source.label} OUTPUT" + "".join(
        [f" --layers {','.join(map(str, layer_ids))}", f" --max-ngram-size {max_ngram_size}",
         f" --heads {n_head_per_ngram}", f" --embed-per-ngram {n_embed_per_ngram}",
         f" --table-rows {table_rows}" if table_rows is not None else "", "" if short_conv else " --no-short-conv",
         f" --seed {seed}"])
    table_rows_per_layer = {i: hasher.rows_per_layer(i) for i in layer_ids}
    return Plan(source, base_config, family, config, tokenizer, hasher, table_rows_per_layer, out_dtype, command,
                shard_keys)
