"""The identity of a frozen component: a digest of what it computes with, not of the files it is stored in.

precompute records it for every encoder in the manifest (`encoders.<name>.identity`); the trainers
compare it with the frozen parts of the base model their export will bundle. Both import this
module; it imports neither the writer nor any model class, and never loads a model.

- Models (text and image encoders, MoVQ): the sha256 of every weight tensor's name, dtype, shape
  and bytes, in name order over all of the folder's `*.safetensors` files (read with
  `safetensors.safe_open`). A copy re-saved or re-sharded from the same weights has the same
  identity; any other weights, or the same weights in another dtype, do not. Variant files
  (`model.fp16.safetensors`) count only in a folder that has nothing else. Without safetensors
  (only pickled `.bin` weights, never unpickled here) there is no identity.
- Tokenizer: the sha256 of its vocabulary, its BPE merges, its special tokens and its
  `model_max_length`, from `vocab.json` + `merges.txt` or else `tokenizer.json`.
- Image processor: the sha256 of the preprocessing fields of `preprocessor_config.json`.

Cost: one read of the weights (about a second per GB); nothing for tokenizer and image processor.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct

SCHEME = "sha256-v1"  # bump when what is hashed changes, so that old identities are not compared
# The fields of preprocessor_config.json that decide the pixels (class names and versions do not).
IMAGE_PROCESSOR_FIELDS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                          "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def component_folder(path: str, subfolder: str) -> str | None:
    """The local folder of a model component: under a local path, or in the hub cache (never downloads)."""
    if os.path.isdir(path):
        return os.path.join(path, subfolder)
    try:
        from huggingface_hub import snapshot_download

        return os.path.join(snapshot_download(path, allow_patterns=[f"{subfolder}/*"], local_files_only=True),
                            subfolder)
    except Exception:  # noqa: BLE001 - identity is best effort for remote models
        return None


def _digest(obj) -> str:
    return f"{SCHEME}:" + hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def weights_identity(folder: str) -> str | None:
    """Identity of the weight tensors of the safetensors files in `folder`, or None without any."""
    import torch
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    plain = [f for f in files if "." not in os.path.basename(f)[: -len(".safetensors")]]
    files = plain or files
    if not files:
        return None
    where = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            where.update({name: path for name in handle.keys()})
    digest = hashlib.sha256()
    for name in sorted(where):
        with safe_open(where[name], framework="pt") as handle:
            tensor = handle.get_tensor(name)
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode()
        digest.update(struct.pack("<Q", len(header)) + header)
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())  # the stored bytes, any dtype
    return f"{SCHEME}:" + digest.hexdigest()


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_identity(folder: str) -> str | None:
    """Identity of a (CLIP/BPE) tokenizer folder's vocabulary, merges, special tokens and length, or None."""
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if os.path.exists(vocab_path) and os.path.exists(merges_path):
        vocab = _read_json(vocab_path)
        with open(merges_path, encoding="utf-8") as handle:
            merges = [line.rstrip("\n") for line in handle if line.strip() and not line.startswith("#version")]
    elif os.path.exists(os.path.join(folder, "tokenizer.json")):
        model = _read_json(os.path.join(folder, "tokenizer.json")).get("model", {})
        vocab = model.get("vocab", {})
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    else:
        return None
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.exists(config_path) else {}
    special = {name: _token(config.get(name)) for name in SPECIAL_TOKENS}
    return _digest({"vocab": vocab, "merges": merges, "special": special,
                    "model_max_length": config.get("model_max_length")})


def image_processor_identity(folder: str) -> str | None:
    """Identity of an image processor's preprocessing settings, or None without preprocessor_config.json."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.exists(path):
        return None
    config = _read_json(path)
    return _digest({name: config.get(name) for name in IMAGE_PROCESSOR_FIELDS})


def component_identity(path: str, subfolder: str) -> str | None:
    """The identity of component `subfolder` of the pipeline at `path` (local or in the hub cache), or None.

    `subfolder` "tokenizer" and "image_processor" are hashed as such, any other as model weights.
    """
    folder = component_folder(path, subfolder)
    if folder is None or not os.path.isdir(folder):
        return None
    if subfolder == "tokenizer":
        return tokenizer_identity(folder)
    if subfolder == "image_processor":
        return image_processor_identity(folder)
    return weights_identity(folder)
