"""Byte-level BPE, the tokenizer family of DeepSeek-V3, and reading either tokenizer back.

DeepSeek-V3's tokenizer is a byte-level BPE with a 129,280-token vocabulary. Byte-level
means the text is first turned into its UTF-8 bytes, so the 256 byte values are the
starting alphabet and no text is ever unknown; BPE (byte-pair encoding) then learns
merges: again and again, the most frequent adjacent pair of symbols in the training
text becomes one new symbol, until the vocabulary has ``vocab_size`` of them. A token
is thus often a whole word or syllable, several characters long, and the same text
needs fewer positions than with one token per character.

We train it with Hugging Face ``tokenizers`` (``BpeTrainer`` on the ``ByteLevel``
pre-tokenizer, which also splits the text at spaces and punctuation first, GPT-2's
rule, so that merges stay inside words; V3's own pre-tokenizer adds rules for digits
and CJK text). The result is saved in the library's standard ``tokenizer.json``, which
``tokenizers.Tokenizer.from_file`` reads; a character tokenizer's ``tokenizer.json`` is
``{"type": "char", ...}`` instead, and ``tokenizer_from_dict`` tells the two apart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .data import CharTokenizer, check_ids

# Byte-level BPE starts from the 256 byte values, so it needs at least one merge more.
# The upper end keeps the embedding and output head (vocab_size x hidden_size each)
# in proportion to a model that trains on a laptop.
MIN_VOCAB_SIZE, MAX_VOCAB_SIZE = 257, 65536


def check_vocab_size(vocab_size: int) -> None:
    """ValueError unless a byte-level BPE can have ``vocab_size`` tokens here."""
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"a byte-level BPE vocabulary must have {MIN_VOCAB_SIZE}.."
                         f"{MAX_VOCAB_SIZE} tokens (the 256 byte values plus at least one "
                         f"merge), got {vocab_size}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte value to the printable character that stands for it
    in a byte-level vocabulary (``tokenizers`` uses the same): printable bytes stand for
    themselves, the others for the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable},
            **{b: chr(256 + n) for n, b in enumerate(others)}}


class BPETokenizer:
    """Byte-level BPE with the interface of ``CharTokenizer``; wraps a ``tokenizers.Tokenizer``."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        """Learn merges from ``text`` until the vocabulary holds ``vocab_size`` tokens (fewer
        if the text runs out of pairs to merge). The same text and size always give the
        same tokenizer: training counts pairs exactly and breaks ties by a fixed order."""
        check_vocab_size(vocab_size)
        hf = HFTokenizer(models.BPE())
        # No prefix space: decode(encode(text)) must give back exactly ``text``.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[], show_progress=False,
            # All 256 bytes, even those the text lacks: any later text can be encoded.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator([text], trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> torch.Tensor:
        """``text`` -> 1-D LongTensor of ids; every text can be encoded (byte-level)."""
        return torch.tensor(self.hf.encode(text, add_special_tokens=False).ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """1-D tensor or list of ids -> text; ValueError for an id outside ``[0, vocab_size)``.

        A token can end inside a multi-byte character; decoded alone, such a piece gives
        U+FFFD, the replacement character, until it is decoded with the tokens after it.
        """
        return self.hf.decode(check_ids(ids, self.vocab_size), skip_special_tokens=False)

    @cached_property
    def chars_per_token(self) -> torch.Tensor:
        """(vocab_size,) characters each token adds to a text: the UTF-8 bytes it holds that
        start a character (all but the continuation bytes 0b10xxxxxx). Summed over the
        tokens of a text, the text's length in characters, even where a token ends inside
        a character."""
        byte_of = {char: b for b, char in bytes_to_unicode().items()}
        counts = torch.zeros(self.vocab_size, dtype=torch.long)
        for symbol, i in self.hf.get_vocab().items():
            counts[i] = sum(byte_of[c] & 0b1100_0000 != 0b1000_0000 for c in symbol)
        return counts

    def to_dict(self) -> dict:
        """The ``tokenizer.json`` of the ``tokenizers`` library, as a dict."""
        return json.loads(self.hf.to_str())

    @classmethod
    def from_dict(cls, d: dict) -> BPETokenizer:
        model, pre = d.get("model") or {}, d.get("pre_tokenizer") or {}
        if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
            raise ValueError(f"not a byte-level BPE tokenizer: model type {model.get('type')!r} "
                             f"with pre-tokenizer {pre.get('type')!r}, expected 'BPE' with "
                             "'ByteLevel'")
        try:
            return cls(HFTokenizer.from_str(json.dumps(d)))
        except Exception as err:  # the library raises a bare Exception for a malformed file
            raise ValueError(f"not a valid tokenizers-library file: {err}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


Tokenizer = CharTokenizer | BPETokenizer


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """A run directory's ``tokenizer.json`` (as a dict) -> the tokenizer that wrote it."""
    if d.get("type") == "char":
        return CharTokenizer.from_dict(d)
    if "model" in d:  # the structure of a ``tokenizers`` file
        return BPETokenizer.from_dict(d)
    raise ValueError(f"neither a character tokenizer (type 'char') nor a tokenizers-library "
                     f"BPE (a 'model' entry): keys {sorted(d)}")
