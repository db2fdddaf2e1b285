"""A CLIP-format BPE tokenizer built from a closed word list (for domain models such as Shapes).

Every listed word becomes a single token: its merges build it left to right, one character at a
time, ending in the ``</w>`` end-of-word suffix CLIP uses. Characters outside the list still
tokenize (the 256 byte-level symbols are in the vocabulary), so any prompt is accepted.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for tok in (BOS, EOS):
        add(tok)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for ch in alphabet:
        add(ch)
    for ch in alphabet:
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    # longest words first: their chains take the lowest ranks, so shorter words' merges never split them
    for word in sorted({w.lower() for w in words if w}, key=lambda w: (-len(w), w)):
        chars = list(word[:-1]) + [word[-1] + "</w>"]
        left = chars[0]
        for right in chars[1:]:
            pair = (left, right)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            left = left + right
            add(left)
    return vocab, merges


def build_clip_tokenizer(words: Iterable[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary holds every word of ``words`` as one token."""
    vocab, merges = build_vocab_and_merges(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def save_tokenizer(tokenizer, out_dir) -> None:
    """``save_pretrained`` plus the classic ``vocab.json``/``merges.txt`` pair that older loaders need."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    tokenizer.save_pretrained(str(out))
    spec = json.loads((out / "tokenizer.json").read_text())["model"]
    if not (out / "vocab.json").exists():
        (out / "vocab.json").write_text(json.dumps(spec["vocab"], ensure_ascii=False))
    if not (out / "merges.txt").exists():
        lines = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")


def shapes_tokenizer(max_length: int = 32) -> CLIPTokenizer:
    """The CLIP-format tokenizer of the Shapes vocabulary (one token per caption word)."""
    from ..data.shapes import VOCABULARY

    return build_clip_tokenizer(VOCABULARY, model_max_length=max_length)
