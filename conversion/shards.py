"""A streaming safetensors writer: shards of bounded size, tables written from row chunks (never whole in memory)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..modeling.mmap_engram import SAFETENSORS_DTYPES, TABLE_ALIGNMENT, rows_per_part, write_safetensors


def _header_entry_size(name: str, dtype: torch.dtype, shape) -> int:
    """Upper bound of the bytes a tensor's entry takes in a safetensors header (data offsets of up to 20 digits)."""
    entry = {name: {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [2**64 - 1] * 2}}
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


class ShardWriter:
    """Writes safetensors shards of at most `max_bytes` each, header included, streaming tensor data to disk.

    `add` queues a tensor for the current shard (one larger than a shard gets a shard of its own, as in transformers).
    `add_table` streams a table from its row chunks into shards of its own: whole where it fits in one, else as row
    slices `<name>.part.<i>`, one per shard, which `from_pretrained` maps back into one table (`EngramTablePartsConverter`).
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
            # aligned slices (data at a multiple of TABLE_ALIGNMENT, after a padded header) load as one memory map;
            # shards too small for one aligned run of rows get packed slices, which load as a copy
            row_bytes = _data_size(dtype, (1, dim))
            part_rows = rows_per_part(row_bytes, self.max_bytes - TABLE_ALIGNMENT)
            align = part_rows > 0
            if not align:
                header = _header_entry_size(f"{name}.part.{rows}", dtype, (rows, dim))  # bounds every part's entry
                part_rows = (room - header) // row_bytes
            if part_rows < 1:
                raise ValueError(f"max_shard_size ({self.max_bytes} bytes) cannot hold one row of {name}.")
            for i, start in enumerate(range(0, rows, part_rows)):
                count = min(part_rows, rows - start)
                self._write([(f"{name}.part.{i}", dtype, (count, dim))], stream.take(count), align)
        self.total_bytes += _data_size(dtype, (rows, dim))
        self.total_params += rows * dim

    def _write(self, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], blocks, align: bool = False) -> None:
        """One shard file of `entries` (name, dtype, shape), data from consecutive `blocks` (see `write_safetensors`)."""
        file_name = f"shard-{len(self.shards):05d}.tmp.safetensors"
        write_safetensors(self.folder / file_name, entries, blocks, align)
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
