"""The cache format: member names, dtypes and version, shared by the writer and every reader.

Readers import this module, never the writer (mosaicml/streaming style), so that the format is the
single contract between `precompute` and the trainers. docs/cache-format.md documents the same
names for readers that use no project code.
"""

from __future__ import annotations

import functools
import io
import json
from typing import Any

import numpy as np

FORMAT = "kandinsky22-embedding-cache"
VERSION = 1
MANIFEST_NAME = "manifest.json"

# Member names (the part after the sample key in the tar, e.g. "000042.image_embeds.npy").
CAPTIONS = "captions.json"  # list of the C caption strings
TEXT_EMBEDS = "text_embeds.npy"  # [C, E] CLIP text projection (pooled), one row per caption
TEXT_HIDDEN = "text_hidden.npy"  # [sum(L_i), H] last_hidden_state, padding trimmed, captions concatenated
TEXT_LENGTHS = "text_lengths.npy"  # [C] int32: L_i = number of real tokens (attention-mask sum)
IMAGE_EMBEDS = "image_embeds.npy"  # [E] CLIP vision image_embeds, raw (not clip_mean/clip_std-normalised)
LATENTS = "latents.npy"  # [4, r/8, r/8] movq.encode(x).latents, unquantised, no scaling factor
META = "json"  # {"key": source key, "source": ..., "width": ..., "height": ...}

PRIOR_MEMBERS = (CAPTIONS, TEXT_EMBEDS, TEXT_HIDDEN, TEXT_LENGTHS, IMAGE_EMBEDS)
DECODER_MEMBERS = (IMAGE_EMBEDS, LATENTS)
ARRAY_MEMBERS = (TEXT_EMBEDS, TEXT_HIDDEN, TEXT_LENGTHS, IMAGE_EMBEDS, LATENTS)
LENGTH_DTYPE = np.int32
FLOAT_DTYPES = {"fp16": np.float16, "fp32": np.float32}

# What each `--encode` choice writes.
ENCODE_MEMBERS = {
    "prior": (CAPTIONS, TEXT_EMBEDS, TEXT_HIDDEN, TEXT_LENGTHS, IMAGE_EMBEDS, META),
    "decoder": (CAPTIONS, IMAGE_EMBEDS, LATENTS, META),
    "all": (CAPTIONS, TEXT_EMBEDS, TEXT_HIDDEN, TEXT_LENGTHS, IMAGE_EMBEDS, LATENTS, META),
}

TRAIN_SPLIT = "train"
VALIDATION_SPLIT = "validation"


class FormatError(ValueError):
    """A shard or manifest that does not follow this format."""


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


def decode_member(name: str, data: bytes) -> Any:
    """Decode one tar member by its name; unknown members are returned as raw bytes."""
    if name.endswith(".npy"):
        return decode_array(data)
    if name == CAPTIONS or name == META or name.endswith(".json"):
        return json.loads(data.decode("utf-8"))
    return data


def split_hidden(text_hidden: np.ndarray, text_lengths: np.ndarray) -> list[np.ndarray]:
    """Cut the concatenated `text_hidden` [sum L, H] back into one [L_i, H] array per caption."""
    if int(text_lengths.sum()) != text_hidden.shape[0]:
        raise FormatError(
            f"text_hidden has {text_hidden.shape[0]} rows but text_lengths sum to {int(text_lengths.sum())}"
        )
    offsets = np.concatenate([[0], np.cumsum(text_lengths)])
    return [text_hidden[offsets[i] : offsets[i + 1]] for i in range(len(text_lengths))]


def missing_members(manifest: dict, required: tuple[str, ...]) -> list[str]:
    """The members of `required` that the manifest's shards do not hold."""
    members = manifest.get("members") or ENCODE_MEMBERS.get(manifest.get("encode"), ())
    return [m for m in required if m not in members]


def check_manifest(manifest: dict) -> None:
    """Refuse a manifest of another format or a newer version with one clear message."""
    if manifest.get("format") != FORMAT:
        raise FormatError(f"not a {FORMAT} manifest (format={manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise FormatError(
            f"cache format version {manifest.get('version')!r} is not supported by this reader (expects {VERSION}); "
            "re-run precompute with this version of the code"
        )
