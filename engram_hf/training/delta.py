"""Engram-only deltas: the tables and Engram layers of a fine-tuned model, applicable to the converted base."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from huggingface_hub import load_state_dict_from_file, save_torch_state_dict
from safetensors import safe_open
from torch import nn

DELTA_PATTERN = "engram_delta{suffix}.safetensors"
DELTA_INDEX = "engram_delta.safetensors.index.json"
DELTA_SINGLE = "engram_delta.safetensors"
# config fields that fix the meaning of every Engram weight (table geometry, hashing, compression)
_GEOMETRY_FIELDS = (
    "hidden_size",
    "engram_layer_ids",
    "engram_max_ngram_size",
    "engram_n_embed_per_ngram",
    "engram_n_head_per_ngram",
    "engram_vocab_size",
    "engram_seed",
    "engram_compressed_vocab_size",
    "engram_map_size",
    "engram_hc_mult",
    "engram_use_short_conv",
    "engram_proj_bias",
)


def _unwrap(model: nn.Module) -> nn.Module:
    """The Engram `*ForCausalLM` inside a peft wrapper (or `model` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _geometry(model: nn.Module) -> dict:
    config = _unwrap(model).config
    return {name: getattr(config, name) for name in _GEOMETRY_FIELDS}


def engram_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every Engram parameter (`*.engram.*`: tables, projections, norms, conv), keyed as in the plain model.

    Engram layers that LoRA wraps too (`target_modules="all-linear"`) keep their weight under `.base_layer.`: it is
    keyed by the plain name, so a delta applies to the plain and to the wrapped model alike.
    """
    return {
        name.replace(".base_layer.", "."): param.detach()
        for name, param in _unwrap(model).named_parameters()
        if ".engram." in name and "lora_" not in name
    }


def save_engram_delta(model: nn.Module, save_directory: str | os.PathLike, max_shard_size: int | str = "2GB") -> None:
    """Write the Engram parameters of `model` (plain or peft-wrapped) as `engram_delta*.safetensors` into a folder.

    The file metadata records the Engram geometry, which `apply_engram_delta` checks. Written atomically: the files
    appear only once complete.
    """
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "engram_geometry": json.dumps(_geometry(model), sort_keys=True)}
    with tempfile.TemporaryDirectory(dir=save_directory, prefix=".engram_delta-") as staging:
        save_torch_state_dict(
            {k: v.contiguous() for k, v in engram_state_dict(model).items()},
            staging,
            filename_pattern=DELTA_PATTERN,
            max_shard_size=max_shard_size,
            metadata=metadata,
        )
        for old in save_directory.glob("engram_delta*.safetensors*"):
            old.unlink()
        for file in sorted(Path(staging).iterdir(), key=lambda f: f.name.endswith(".json")):  # index last
            os.replace(file, save_directory / file.name)


def _delta_files(directory: Path) -> list[Path]:
    if (directory / DELTA_INDEX).is_file():
        index = json.loads((directory / DELTA_INDEX).read_text())
        return [directory / name for name in sorted(set(index["weight_map"].values()))]
    if (directory / DELTA_SINGLE).is_file():
        return [directory / DELTA_SINGLE]
    raise FileNotFoundError(f"No Engram delta ({DELTA_SINGLE} or {DELTA_INDEX}) in {directory}.")


def has_engram_delta(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return (directory / DELTA_INDEX).is_file() or (directory / DELTA_SINGLE).is_file()


@torch.no_grad()
def apply_engram_delta(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Copy a saved Engram delta into `model` (the converted base, plain or peft-wrapped); returns `model`.

    Raises `ValueError` if the delta was made for another Engram geometry or does not cover exactly the model's
    Engram parameters.
    """
    directory = Path(directory)
    files = _delta_files(directory)
    if (directory / DELTA_INDEX).is_file():  # sharded: the metadata is in the index, not in the shards
        metadata = json.loads((directory / DELTA_INDEX).read_text()).get("metadata") or {}
    else:
        with safe_open(files[0], framework="pt") as handle:
            metadata = handle.metadata() or {}
    saved = json.loads(metadata.get("engram_geometry", "null"))
    if saved is None:
        raise ValueError(f"The Engram delta in {directory} records no Engram geometry (not from save_engram_delta).")
    expected = _geometry(model)
    if saved != json.loads(json.dumps(expected)):
        diff = {k: (saved.get(k), expected[k]) for k in expected if saved.get(k) != expected[k]}
        raise ValueError(f"The Engram delta in {directory} was made for another Engram geometry (delta, model): {diff}.")
    params = engram_state_dict(model)
    shapes = {}  # checked before anything is copied: a bad delta leaves the model untouched
    for file in files:
        with safe_open(file, framework="pt") as handle:
            shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
    if unknown := sorted(set(shapes) - set(params)):
        raise ValueError(f"The Engram delta holds {unknown}, which the model does not have.")
    if missing := sorted(set(params) - set(shapes)):
        raise ValueError(f"The Engram delta in {directory} lacks {missing}.")
    if wrong := {n: (s, tuple(params[n].shape)) for n, s in shapes.items() if s != params[n].shape}:
        raise ValueError(f"The Engram delta in {directory} has other shapes (delta, model): {wrong}.")
    for file in files:
        for name, tensor in load_state_dict_from_file(file).items():
            params[name].copy_(tensor)
    return model

