"""Read and check a GGUF file's header without loading the model.

llama.cpp trusts a file's header: a GGUF cut short (an interrupted copy, a half download)
can get past its loader and fail late or crash the process. ``inspect_gguf`` parses the
header, the key/value metadata and every tensor's shape and type, computes where the last
tensor's data ends, and rejects a file that is shorter than that, all before llama.cpp
sees it. It also returns the metadata as ``dict[str, str]`` - the same shape as
llama-cpp-python's ``Llama.metadata`` - so chat formatting can be decided from the file.

The parser works on an ``mmap`` with a bounds check on every read, so even a corrupt length
field ends in ``ModelLoadFailed`` rather than a huge allocation.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tokenhive.schemas.errors import ModelLoadFailed

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

#: Derived keys (not in the file) holding the text of the BOS/EOS tokens, which the file
#: stores only as ids into ``tokenizer.ggml.tokens``. Chat templates need the text.
BOS_TEXT_KEY = "tokenhive.bos_token"
EOS_TEXT_KEY = "tokenhive.eos_token"

# GGUF value type -> struct format of one scalar (STRING=8 and ARRAY=9 handled apart)
_SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFHeader:
    version: int
    tensor_count: int
    metadata: dict[str, str]
    data_offset: int  # where tensor data starts
    data_end: int  # where the last tensor's data ends: the least valid file size
    file_size: int
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> shape


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelLoadFailed(
                f"{self.path}: GGUF file is truncated or corrupt (header wants byte "
                f"{self.pos + n}, file has {len(self.buf)})"
            )

    def scalar(self, fmt: str) -> int | float | bool:
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value  # type: ignore[no-any-return]

    def u32(self) -> int:
        return int(self.scalar("<I"))

    def u64(self) -> int:
        return int(self.scalar("<Q"))

    def string(self) -> str:
        n = self.u64()
        self.need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.u64()
        self.need(n)
        self.pos += n


def _format_scalar(value: int | float | bool) -> str:
    """As llama.cpp prints metadata (``Llama.metadata``): true/false, ints, floats as %f."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:f}"
    return str(value)


def _read_value(cur: _Cursor, vtype: int, keep_strings: bool) -> str | list[str] | None:
    """One value: scalars as text; arrays skipped (None) unless a string array is kept."""
    if vtype in _SCALARS:
        return _format_scalar(cur.scalar(_SCALARS[vtype]))
    if vtype == _STRING:
        return cur.string()
    if vtype != _ARRAY:
        raise ModelLoadFailed(f"{cur.path}: GGUF metadata has unknown value type {vtype}")
    item_type, count = cur.u32(), cur.u64()
    if item_type in _SCALARS:
        nbytes = count * struct.calcsize(_SCALARS[item_type])
        cur.need(nbytes)
        cur.pos += nbytes
        return None
    if item_type == _STRING:
        if keep_strings:
            return [cur.string() for _ in range(count)]
        for _ in range(count):
            cur.skip_string()
        return None
    if item_type == _ARRAY:  # nested arrays are legal but unused by any model key we read
        for _ in range(count):
            _read_value(cur, _ARRAY, keep_strings=False)
        return None
    raise ModelLoadFailed(f"{cur.path}: GGUF array has unknown item type {item_type}")


def _tensor_nbytes(path: Path, name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ModelLoadFailed(f"{path}: tensor {name!r} has unknown type {ggml_type}") from None
    elements = 1
    for d in shape:
        elements *= d
    if shape and shape[0] % block:
        raise ModelLoadFailed(f"{path}: tensor {name!r} row {shape[0]} not a multiple of {block}")
    return elements // block * type_size


def _parse(cur: _Cursor, path: Path, file_size: int) -> GGUFHeader:
    cur.need(4)
    if bytes(cur.buf[0:4]) != GGUF_MAGIC:
        raise ModelLoadFailed(f"{path}: not a GGUF file (magic {bytes(cur.buf[0:4])!r})")
    cur.pos = 4
    version = cur.u32()
    if version not in (2, 3):
        raise ModelLoadFailed(f"{path}: unsupported GGUF version {version} (need 2 or 3)")
    tensor_count, kv_count = cur.u64(), cur.u64()

    metadata: dict[str, str] = {}
    tokens: list[str] = []
    for _ in range(kv_count):
        key = cur.string()
        value = _read_value(cur, cur.u32(), keep_strings=key == "tokenizer.ggml.tokens")
        if isinstance(value, list):
            tokens = value
        elif value is not None:
            metadata[key] = value

    tensors: dict[str, tuple[int, ...]] = {}
    extents: list[tuple[int, int]] = []  # (offset, nbytes) relative to data start
    for _ in range(tensor_count):
        name = cur.string()
        n_dims = cur.u32()
        if n_dims > MAX_DIMS:
            raise ModelLoadFailed(f"{path}: tensor {name!r} has {n_dims} dims (max {MAX_DIMS})")
        shape = tuple(cur.u64() for _ in range(n_dims))
        ggml_type, offset = cur.u32(), cur.u64()
        tensors[name] = shape
        extents.append((offset, _tensor_nbytes(path, name, shape, ggml_type)))

    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ModelLoadFailed(f"{path}: bad general.alignment {alignment}")
    data_offset = -(-cur.pos // alignment) * alignment
    data_end = max((data_offset + off + n for off, n in extents), default=cur.pos)

    for id_key, text_key in (
        ("tokenizer.ggml.bos_token_id", BOS_TEXT_KEY),
        ("tokenizer.ggml.eos_token_id", EOS_TEXT_KEY),
    ):
        token_id = int(metadata.get(id_key, -1))
        if 0 <= token_id < len(tokens):
            metadata[text_key] = tokens[token_id]
    return GGUFHeader(version, tensor_count, metadata, data_offset, data_end, file_size, tensors)


def inspect_gguf(path: str | Path) -> GGUFHeader:
    """Parse and check ``path``; raise ModelLoadFailed naming the file if it cannot load."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            file_size = path.stat().st_size
            if file_size == 0:
                raise ModelLoadFailed(f"{path}: file is empty, not a GGUF model")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                header = _parse(_Cursor(buf, path), path, file_size)
    except FileNotFoundError:
        raise ModelLoadFailed(f"model file not found: {path}") from None
    except IsADirectoryError:
        raise ModelLoadFailed(f"model path is a directory, not a GGUF file: {path}") from None
    except PermissionError as e:
        raise ModelLoadFailed(f"model file not readable: {path} ({e})") from None
    if header.data_end > file_size:
        raise ModelLoadFailed(
            f"{path}: GGUF file is truncated: tensor data needs {header.data_end} bytes, "
            f"file has {file_size} (incomplete download or copy?)"
        )
    return header


def read_gguf_metadata(path: str | Path) -> dict[str, str]:
    """The file's metadata as text values, plus the BOS/EOS token texts under derived keys."""
    return inspect_gguf(path).metadata
