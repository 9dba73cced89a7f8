"""Safe `.npy` bytes for untrusted shards: object arrays are refused both ways, nothing is unpickled.

The lowest module of the cache format (`precompute.format` re-exports these names); it imports no
project code.
"""

from __future__ import annotations

import functools
import io

import numpy as np


class FormatError(ValueError):
    """A shard or manifest that does not follow the cache format."""


def encode_array(array: np.ndarray) -> bytes:
    """`.npy` bytes of a numeric array; object arrays are refused (they would be pickled)."""
    if array.dtype == object:
        raise FormatError("object arrays cannot be stored (they would need pickle)")
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


NPY_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=4096)
def _npy_header(prefix: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, fortran_order) of an `.npy` header; cached, since records repeat their headers."""
    handle = io.BytesIO(prefix)
    version = np.lib.format.read_magic(handle)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise FormatError(f"unsupported .npy version {version}")
    shape, fortran_order, dtype = read(handle)
    if dtype.hasobject:
        raise FormatError("object arrays are refused (they would need pickle)")
    return dtype, shape, fortran_order


def decode_array(data: bytes) -> np.ndarray:
    """Read `.npy` bytes from an untrusted shard: never unpickles.

    The header is parsed once per distinct header (np.load parses it with `ast.literal_eval` for
    every member, a large share of the training data path); the data is copied once into a
    writable array, as np.load would.
    """
    if data[:6] != NPY_MAGIC or len(data) < 10:
        raise FormatError("not an .npy member")
    start, size = (10, 2) if data[6] == 1 else (12, 4)  # header-length field: 2 bytes in v1, 4 in v2/v3
    offset = start + int.from_bytes(data[8 : 8 + size], "little")
    dtype, shape, fortran_order = _npy_header(bytes(data[:offset]))
    count = int(np.prod(shape, dtype=np.int64))
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran_order else "C").copy(order="K")
