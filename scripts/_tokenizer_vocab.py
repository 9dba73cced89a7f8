"""An offline CLIP tokenizer for the tiny test models (no hub download).

The layout copies the real CLIP vocabulary: the 256 byte-level characters, the same 256 with the
`</w>` end-of-word suffix, the merge results, then `<|startoftext|>` and `<|endoftext|>` last, so that
`<|endoftext|>` has the highest id (CLIP text pooling with the legacy `eos_token_id == 2` takes
`input_ids.argmax(-1)`). Merges make every word of `WORDS` a single token, so that test captions
give short, readable token sequences; any other text falls back to byte-level pieces.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77  # CLIP's context length; the prior's num_embeddings must match it

# Words of the synthetic captions used in the tests and demos; each becomes one token.
WORDS = (
    "a an the of on in with and "
    "picture photo image shape small large big tiny middle center background "
    "colored coloured drawing simple "
    "red green blue yellow purple orange white black cyan pink brown grey gray "
    "circle square triangle diamond star cross ring"
).split()


def _simulate_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges by rank (lowest first), as the tokenizers BPE model does."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        merged = symbols[i] + symbols[i + 1]
        pair = (symbols[i], symbols[i + 1])
        out, j = [], 0
        while j < len(symbols):  # merge every occurrence of the pair, left to right
            if j < len(symbols) - 1 and (symbols[j], symbols[j + 1]) == pair:
                out.append(merged)
                j += 2
            else:
                out.append(symbols[j])
                j += 1
        symbols = out
    return symbols


def _word_symbols(word: str) -> list[str]:
    """The byte-level characters of one word, the last one with the end-of-word suffix."""
    byte_chars = bytes_to_unicode()
    chars = [byte_chars[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + END_OF_WORD]


def build_vocab_and_merges(words: tuple[str, ...] | list[str] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges in which each of `words` is one token and EOS has the highest id.

    Merges are added left to right per word; a later word can be split differently by an earlier
    word's merges, so the pieces it ends with get joined by merges appended at the end (appending
    never changes how an already-whole word is merged).
    """
    alphabet = list(bytes_to_unicode().values())
    vocab_list = alphabet + [c + END_OF_WORD for c in alphabet]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _simulate_bpe(_word_symbols(word), ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab_list.append(pair[0] + pair[1])
            symbols = [pair[0] + pair[1]] + symbols[2:]
    vocab_list += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    return vocab, merges


def build_clip_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer with the real special tokens, padding and context length."""
    vocab, merges = build_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH)
    unsplit = [w for w in WORDS if len(tokenizer.tokenize(w)) != 1]
    if unsplit:
        raise RuntimeError(f"offline CLIP vocab does not keep these words whole: {unsplit}")
    return tokenizer


def save_clip_tokenizer(tokenizer: CLIPTokenizer, directory: str | Path) -> None:
    """save_pretrained (tokenizer.json) plus vocab.json + merges.txt for older loaders."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    vocab = tokenizer.get_vocab()
    (directory / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1]))))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    lines = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n")
