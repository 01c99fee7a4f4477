"""Graft Engram conditional memory onto a pretrained Llama / Qwen2 / Qwen3 checkpoint (design §4).

The grafted model starts out computing exactly what the base computes: every Engram layer gets the graft init
(value projection and ShortConv zero), so its update is exactly zero until training moves it.

Output is a complete Hub repository folder: `config.json` (with `auto_map` and the `engram_*` fields),
`generation_config.json`, sharded safetensors with `model.safetensors.index.json`, the remote-code files, the base
tokenizer and a `README.md` model card. The pieces: `source.py` (the base checkpoint and its weights), `shards.py`
(the streaming safetensors writer), `card.py` (the model card), `output.py` (the guarded output folder); `graft`
below plans, then writes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..modeling.layer_engram import EngramLayer
from ..modeling.modeling_engram import copy_remote_code
from .card import render_card
from .output import GuardedOutput
from .plan import PROBE_PROMPT, Plan, check_space, make_plan, output_dtype, parse_size
from .shards import ShardWriter
from .source import BaseSource, load_base_weights, resolve_source

TABLE_CHUNK_ROWS = 1 << 16  # rows generated at once (fixed, so the table values do not depend on the shard size)
LOCAL_TOKENIZER_KEYS = ("is_local", "local_files_only")
logger = logging.getLogger(__name__)


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


def _clean_tokenizer_config(path: Path) -> None:
    """Drop the loading flags of this machine (`is_local`, `local_files_only`) that `save_pretrained` records."""
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        if [config.pop(key) for key in LOCAL_TOKENIZER_KEYS if key in config]:
            path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write(folder: Path, plan: Plan, dtype, max_bytes: int, seed: int, progress: bool):
    """Weights (base tensors, Engram layers, streamed tables), config, generation config, remote code and tokenizer
    into `folder`; returns the `GraftResult` (without the card's fields) and the GGUF base model, if one was loaded."""
    from transformers import GenerationConfig

    writer, config, out_dtype = ShardWriter(folder, max_bytes), plan.config, plan.out_dtype
    tensors, base_model = load_base_weights(plan.source, plan.base_config, plan.shard_keys, dtype, progress)
    for name, tensor in tensors:
        writer.add(name, tensor)
    base_params = writer.total_params
    # Engram parameters: the layer modules built alone with their graft init, then the tables, generated in row chunks
    # and streamed to shards of their own (memory stays flat whatever the table and shard sizes)
    writer.add("model.engram_hasher.compression_map", plan.hasher.compression_map)
    writer.add("model.engram_hasher.geometry", plan.hasher.geometry)
    layers = {i: _init_engram_layer(plan.family.causal_lm_class, config, i) for i in plan.table_rows}
    engram_params = plan.table_parameters
    for layer_idx, layer in layers.items():
        for name, tensor in layer.state_dict().items():
            if not name.startswith("table."):
                writer.add(f"model.layers.{layer_idx}.engram.{name}",
                           tensor.to(out_dtype) if tensor.is_floating_point() else tensor)
                engram_params += tensor.numel()
    std = getattr(config, "initializer_range", 0.02) or 0.02
    with tqdm(total=sum(plan.table_rows.values()), desc="Engram tables", unit="row", unit_scale=True,
              disable=not progress) as bar:
        for layer_idx, layer in layers.items():
            rows = plan.table_rows[layer_idx]
            chunks = _table_chunks(rows, layer.head_dim, std, seed, layer_idx, out_dtype, bar)
            writer.add_table(f"model.layers.{layer_idx}.engram.table.weight", rows, layer.head_dim, out_dtype, chunks)
    shards = writer.finish()
    config.save_pretrained(folder)
    try:
        generation_config = GenerationConfig.from_pretrained(plan.source.folder)
    except Exception:
        generation_config = GenerationConfig.from_model_config(plan.base_config)
    generation_config.save_pretrained(folder)
    copy_remote_code(folder)
    plan.tokenizer.save_pretrained(folder)
    _clean_tokenizer_config(folder / "tokenizer_config.json")
    result = GraftResult(
        output_dir=folder, family=plan.base_config.model_type, layer_ids=list(plan.table_rows),
        vocab_size=len(plan.tokenizer), compressed_vocab_size=config.engram_compressed_vocab_size,
        engram_vocab_size=list(config.engram_vocab_size), table_rows=plan.table_rows, base_parameters=base_params,
        engram_parameters=engram_params, table_parameters=plan.table_parameters, shards=shards,
    )
    return result, base_model


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
    output_dir = Path(output_dir).expanduser().resolve()
    guard = GuardedOutput(output_dir, overwrite, clean=clean)  # fail fast: existing output, current folder, leftovers
    dtype, max_bytes = output_dtype(dtype), parse_size(max_shard_size)
    if max_bytes <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}.")
    # ---- everything that can fail on bad input is checked before anything is written
    source = resolve_source(base, revision, cache_dir)
    guard.protect(source.folder)
    plan = make_plan(source, dtype, layer_ids, max_ngram_size, n_head_per_ngram, n_embed_per_ngram, embed_per_head,
                 table_rows, short_conv, kernel_size, seed)
    check_space(output_dir, plan, max_bytes)
    # ---- written into a temporary folder next to the output; nothing under the output name until the end
    with guard as tmp:
        result, base_model_obj = _write(tmp, plan, dtype, max_bytes, seed, progress)
        result.output_dir = output_dir
        command = plan.command.replace(" OUTPUT", f" {output_dir.name}", 1)
        card = render_card(result, source, plan.config, base_model or source.hub_id, plan.out_dtype, command)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if verify:
            result.max_abs_diff = _verify(tmp, source, plan.out_dtype, plan.tokenizer, base_model_obj)
        guard.commit()
    return result


def load_remote_code(folder: str | os.PathLike, auto_class: str = "AutoModelForCausalLM", **kwargs):
    """Load a converted folder with its own remote-code files (its `auto_map[auto_class]` class), as a user without
    engram_hf would; `AutoModel*.from_pretrained` would prefer engram_hf's in-process registrations instead."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    auto_map = json.loads((Path(folder) / "config.json").read_text())["auto_map"]
    return get_class_from_dynamic_module(auto_map[auto_class], folder).from_pretrained(folder, **kwargs)


def _verify(folder: Path, source: BaseSource, dtype, tokenizer, base_model=None) -> float:
    """Reload the graft through its remote code and compare its probe-prompt logits with the base model's."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # one bar per phase: no loading bars of the check's two loads
    try:
        if base_model is None:
            base_model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, **source.load_kwargs)
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
