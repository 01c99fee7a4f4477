"""The base checkpoint of a conversion: a local folder, a `.gguf` file or a Hub id, with its weights."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm


@dataclass
class BaseSource:
    """Where the base checkpoint is: a folder (with `gguf_file` in it for a GGUF), and how to name it."""

    folder: Path
    gguf_file: str | None
    hub_id: str | None
    label: str

    @property
    def load_kwargs(self) -> dict:
        """Keyword arguments of `from_pretrained(self.folder, ...)` for this checkpoint."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(base: str | os.PathLike, revision: str | None, cache_dir: str | None) -> BaseSource:
    path = Path(base).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"Base model file {path} is not a .gguf file; pass a folder with config.json instead.")
        return BaseSource(path.parent.resolve(), path.name, None, path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return BaseSource(path.resolve(), None, None, path.resolve().name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return BaseSource(path.resolve(), ggufs[0].name, None, ggufs[0].name)
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
        return BaseSource(Path(folder), None, str(base), str(base))
    raise FileNotFoundError(f"Base model {base!r} is neither a local folder, a .gguf file, nor a Hub id (org/name).")


def source_shards(folder: Path) -> list[Path]:
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
        raise ValueError(f"{folder} holds no safetensors weights (model.safetensors or an index).")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"Safetensors shards listed in {index.name} are missing from {folder}: {missing}")
    return files


def scan_safetensors(files: list[Path]) -> dict[Path, list[str]]:
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


def base_license(source: BaseSource) -> str | None:
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


_STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def stored_float_dtype(shard_keys: dict[Path, list[str]] | None) -> torch.dtype:
    """The dtype the base's floating weights are stored in, from its scanned safetensors shards (`None`: a GGUF, which
    transformers dequantizes to float32)."""
    from safetensors import safe_open

    for file, keys in (shard_keys or {}).items():
        with safe_open(str(file), framework="pt") as handle:
            for key in keys:
                stored = _STORED_DTYPES.get(handle.get_slice(key).get_dtype())
                if stored is not None:
                    return stored
    return torch.float32


def load_base_weights(
    source: BaseSource, base_config, shard_keys: dict[Path, list[str]] | None, dtype: torch.dtype | None, progress: bool
):
    """`(tensors, model)`: an iterator of every base weight's `(name, tensor)`, floating ones cast to `dtype` (None:
    as stored; float32 for a GGUF), read shard by shard from the scanned safetensors `shard_keys` (never the whole
    model in memory; `model` is None); or, for a GGUF, from the model transformers dequantizes as a whole (returned,
    so the verification can reuse it)."""
    if source.gguf_file is not None:
        from transformers import AutoModelForCausalLM

        dtype = dtype or torch.float32
        model = AutoModelForCausalLM.from_pretrained(source.folder, config=base_config, dtype=dtype,
                                                     **source.load_kwargs)
        state = model.state_dict()
        if getattr(base_config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        names = tqdm(list(state), desc="copy base tensors", disable=not progress)
        tensors = ((name, state[name].to(dtype) if state[name].is_floating_point() else state[name]) for name in names)
        return tensors, model
    return _safetensors_weights(shard_keys, dtype, progress), None


def _safetensors_weights(shard_keys: dict[Path, list[str]], dtype: torch.dtype | None, progress: bool) -> Iterator:
    from safetensors import safe_open

    for file, keys in tqdm(shard_keys.items(), desc="copy base shards", disable=not progress):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in keys:
                    tensor = handle.get_tensor(key)
                    yield key, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        except Exception as error:
            raise ValueError(f"Cannot read safetensors file {file}: truncated or corrupt ({error}).") from error
