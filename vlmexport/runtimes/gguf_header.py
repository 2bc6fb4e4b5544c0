"""A bounded walk over a GGUF header, before ``gguf.GGUFReader`` parses it.

``GGUFReader`` trusts the counts in the header: past the end of the memory-mapped file its
reads return empty arrays instead of failing, so a header claiming 2^62 tensors (or an
array of 2^62 strings) makes it loop, appending to lists, until the machine runs out of
memory (found by tests/hardening/fuzz_atheris.py). This walk checks every count and length
against the bytes that remain before using it, so any header it accepts is parsed by
``GGUFReader`` in time and memory proportional to the file's size. Pure python (struct, mmap).

Layout (GGUF v2/v3, little-endian): magic, u32 version, u64 tensor count, u64 key count;
keys (string name, u32 type, value); tensor infos (string name, u32 n_dims, u64 dims,
u32 type, u64 offset). A string is a u64 length and that many bytes; an array a u32 item
type, a u64 count and the items.
"""

from __future__ import annotations

import mmap
import os
import struct

from ..core.errors import VlmexportError

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
MAX_DIMS = 8  # ggml has 4; room for a future format
MAX_ARRAY_NESTING = 2


class GGUFHeaderError(VlmexportError):
    """The header's counts or lengths do not fit the file (says what; the caller names the file)."""


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFHeaderError(f"{what} needs {n:,} bytes at offset {self.pos:,} but the file has {self.size:,}")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> None:
        n = self.u64(f"{what} length")
        self.need(n, what)
        self.pos += n

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in SCALAR_SIZES:
            self.need(SCALAR_SIZES[vtype], what)
            self.pos += SCALAR_SIZES[vtype]
        elif vtype == STRING:
            self.string(what)
        elif vtype == ARRAY and depth < MAX_ARRAY_NESTING:
            item, count = self.u32(f"{what} item type"), self.u64(f"{what} count")
            if item in SCALAR_SIZES:  # skipped in one step, after checking it fits
                self.need(count * SCALAR_SIZES[item], f"{what} ({count:,} items)")
                self.pos += count * SCALAR_SIZES[item]
                return
            self.need(count * (8 if item == STRING else 12), f"{what} ({count:,} items)")  # smallest item
            for i in range(count):
                self.value(item, f"{what}[{i}]", depth + 1)
        else:
            raise GGUFHeaderError(f"{what} has an unknown value type {vtype}")


def check_gguf_header(path: str | os.PathLike) -> None:
    """Walk the header of the GGUF file at ``path``; raise :class:`GGUFHeaderError` if any count
    or length runs past the end of the file (or the version is not 2 or 3)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise GGUFHeaderError(f"the file has {size} bytes, fewer than a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            c = _Cursor(buf, size)
            c.pos = 4  # magic, checked by the caller
            version = c.u32("version")
            if version not in (2, 3):
                raise GGUFHeaderError(f"GGUF version {version} is not one this reader knows (2, 3)")
            n_tensors, n_kv = c.u64("tensor count"), c.u64("key count")
            # each key takes at least 8 + 4 + 1 bytes, each tensor info 8 + 4 + 4 + 8
            c.need(n_kv * 13 + n_tensors * 24, f"{n_kv:,} keys and {n_tensors:,} tensor infos")
            for i in range(n_kv):
                c.string(f"key {i + 1} name")
                c.value(c.u32(f"key {i + 1} type"), f"key {i + 1} value")
            for i in range(n_tensors):
                c.string(f"tensor {i + 1} name")
                n_dims = c.u32(f"tensor {i + 1} dimension count")
                if n_dims > MAX_DIMS:
                    raise GGUFHeaderError(f"tensor {i + 1} claims {n_dims} dimensions")
                c.need(8 * n_dims + 12, f"tensor {i + 1} shape, type and offset")
                c.pos += 8 * n_dims + 12
