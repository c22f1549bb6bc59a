"""A small, fast GGUF (v2/v3) reader: header, metadata, tensor table, and tensor bytes as
views of one read-only memory map.

``gguf.GGUFReader`` builds a numpy view for every part of every metadata value, which is
slow for a large vocabulary (benchmarks/RESULTS.md, "Measurements that used to live in
docstrings"); here values are decoded with ``struct.unpack_from``
straight into Python objects and the file is parsed once per process (cached by path,
mtime and size), so the arch config, the weights and the tokenizer share one parse.
Layout: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # v1 used 32-bit counts; llama.cpp dropped it long ago
_DEFAULT_ALIGNMENT = 32

# metadata value type -> (struct format, byte width) for the fixed-size scalars
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),  # UINT8
    1: ("<b", 1),  # INT8
    2: ("<H", 2),  # UINT16
    3: ("<h", 2),  # INT16
    4: ("<I", 4),  # UINT32
    5: ("<i", 4),  # INT32
    6: ("<f", 4),  # FLOAT32
    7: ("<?", 1),  # BOOL
    10: ("<Q", 8),  # UINT64
    11: ("<q", 8),  # INT64
    12: ("<d", 8),  # FLOAT64
}
# numpy dtypes for arrays of those scalars (decoded in one frombuffer, not element-wise)
_ARRAY_DTYPES = {t: np.dtype(fmt) for t, (fmt, _) in _SCALARS.items()}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor_count, kv_count
_ARRAY_HEADER = struct.Struct("<IQ")  # element type, count
_TENSOR_TAIL = struct.Struct("<IQ")  # ggml type, offset in the data section


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file. ``shape`` is in torch order (ggml lists dims fastest
    first); ``data`` is a read-only uint8 view of its ``nbytes`` raw bytes in the file."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int
    data: np.ndarray  # [nbytes] uint8, memory-mapped


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: ``metadata`` maps each key to a Python value (int, float, bool,
    str, or a list of those, nested for arrays of arrays); ``tensors`` keep file order."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]
    alignment: int
    data_offset: int  # absolute offset of the tensor data section

    @functools.cached_property
    def tensor_map(self) -> dict[str, GGUFTensor]:
        """``{name: tensor}``."""
        return {t.name: t for t in self.tensors}


class _Cursor:
    """Reads little-endian GGUF values from ``buf`` with bounds checks."""

    __slots__ = ("buf", "path", "pos", "size")

    def __init__(self, buf: Any, path: str) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, what: str) -> ValueError:
        return ValueError(f"corrupt or truncated GGUF file '{self.path}': {what}")

    def need(self, num_bytes: int, what: str) -> None:
        if num_bytes < 0 or self.pos + num_bytes > self.size:
            raise self.fail(f"{what} at byte {self.pos} runs past the end ({self.size} bytes)")

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[Any, ...]:
        self.need(fmt.size, what)
        values = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return values

    def string(self, what: str) -> str:
        (length,) = self.unpack(_U64, what)
        self.need(length, what)
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e})") from e

    def strings(self, count: int, what: str) -> list[str]:
        # The hot loop of the whole parse (vocabularies, merge tables): locals only.
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                (length,) = unpack(buf, pos)
                pos += 8
                end = pos + length
                if end > size:
                    raise IndexError
                append(buf[pos:end].decode("utf-8"))
                pos = end
        except (struct.error, IndexError) as e:
            raise self.fail(f"{what}: string {len(out)} of {count} runs past the end") from e
        except UnicodeDecodeError as e:
            raise self.fail(f"{what}: string {len(out)} is not valid UTF-8 ({e})") from e
        self.pos = pos
        return out

    def value(self, value_type: int, what: str) -> Any:
        scalar = _SCALARS.get(value_type)
        if scalar is not None:
            fmt, width = scalar
            self.need(width, what)
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
            self.pos += width
            return v
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            element_type, count = self.unpack(_ARRAY_HEADER, what)
            if element_type == _STRING:
                return self.strings(count, what)
            dtype = _ARRAY_DTYPES.get(element_type)
            if dtype is not None:
                self.need(count * dtype.itemsize, what)
                values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return values.tolist()
            if element_type == _ARRAY:
                return [self.value(_ARRAY, what) for _ in range(count)]
            raise self.fail(f"{what} is an array of unknown value type {element_type}")
        raise self.fail(f"{what} has unknown value type {value_type}")


def _tensor_nbytes(path: str, name: str, tensor_type: int, shape: tuple[int, ...]) -> int:
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
    if shape and shape[-1] % block_size:
        raise ValueError(
            f"GGUF file '{path}': tensor {name!r} row length {shape[-1]} is not a multiple "
            f"of the {GGMLQuantizationType(tensor_type).name} block size {block_size}"
        )
    num_elements = int(np.prod(shape, dtype=np.int64))
    return num_elements // block_size * type_size


def _parse(path: str, buf: Any, raw: np.ndarray) -> GGUFFile:
    cur = _Cursor(buf, path)
    if cur.size < 4 or buf[:4] != _MAGIC:
        raise ValueError(
            f"invalid GGUF file '{path}': bad magic {bytes(buf[:4])!r}, expected {_MAGIC!r}"
        )
    _, version, tensor_count, kv_count = cur.unpack(_HEADER, "header")
    if version not in _VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big") in _VERSIONS
        raise ValueError(
            f"GGUF file '{path}' has unsupported version {version} (expected 2 or 3)"
            + (": it is big-endian, only little-endian files are supported" if swapped else "")
        )

    metadata: dict[str, Any] = {}
    for i in range(kv_count):
        key = cur.string(f"metadata key {i}")
        (value_type,) = cur.unpack(_U32, f"type of metadata {key!r}")
        metadata[key] = cur.value(value_type, f"metadata {key!r}")

    infos = []
    for i in range(tensor_count):
        name = cur.string(f"name of tensor {i}")
        (num_dims,) = cur.unpack(_U32, f"tensor {name!r}")
        if num_dims > 8:
            raise cur.fail(f"tensor {name!r} has {num_dims} dimensions")
        dims = cur.unpack(struct.Struct(f"<{num_dims}Q"), f"dims of tensor {name!r}")
        tensor_type, offset = cur.unpack(_TENSOR_TAIL, f"tensor {name!r}")
        if tensor_type not in GGMLQuantizationType._value2member_map_:
            raise cur.fail(f"tensor {name!r} has unknown ggml type {tensor_type}")
        infos.append((name, tuple(reversed(dims)), tensor_type, offset))

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise cur.fail(f"general.alignment is {alignment!r}")
    data_offset = -(-cur.pos // alignment) * alignment  # next multiple of `alignment`

    tensors = []
    for name, shape, tensor_type, offset in infos:
        nbytes = _tensor_nbytes(path, name, tensor_type, shape)
        start = data_offset + offset
        if start + nbytes > cur.size:
            raise cur.fail(
                f"tensor {name!r} (bytes {start}..{start + nbytes}) lies beyond the end of "
                f"the file ({cur.size} bytes)"
            )
        tensors.append(
            GGUFTensor(
                name=name,
                tensor_type=GGMLQuantizationType(tensor_type),
                shape=shape,
                offset=start,
                nbytes=nbytes,
                data=raw[start : start + nbytes],
            )
        )
    return GGUFFile(path, version, metadata, tuple(tensors), alignment, data_offset)


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    del mtime_ns  # part of the cache key only: a rewritten file is parsed again
    if size == 0:
        raise ValueError(f"invalid GGUF file '{path}': the file is empty")
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    # The uint8 array keeps the mapping alive for as long as any tensor view exists.
    raw = np.frombuffer(mapped, dtype=np.uint8)
    raw.flags.writeable = False
    return _parse(path, mapped, raw)


def read_gguf(path: str) -> GGUFFile:
    """Parse the GGUF file at ``path`` (once per process while it is unchanged: cached by
    path, mtime and size). ValueError naming the file if it is missing, not a GGUF file,
    of an unsupported version, truncated or otherwise corrupt."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"cannot read GGUF file '{path}': {e}") from e
    return _read_cached(path, st.st_mtime_ns, st.st_size)


# ---------------------------------------------------------------------------------------
# Dequantisation: gguf.quants' numpy reference, restated over the whole tensor at once
# with fewer temporaries. Same float32 operations in the same order, so bit-identical.
# numpy rather than torch: single-threaded elementwise work does not stall on a busy
# machine the way torch's thread pool does, and it is what the reference computes with.
# ---------------------------------------------------------------------------------------

_Q = GGMLQuantizationType
_QK_K = 256  # elements in a K-quant super-block
_F32 = np.dtype(np.float32)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 at bytes [start, start+2) of each block, as float32. # [n_blocks, 1]"""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Low nibbles of each ``group`` bytes, then their high nibbles (ggml's order).
    qs: [n_blocks, num_bytes] uint8 -> [n_blocks, num_bytes // group, 2, group] uint8"""
    qs = qs.reshape(qs.shape[0], -1, 1, group)
    out = np.empty((*qs.shape[:2], 2, group), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=out[:, :, 0:1])
    np.right_shift(qs, 4, out=out[:, :, 1:2])
    return out


def _bits(qh: np.ndarray, group: int, num_planes: int, width: int) -> np.ndarray:
    """Bit planes of ``width`` bits: plane p of byte b is (b >> p*width) & mask.
    qh: [n_blocks, num_bytes] -> [n_blocks, num_bytes // group, num_planes, group] uint8"""
    qh = qh.reshape(qh.shape[0], -1, 1, group)
    shifts = np.arange(0, num_planes * width, width, dtype=np.uint8).reshape(1, 1, -1, 1)
    return (qh >> shifts) & np.uint8((1 << width) - 1)


def _q5_high(blocks: np.ndarray, start: int) -> np.ndarray:
    """Bit j of the little-endian uint32 at bytes [start, start+4), j = 0..31, moved to
    bit 4 (the fifth bit of a Q5 value). # [n_blocks, 32] uint8"""
    qh = blocks[:, start : start + 4].reshape(-1, 4, 1)  # byte k holds bits 8k..8k+7
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 1, 8)
    return (((qh >> shifts) & np.uint8(1)) << np.uint8(4)).reshape(-1, 32)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 6-bit scales and mins of the 8 sub-blocks, as float32.
    scales: [n_blocks, 12] -> ([n_blocks, 8], [n_blocks, 8])"""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 2:], 16).reshape(-1, 32).view(np.int8) - np.int8(8)
    return np.multiply(_f16(b, 0), q, dtype=_F32)


def _q4_1(b: np.ndarray) -> np.ndarray:
    out = np.multiply(_f16(b, 0), _nibbles(b[:, 4:], 16).reshape(-1, 32), dtype=_F32)
    return np.add(out, _f16(b, 2), out=out)


def _q5_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 6:], 16).reshape(-1, 32) | _q5_high(b, 2)
    return np.multiply(_f16(b, 0), q.view(np.int8) - np.int8(16), dtype=_F32)


def _q5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 8:], 16).reshape(-1, 32) | _q5_high(b, 4)
    out = np.multiply(_f16(b, 0), q, dtype=_F32)
    return np.add(out, _f16(b, 2), out=out)


def _q8_0(b: np.ndarray) -> np.ndarray:
    return np.multiply(b[:, 2:].view(np.int8), _f16(b, 0), dtype=_F32)


def _q4_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn).reshape(n, 8, 1)
    out = np.multiply(d, _nibbles(b[:, 16:], 32).reshape(n, 8, 32), dtype=_F32)
    return np.subtract(out, dm, out=out).reshape(n, _QK_K)


def _q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn).reshape(n, 8, 1)
    qh = _bits(b[:, 16:48], 32, 8, 1).reshape(n, 8, 32) << np.uint8(4)
    q = _nibbles(b[:, 48:], 32).reshape(n, 8, 32) | qh
    out = np.multiply(d, q, dtype=_F32)
    return np.subtract(out, dm, out=out).reshape(n, _QK_K)


def _q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    qh = _bits(b[:, 128:192], 32, 4, 2).reshape(n, 8, 32) << np.uint8(4)
    q = (_nibbles(b[:, :128], 64).reshape(n, 8, 32) | qh).view(np.int8) - np.int8(32)
    return np.multiply(d, q.reshape(n, 16, 16), dtype=_F32).reshape(n, _QK_K)


_BLOCK_DEQUANT = {
    _Q.Q4_0: _q4_0,
    _Q.Q4_1: _q4_1,
    _Q.Q5_0: _q5_0,
    _Q.Q5_1: _q5_1,
    _Q.Q8_0: _q8_0,
    _Q.Q4_K: _q4_k,
    _Q.Q5_K: _q5_k,
    _Q.Q6_K: _q6_k,
}


def dequantize(tensor: GGUFTensor, path: str = "") -> np.ndarray:
    """``tensor`` as a new, writable float32 array of ``tensor.shape``, equal bit for bit
    to ``gguf.quants.dequantize``; types without a fast version go through that reference.
    ValueError naming the tensor (and ``path``) if its type cannot be dequantized."""
    kind, raw = tensor.tensor_type, tensor.data  # raw: [nbytes] uint8, read-only mmap
    if kind == _Q.F32:
        return raw.view(np.float32).reshape(tensor.shape).copy()
    if kind == _Q.F16:
        return raw.view(np.float16).astype(np.float32).reshape(tensor.shape)
    if kind == _Q.BF16:
        # bf16 is the high half of a float32
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(tensor.shape)
    _, type_size = GGML_QUANT_SIZES[kind]
    fn = _BLOCK_DEQUANT.get(kind)
    if fn is not None:
        return fn(raw.reshape(-1, type_size)).reshape(tensor.shape)
    from gguf.quants import dequantize as reference

    try:
        values = reference(raw.reshape(*tensor.shape[:-1], -1), kind)
    except Exception as e:  # NotImplementedError for types gguf cannot dequantize either
        where = f" of GGUF file '{path}'" if path else ""
        raise ValueError(
            f"cannot dequantize tensor {tensor.name!r} ({kind.name}){where}: {e}"
        ) from e
    return np.array(values, dtype=np.float32).reshape(tensor.shape)
