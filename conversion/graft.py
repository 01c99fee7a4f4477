"""Graft Engram conditional memory onto a pretrained Llama / Qwen2 / Qwen3 checkpoint (design §4).

The grafted model starts out computing exactly what the base computes: every Engram layer gets the graft init
(value projection and ShortConv zero), so its update is exactly zero until training moves it.

Output is a complete Hub repository folder: `config.json` (with `auto_map` and the `engram_*` fields),
`generation_config.json`, sharded safetensors with `model.safetensors.index.json`, the remote-code files, the base
tokenizer and a `README.md` model card. Base tensors are copied shard by shard (never the whole model in memory, except
for a GGUF source, which transformers dequantizes as a whole). Engram tables are generated in row chunks and streamed
to disk; a table larger than `max_shard_size` is stored as row slices `...engram.table.weight.part.<i>`, one per shard,
which `from_pretrained` reassembles into `...engram.table.weight` (`EngramTablePartsConverter`, in the remote code).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..modeling import configuration_engram as _configuration
from ..modeling.hashing_engram import NgramHasher
from ..modeling.layer_engram import EngramLayer
from ..modeling.modeling_engram_llama import EngramLlamaForCausalLM
from ..modeling.modeling_engram_qwen2 import EngramQwen2ForCausalLM
from ..modeling.modeling_engram_qwen3 import EngramQwen3ForCausalLM
from ..tokenization.tokenization_engram import build_compression_map
from .output import GuardedOutput

# base model_type -> (Engram config class, Engram causal-LM class)
FAMILIES = {
    "llama": (_configuration.EngramLlamaConfig, EngramLlamaForCausalLM),
    "qwen2": (_configuration.EngramQwen2Config, EngramQwen2ForCausalLM),
    "qwen3": (_configuration.EngramQwen3Config, EngramQwen3ForCausalLM),
}
MODELING_DIR = Path(_configuration.__file__).resolve().parent
# installed as package data of `engram_hf.hub_cards`: `hub_cards/` beside `conversion/` in a checkout and in a wheel
CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "hub_cards" / "model_card.md"
PROBE_PROMPT = "The Engram memory hashes the last few tokens of the context into large embedding tables."
TABLE_CHUNK_ROWS = 1 << 16  # rows generated at once (fixed, so the table values do not depend on the shard size)
_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_SHARD_FILES = 10_000
LOCAL_TOKENIZER_KEYS = ("is_local", "local_files_only")
logger = logging.getLogger(__name__)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


@dataclass
class GraftResult:
    """What `graft` wrote: the output folder and the numbers shown in its model card."""

    output_dir: Path
    family: str
    layer_ids: list[int]
    vocab_size: int
    compressed_vocab_size: int
    engram_vocab_size: list[int]
    table_rows: dict[int, int]
    base_parameters: int
    engram_parameters: int
    table_parameters: int
    shards: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None

    @property
    def reduction(self) -> float:
        return 1.0 - self.compressed_vocab_size / self.vocab_size


# --------------------------------------------------------------------------------------------------------------------
# source resolution


@dataclass
class _Source:
    folder: Path
    gguf_file: str | None
    hub_id: str | None
    label: str


def _resolve_source(base: str | os.PathLike, revision: str | None, cache_dir: str | None) -> _Source:
    path = Path(base).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"Base model file {path} is not a .gguf file; pass a folder with config.json instead.")
        return _Source(path.parent.resolve(), path.name, None, path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _Source(path.resolve(), None, None, path.resolve().name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _Source(path.resolve(), ggufs[0].name, None, ggufs[0].name)
        raise ValueError(f"Base folder {path} has no config.json (nor a single .gguf file).")
    if str(base).count("/") == 1 and not str(base).startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(
                str(base),
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.md", "*.jinja"],
            )
        except Exception as error:  # offline without a cached snapshot, unknown repo, ...
            raise ValueError(f"Could not resolve the Hub model {base!r}: {error}") from error
        return _Source(Path(folder), None, str(base), str(base))
    raise FileNotFoundError(f"Base model {base!r} is neither a local folder, a .gguf file, nor a Hub id (org/name).")


def _source_shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as error:
            raise ValueError(f"Corrupt safetensors index {index}: {error}") from error
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"Base folder {folder} holds no safetensors weights (model.safetensors or an index).")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"Safetensors shards listed in {index.name} are missing from {folder}: {missing}")
    return files


def _scan_safetensors(files: list[Path]) -> dict[Path, list[str]]:
    """Open every shard's header (catching truncated / corrupt files) before anything is written."""
    from safetensors import safe_open

    keys = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys[file] = list(handle.keys())
        except Exception as error:
            raise ValueError(f"Cannot read safetensors file {file}: truncated or corrupt ({error}).") from error
    return keys


def _base_license(source: _Source) -> str | None:
    readme = source.folder / "README.md"
    if readme.is_file() and source.gguf_file is None:
        try:
            from huggingface_hub import ModelCard

            value = ModelCard.load(readme).data.to_dict().get("license")
            if value:
                return value
        except Exception:
            pass
    if source.gguf_file is not None:
        try:
            from gguf import GGUFReader

            reader = GGUFReader(str(source.folder / source.gguf_file))
            field_ = reader.fields.get("general.license")
            if field_ is not None:
                return bytes(field_.parts[field_.data[0]]).decode()
        except Exception:
            pass
    return None


# --------------------------------------------------------------------------------------------------------------------
# geometry


def _check_space(output_dir: Path, source: _Source, base_config, dtype, table_params: int, max_bytes: int) -> None:
    """Log the planned size and file count; refuse a plan that does not fit the free disk space or would write an
    unreasonable number of shard files."""
    base_files = [source.folder / source.gguf_file] if source.gguf_file else _source_shards(source.folder)
    stored = dtype or getattr(base_config, "dtype", None)
    itemsize = torch.empty(0, dtype=stored if isinstance(stored, torch.dtype) else torch.float32).element_size()
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


def _clean_tokenizer_config(path: Path) -> None:
    """Drop the loading flags of this machine (`is_local`, `local_files_only`) that `save_pretrained` records."""
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        if [config.pop(key) for key in LOCAL_TOKENIZER_KEYS if key in config]:
            path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGBT]?)B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"Cannot parse size {text!r} (use e.g. 2GB, 500MB or a byte count).")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


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
            budget = float(match.group(1)) * _UNITS[match.group(2).upper()]
            if not match.group(2):  # a plain number string: rows per head
                base = int(budget)
            else:
                base = int(budget // (n_layers * n_orders * n_heads * head_dim))
        else:
            raise ValueError(f"Cannot parse table_rows {table_rows!r} (int rows, '5x' of V', or a budget like '2B').")
    if base <= 1:
        raise ValueError(f"Engram table size must be positive (got {base} rows per head from table_rows={table_rows!r}).")
    return base


# --------------------------------------------------------------------------------------------------------------------
# writing


def _header_entry_size(name: str, dtype: torch.dtype, shape) -> int:
    """Upper bound of the bytes a tensor's entry takes in a safetensors header (data offsets of up to 20 digits)."""
    entry = {name: {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [2**64 - 1] * 2}}
    return len(json.dumps(entry, separators=(",", ":")))  # its braces pay for the separating comma


def _data_size(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty(0, dtype=dtype).element_size()


# length prefix, metadata and padding of every safetensors file
_FILE_OVERHEAD = 8 + len(json.dumps({"__metadata__": {"format": "pt"}}, separators=(",", ":"))) + 7


class _RowStream:
    """The rows of a stream of row chunks, handed out as consecutive runs of any length (views of the chunks)."""

    def __init__(self, chunks):
        self.chunks, self.rest = iter(chunks), None

    def take(self, count: int):
        while count > 0:
            if self.rest is None or not len(self.rest):
                self.rest = next(self.chunks, None)
                if self.rest is None:
                    raise RuntimeError("The table's row chunks ended early.")
            block, self.rest = self.rest[:count], self.rest[count:]
            count -= len(block)
            yield block


class _ShardWriter:
    """Writes safetensors shards of at most `max_bytes` each, header included, streaming tensor data to disk.

    `add` queues a tensor for the current shard (one larger than a shard gets a shard of its own, as in transformers).
    `add_table` streams a table from its row chunks into shards of its own: whole where it fits in one, else as row
    slices `<name>.part.<i>`, one per shard, which `from_pretrained` reassembles (`EngramTablePartsConverter`).
    """

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.pending_bytes = _FILE_OVERHEAD
        self.shards: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
        self.total_bytes = 0
        self.total_params = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = _header_entry_size(name, tensor.dtype, tensor.shape) + _data_size(tensor.dtype, tensor.shape)
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.append((name, tensor))
        self.pending_bytes += size
        self.total_bytes += _data_size(tensor.dtype, tensor.shape)
        self.total_params += tensor.numel()

    def flush(self) -> None:
        if self.pending:
            self._write([(name, t.dtype, tuple(t.shape)) for name, t in self.pending], [t for _, t in self.pending])
            self.pending, self.pending_bytes = [], _FILE_OVERHEAD

    def add_table(self, name: str, rows: int, dim: int, dtype: torch.dtype, chunks) -> None:
        """Write the `[rows, dim]` table `name` from an iterator of row chunks, whole or as row slices."""
        self.flush()
        stream, room = _RowStream(chunks), self.max_bytes - _FILE_OVERHEAD
        if _header_entry_size(name, dtype, (rows, dim)) + _data_size(dtype, (rows, dim)) <= room:
            self._write([(name, dtype, (rows, dim))], stream.take(rows))
        else:
            header = _header_entry_size(f"{name}.part.{rows}", dtype, (rows, dim))  # bounds every part's entry
            part_rows = (room - header) // _data_size(dtype, (1, dim))
            if part_rows < 1:
                raise ValueError(f"max_shard_size ({self.max_bytes} bytes) cannot hold one row of {name}.")
            for i, start in enumerate(range(0, rows, part_rows)):
                count = min(part_rows, rows - start)
                self._write([(f"{name}.part.{i}", dtype, (count, dim))], stream.take(count))
        self.total_bytes += _data_size(dtype, (rows, dim))
        self.total_params += rows * dim

    def _write(self, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], blocks) -> None:
        """One shard file: the header of `entries` (name, dtype, shape), then their data from consecutive `blocks`."""
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in entries:
            size = _data_size(dtype, shape)
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        file_name, written = f"shard-{len(self.shards):05d}.tmp.safetensors", 0
        with open(self.folder / file_name, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for block in blocks:
                data = block.detach().contiguous().reshape(-1).view(torch.uint8)
                out.write(data.numpy())
                written += data.numel()
        if written != offset:
            raise RuntimeError(f"Shard {file_name}: wrote {written} bytes of data, expected {offset}.")
        self.shards.append((file_name, [name for name, _, _ in entries]))

    def finish(self) -> list[str]:
        """Rename the shards to `model-0000i-of-0000n.safetensors` and write `model.safetensors.index.json`."""
        self.flush()
        n, weight_map, names = len(self.shards), {}, []
        for i, (tmp, keys) in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            names.append(final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"total_size": self.total_bytes, "total_parameters": self.total_params},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _init_engram_layer(model_class, config, layer_idx: int) -> EngramLayer:
    """One Engram layer built alone (table on the meta device), every other part with the model's graft init."""
    with torch.device("meta"):
        layer = EngramLayer(config, layer_idx, 1)
    initializer = model_class.__new__(model_class)  # only `config` is used by `_init_weights`
    object.__setattr__(initializer, "config", config)
    for name, module in layer.named_modules():
        if name == "table":
            continue
        module.to_empty(device="cpu", recurse=False)

    def apply(module):  # children before parents, like PreTrainedModel.initialize_weights
        for child in module.children():
            if child is not layer.table:
                apply(child)
        initializer._init_weights(module)

    apply(layer)
    return layer


def _table_chunks(rows: int, dim: int, std: float, seed: int, layer_idx: int, dtype, progress: tqdm):
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer_idx)
    for start in range(0, rows, TABLE_CHUNK_ROWS):
        count = min(TABLE_CHUNK_ROWS, rows - start)
        chunk = torch.empty(count, dim, dtype=torch.float32).normal_(0.0, std, generator=generator)
        progress.update(count)
        yield chunk.to(dtype)


def _render_card(result: GraftResult, source: _Source, config, license_: str | None, base_model: str | None,
                 dtype: torch.dtype, command: str) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license_,
        tags=["engram", "conditional-memory", "custom_code", result.family, "text-generation"],
    )
    kwargs = dict(
        model_name=result.output_dir.name,
        base_label=base_model or source.label,
        family=result.family,
        model_type=config.model_type,
        layer_ids=result.layer_ids,
        num_layers=config.num_hidden_layers,
        max_ngram_size=config.engram_max_ngram_size,
        n_head_per_ngram=config.engram_n_head_per_ngram,
        n_embed_per_ngram=config.engram_n_embed_per_ngram,
        head_dim=config.engram_n_embed_per_ngram // config.engram_n_head_per_ngram,
        engram_vocab_size=result.engram_vocab_size,
        table_rows=result.table_rows,
        use_short_conv=config.engram_use_short_conv,
        kernel_size=config.engram_kernel_size,
        seed=config.engram_seed,
        vocab_size=result.vocab_size,
        compressed_vocab_size=result.compressed_vocab_size,
        reduction=f"{result.reduction:.1%}",
        base_parameters=f"{result.base_parameters:,}",
        engram_parameters=f"{result.engram_parameters:,}",
        table_parameters=f"{result.table_parameters:,}",
        total_parameters=f"{result.base_parameters + result.engram_parameters:,}",
        dtype=str(dtype).replace("torch.", ""),
        command=command,
    )
    return str(ModelCard.from_template(data, template_path=str(CARD_TEMPLATE), **kwargs))


# --------------------------------------------------------------------------------------------------------------------
# public entry point


def graft(
    base: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    layer_ids: list[int] | None = None,
    max_ngram_size: int = 3,
    n_head_per_ngram: int = 8,
    n_embed_per_ngram: int | None = 512,
    embed_per_head: int | None = None,
    table_rows: int | str | None = None,
    short_conv: bool = True,
    kernel_size: int = 4,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "2GB",
    seed: int = 0,
    overwrite: bool = False,
    clean: bool = False,
    verify: bool = True,
    base_model: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> GraftResult:
    """Graft Engram onto `base` and write a complete Hub repository folder to `output_dir`.

    Args:
        base: a local folder (config.json + safetensors, sharded or not), a `.gguf` file, or a Hub id resolved with
            `snapshot_download` (works offline from the cache).
        output_dir: the folder to create; written under a temporary name next to it and renamed at the end.
        layer_ids: 0-based decoder layers that get Engram (default: 1 and half depth).
        max_ngram_size, n_head_per_ngram, n_embed_per_ngram: table geometry (design §2-§3); `embed_per_head`
            sets `n_embed_per_ngram = n_head_per_ngram * embed_per_head` instead.
        table_rows: rows of each head's table: None (5 x V'), an int, `"Nx"` (N x V'), or a parameter budget for all
            tables together such as `"2B"` or `"300M"`.
        short_conv: whether the dilated ShortConv is present.
        dtype: dtype of the output (default: the base's tensors as stored; float32 for a GGUF source).
        max_shard_size: shard size of the output; no shard holding an Engram table exceeds it (a larger table is split
            into row slices), others only where a single base tensor is larger.
        seed: seed of the hash multipliers and the table init.
        overwrite: replace an existing `output_dir` if it is a previous engram-hf output (otherwise
            `FileExistsError`); never the base's folder, the current folder or a parent of either.
        clean: remove the temporary folders that killed conversions into `output_dir` left behind (otherwise they
            are reported).
        verify: reload the output with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` and check
            that its logits on a probe prompt equal the base model's exactly.
        base_model: Hub id written as `base_model` in the card (default: the Hub id of `base`, if it was one).
        revision, cache_dir: for a Hub id.

    Returns:
        A `GraftResult` with the output folder, geometry and parameter counts.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    output_dir = Path(output_dir).expanduser().resolve()
    guard = GuardedOutput(output_dir, overwrite, clean=clean)  # fail fast: existing output, current folder, leftovers
    max_bytes = _parse_size(max_shard_size)
    if max_bytes <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}.")
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"Unknown dtype {dtype!r}.")
        dtype = getattr(torch, name)
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise ValueError(f"Unsupported output dtype {dtype}: choose one of "
                         f"{', '.join(str(d).replace('torch.', '') for d in OUTPUT_DTYPES)}.")

    # ---- everything that can fail on bad input is checked before anything is written
    source = _resolve_source(base, revision, cache_dir)
    guard.protect(source.folder)
    gguf_kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        base_config = AutoConfig.from_pretrained(source.folder, **gguf_kwargs)
    except Exception as error:
        raise ValueError(f"Cannot read the base model's config from {source.label}: {error}") from error
    family = base_config.model_type
    if family not in FAMILIES:
        raise ValueError(
            f"Unsupported base model family {family!r}; supported: {', '.join(sorted(FAMILIES))}."
        )
    config_class, model_class = FAMILIES[family]
    num_layers = base_config.num_hidden_layers
    layer_ids = sorted({1 % num_layers, num_layers // 2}) if layer_ids is None else [int(i) for i in layer_ids]
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
    shard_keys = None
    if source.gguf_file is None:
        shard_keys = _scan_safetensors(_source_shards(source.folder))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **gguf_kwargs)
    except Exception as error:
        raise ValueError(f"No usable tokenizer found with the base model {source.label}: the compression map is "
                         f"built from it ({type(error).__name__}: {error}).") from error
    if tokenizer is None or not hasattr(tokenizer, "batch_decode") or len(tokenizer) < 2 or not tokenizer(
        PROBE_PROMPT
    )["input_ids"]:
        raise ValueError(f"No usable tokenizer found with the base model {source.label} (tokenizer files missing?): "
                         "the compression map is built from it.")
    if isinstance(table_rows, int):  # fail before the (slow) compression map
        _table_base_size(table_rows, 1, 1, 1, 1, 1)
    compression_map, compressed_vocab = build_compression_map(tokenizer)
    base_vocab = _table_base_size(table_rows, compressed_vocab, len(layer_ids), max_ngram_size - 1,
                                  n_head_per_ngram, head_dim)

    base_dict = base_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        base_dict.pop(key, None)
    config = config_class(
        **base_dict,
        engram_layer_ids=layer_ids,
        engram_max_ngram_size=max_ngram_size,
        engram_n_embed_per_ngram=n_embed_per_ngram,
        engram_n_head_per_ngram=n_head_per_ngram,
        engram_vocab_size=[base_vocab] * (max_ngram_size - 1),
        engram_kernel_size=kernel_size,
        engram_seed=seed,
        engram_compressed_vocab_size=compressed_vocab,
        engram_map_size=len(tokenizer),
        engram_use_short_conv=short_conv,
    )
    module = model_class.__module__.rsplit(".", 1)[-1]
    config.architectures = [model_class.__name__]
    config.auto_map = {
        "AutoConfig": f"configuration_engram.{config_class.__name__}",
        **{auto: f"{module}.{name}" for auto, name in model_class.engram_auto_classes.items()},
    }
    hasher = NgramHasher.from_config(config, compression_map=compression_map)
    table_rows_per_layer = {i: hasher.rows_per_layer(i) for i in layer_ids}
    _check_space(output_dir, source, base_config, dtype, sum(table_rows_per_layer.values()) * head_dim, max_bytes)

    # ---- write into a temporary folder next to the output; nothing under the output name until the end
    base_model_obj = None
    with guard as tmp:
        writer = _ShardWriter(tmp, max_bytes)
        out_dtype = dtype
        if source.gguf_file is not None:  # transformers dequantizes GGUF as a whole
            from transformers import AutoModelForCausalLM

            out_dtype = dtype or torch.float32
            base_model_obj = AutoModelForCausalLM.from_pretrained(
                source.folder, config=base_config, dtype=out_dtype, **gguf_kwargs
            )
            state = base_model_obj.state_dict()
            if getattr(base_config, "tie_word_embeddings", False):
                state.pop("lm_head.weight", None)
            for name in tqdm(list(state), desc="copy base tensors", disable=not progress):
                writer.add(name, state[name].to(out_dtype) if state[name].is_floating_point() else state[name])
            del state
        else:
            from safetensors import safe_open

            for file, keys in tqdm(shard_keys.items(), desc="copy base shards", disable=not progress):
                try:
                    with safe_open(str(file), framework="pt") as handle:
                        for key in keys:
                            tensor = handle.get_tensor(key)
                            if dtype is not None and tensor.is_floating_point():
                                tensor = tensor.to(dtype)
                            out_dtype = out_dtype or (tensor.dtype if tensor.is_floating_point() else None)
                            writer.add(key, tensor)
                except Exception as error:
                    raise ValueError(f"Cannot read safetensors file {file}: truncated or corrupt ({error}).") from error
            out_dtype = out_dtype or torch.float32
        base_params = writer.total_params
        config.dtype = out_dtype

        # Engram parameters: the layer modules built alone with their graft init, then the tables, generated in row
        # chunks and streamed to shards of their own (memory stays flat whatever the table and shard sizes)
        std = getattr(config, "initializer_range", 0.02) or 0.02
        engram_params = table_params = 0
        writer.add("model.engram_hasher.compression_map", hasher.compression_map)
        writer.add("model.engram_hasher.geometry", hasher.geometry)
        layers = {layer_idx: _init_engram_layer(model_class, config, layer_idx) for layer_idx in layer_ids}
        for layer_idx, layer in layers.items():
            for name, tensor in layer.state_dict().items():
                if not name.startswith("table."):
                    writer.add(f"model.layers.{layer_idx}.engram.{name}",
                               tensor.to(out_dtype) if tensor.is_floating_point() else tensor)
                    engram_params += tensor.numel()
        total_rows = sum(table_rows_per_layer.values())
        with tqdm(total=total_rows, desc="Engram tables", unit="row", unit_scale=True, disable=not progress) as bar:
            for layer_idx, layer in layers.items():
                rows = table_rows_per_layer[layer_idx]
                chunks = _table_chunks(rows, layer.head_dim, std, seed, layer_idx, out_dtype, bar)
                writer.add_table(f"model.layers.{layer_idx}.engram.table.weight", rows, layer.head_dim, out_dtype,
                                 chunks)
                engram_params += rows * layer.head_dim
                table_params += rows * layer.head_dim
        shards = writer.finish()

        config.save_pretrained(tmp)
        try:
            generation_config = GenerationConfig.from_pretrained(source.folder)
        except Exception:
            generation_config = GenerationConfig.from_model_config(base_config)
        generation_config.save_pretrained(tmp)
        for file in sorted(MODELING_DIR.glob("*.py")):
            if file.name != "__init__.py":
                shutil.copy(file, tmp / file.name)
        tokenizer.save_pretrained(tmp)
        _clean_tokenizer_config(tmp / "tokenizer_config.json")

        result = GraftResult(
            output_dir=output_dir, family=family, layer_ids=layer_ids, vocab_size=len(tokenizer),
            compressed_vocab_size=compressed_vocab, engram_vocab_size=list(config.engram_vocab_size),
            table_rows=table_rows_per_layer, base_parameters=base_params, engram_parameters=engram_params,
            table_parameters=table_params, shards=shards,
        )
        command = f"engram-hf convert {source.hub_id or source.label} {output_dir.name}" + "".join(
            [f" --layers {','.join(map(str, layer_ids))}", f" --max-ngram-size {max_ngram_size}",
             f" --heads {n_head_per_ngram}", f" --embed-per-ngram {n_embed_per_ngram}",
             f" --table-rows {table_rows}" if table_rows is not None else "", "" if short_conv else " --no-short-conv",
             f" --seed {seed}"])
        card = _render_card(result, source, config, _base_license(source), base_model or source.hub_id, out_dtype,
                            command)
        (tmp / "README.md").write_text(card, encoding="utf-8")

        if verify:
            result.max_abs_diff = _verify(tmp, source, gguf_kwargs, out_dtype, tokenizer, base_model_obj)

        guard.commit()
        return result


def load_remote_code(folder: str | os.PathLike, auto_class: str = "AutoModelForCausalLM", **kwargs):
    """Load a converted folder with its own remote-code files (its `auto_map[auto_class]` class), as a user without
    engram_hf would; `AutoModel*.from_pretrained` would prefer engram_hf's in-process registrations instead."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    auto_map = json.loads((Path(folder) / "config.json").read_text())["auto_map"]
    return get_class_from_dynamic_module(auto_map[auto_class], folder).from_pretrained(folder, **kwargs)


def _verify(folder: Path, source: _Source, gguf_kwargs: dict, dtype, tokenizer, base_model=None) -> float:
    """Reload the graft through its remote code and compare its probe-prompt logits with the base model's."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # one bar per phase: no loading bars of the check's two loads
    try:
        if base_model is None:
            base_model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, **gguf_kwargs)
        grafted, info = load_remote_code(folder, dtype=dtype, output_loading_info=True)
    finally:
        if shown:
            transformers_logging.enable_progress_bar()
    if not type(grafted).__module__.startswith("transformers_modules"):
        raise RuntimeError(f"Verification loaded {type(grafted).__module__}, not the checkpoint's remote code.")
    problems = {kind: sorted(map(str, keys)) for kind, keys in info.items() if keys}
    if problems:  # e.g. a table left at its random init would pass the logit check (its value path is zero)
        raise ValueError(f"Verification failed: the output does not load cleanly: {problems}")
    ids = torch.tensor([tokenizer(PROBE_PROMPT)["input_ids"]])
    base_model.eval(), grafted.eval()
    with torch.no_grad():
        expected = base_model(ids).logits
        got = grafted(ids).logits
    diff = float((expected.float() - got.float()).abs().max())
    logger.info("verify: max |logits(grafted) - logits(base)| = %.3g on a %d-token probe prompt", diff, ids.shape[1])
    if diff != 0.0 or not torch.equal(expected, got):
        raise ValueError(f"Verification failed: the grafted model's logits differ from the base's (max abs diff {diff}).")
    return diff
