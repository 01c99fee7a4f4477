"""Engram tables larger than RAM (design §6): a table stored as row slices loads as one memory map over its shards.

A table bigger than a shard is stored as row slices `...engram.table.weight.part.<i>`, one per safetensors file, each
file's data starting at a multiple of `TABLE_ALIGNMENT` bytes and each slice but the last a multiple of it long. At
load, safetensors maps every file privately; `map_rows` finds the file region behind each slice and maps those regions
back to back into one reserved address range, so the whole table is one ordinary CPU tensor whose pages are read from
disk only when a lookup touches them (and written, if training changes a row, to private memory, never to the file).
Elsewhere than Linux, or for slices not laid out so, the caller copies the slices into one tensor instead.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
import sys
from pathlib import Path

import torch
from transformers.utils import logging

logger = logging.get_logger("engram_hf.mmap")

# data of every table slice starts at, and every slice but the last spans, a multiple of this (any common page size)
TABLE_ALIGNMENT = 1 << 16

_PROT_NONE, _MAP_FIXED = 0, 0x10  # the same values on Linux and macOS; Python's mmap module lacks them
_MAP_NORESERVE = 0x4000  # Linux: no commit charge for a private mapping of a file larger than RAM

SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def rows_per_part(row_bytes: int, max_data_bytes: int) -> int:
    """The most rows of `row_bytes` in `max_data_bytes` that span a multiple of `TABLE_ALIGNMENT` bytes (0: none fit)."""
    step = TABLE_ALIGNMENT // math.gcd(TABLE_ALIGNMENT, row_bytes)  # rows per aligned run
    return max_data_bytes // row_bytes // step * step


def write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], blocks, align: bool = False):
    """One safetensors file: the header of `entries` (name, dtype, shape), then their data from consecutive `blocks`.

    With `align`, the header is padded with spaces so that the data starts at a multiple of `TABLE_ALIGNMENT` bytes.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % (TABLE_ALIGNMENT if align else 8))
    written = 0
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for block in blocks:
            data = block.detach().contiguous().reshape(-1).view(torch.uint8)
            out.write(data.numpy())
            written += data.numel()
    if written != offset:
        raise RuntimeError(f"Shard {path.name}: wrote {written} bytes of data, expected {offset}.")


def _file_regions(addresses: list[int]) -> list[tuple[str, int] | None]:
    """(file, offset) of the private file mapping behind each address, from `/proc/self/maps` (None: none)."""
    regions: list[tuple[str, int] | None] = [None] * len(addresses)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or not fields[5].startswith("/"):
                continue
            start, end = (int(value, 16) for value in fields[0].split("-"))
            for i, address in enumerate(addresses):
                if start <= address < end:
                    regions[i] = (fields[5].rstrip("\n"), int(fields[2], 16) + address - start)
    return regions


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _check(address: int | None) -> int:
    if address is None or address == ctypes.c_void_p(-1).value:
        error = ctypes.get_errno()
        raise OSError(error, f"mmap of an Engram table failed: {os.strerror(error)}")
    return address


def map_rows(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """One CPU tensor over consecutive row slices `parts` (each `[n_i, ...]`), mapped from their files without a copy.

    Returns None unless every slice is a contiguous view of a file mapping at an offset that is a multiple of the page
    size and every slice but the last spans a multiple of it (as `write_safetensors(..., align=True)` lays them out).
    """
    page = mmap.PAGESIZE
    if not sys.platform.startswith("linux") or not parts:
        return None
    first = parts[0]
    if any(
        p.device.type != "cpu" or not p.is_contiguous() or p.dtype != first.dtype or p.shape[1:] != first.shape[1:]
        for p in parts
    ):
        return None
    sizes = [p.numel() * p.element_size() for p in parts]
    regions = _file_regions([p.data_ptr() for p in parts])
    if any(r is None or r[1] % page for r in regions) or any(size % page for size in sizes[:-1]):
        return None
    libc, total = _libc(), sum(sizes)
    reserved = -(-total // page) * page
    base = _check(libc.mmap(None, reserved, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                            -1, 0))
    start = 0
    try:
        for (path, offset), size in zip(regions, sizes):
            fd = os.open(path, os.O_RDONLY)
            try:
                flags = mmap.MAP_PRIVATE | _MAP_FIXED | _MAP_NORESERVE
                _check(libc.mmap(base + start, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, offset))
            finally:
                os.close(fd)
            start += size
    except OSError as error:  # e.g. a shard deleted or replaced since safetensors opened it: copy instead
        libc.munmap(base, reserved)
        logger.warning(f"An Engram table could not be memory-mapped ({error}); it is loaded as a copy in RAM.")
        return None
    except BaseException:
        libc.munmap(base, reserved)
        raise
    region = type("EngramMappedTable", (ctypes.c_uint8 * reserved,), {"__del__": lambda self: libc.munmap(base, reserved)})
    data = torch.frombuffer(region.from_address(base), dtype=torch.uint8)[:total]
    return data.view(first.dtype).view(sum(len(p) for p in parts), *first.shape[1:])


def save_table_parts(folder: Path, tables: dict[str, torch.Tensor], max_bytes: int) -> None:
    """Add `tables` (name -> `[rows, dim]`), each larger than `max_bytes`, to the safetensors checkpoint in `folder` as
    aligned row slices `<name>.part.<i>`, one per file, and list them in its weight index (written if it had none)."""
    index_file, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index_file.exists():
        index = json.loads(index_file.read_text())
    else:  # one shard, saved without an index: renamed so that the index is what loads
        with open(single, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        keys = [key for key in header if key != "__metadata__"]
        os.replace(single, folder / "model-00001-of-00001.safetensors")
        index = {"metadata": {}, "weight_map": dict.fromkeys(keys, "model-00001-of-00001.safetensors")}
    slices = []
    for name, table in tables.items():
        row_bytes = table[0].numel() * table.element_size()
        part_rows = max(rows_per_part(row_bytes, max_bytes - TABLE_ALIGNMENT), rows_per_part(row_bytes, TABLE_ALIGNMENT))
        slices += [(f"{name}.part.{i}", table[start : start + part_rows])
                   for i, start in enumerate(range(0, len(table), part_rows))]
    for number, (key, rows) in enumerate(slices, 1):
        file_name = f"model-engram-tables-{number:05d}-of-{len(slices):05d}.safetensors"
        write_safetensors(folder / file_name, [(key, rows.dtype, tuple(rows.shape))], [rows], align=True)
        index["weight_map"][key] = file_name
    metadata = index.setdefault("metadata", {})
    metadata["total_size"] = metadata.get("total_size", 0) + sum(t.numel() * t.element_size() for t in tables.values())
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
