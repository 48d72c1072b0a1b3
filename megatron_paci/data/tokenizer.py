"""Tokenizers behind one small interface, so data prep and training agree on ids.

Two kinds:
- ``SentencePieceTokenizer``: a trained sentencepiece model (``.model`` file), as written by
  ``python -m data_prep.train_tokenizer``. Those models use unk=0, bos=1, eos=2, no pad;
  the end-of-document token (``eod``) is the model's eos id.
- ``NullTokenizer``: Megatron's "null" tokenizer, where the text already is whitespace
  separated integer ids. It needs no file, which makes it handy for tests and synthetic data.

``build_tokenizer(spec)`` picks one from a string: a path to a ``.model`` file or ``null:N``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """What data prep and training need from a tokenizer."""

    vocab_size: int
    eod: int

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Iterable[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece model; ``eod`` is its eos id (2 for models trained by data_prep)."""

    def __init__(self, model_path: str) -> None:
        import sentencepiece as spm  # imported here so the null tokenizer works without it

        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(_missing_model_message(model_path))
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size: int = int(self._sp.get_piece_size())
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise ValueError(
                f"sentencepiece model {model_path} has no eos piece; it is needed as the "
                "end-of-document token (train with data_prep.train_tokenizer, which sets eos=2)"
            )
        self.eod: int = eos
        self.bos: int = int(self._sp.bos_id())
        self.unk: int = int(self._sp.unk_id())
        self.pad: int = int(self._sp.pad_id())

    def tokenize(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self) -> dict:
        # The C++ processor does not pickle; rebuild it from the path in the other process.
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


class NullTokenizer:
    """Text is whitespace separated integer ids; ``eod = vocab_size - 1`` as in Megatron."""

    def __init__(self, vocab_size: int) -> None:
        vocab_size = int(vocab_size)
        if vocab_size < 2:
            raise ValueError(f"NullTokenizer needs vocab_size >= 2, got {vocab_size}")
        self.vocab_size: int = vocab_size
        self.eod: int = vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        ids = [int(t) for t in text.split()]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the null vocabulary [0, {self.vocab_size})")
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def __repr__(self) -> str:
        return f"NullTokenizer(vocab_size={self.vocab_size})"


def _missing_model_message(path: str) -> str:
    return (
        f"tokenizer model not found: {path}. Train one with: python -m data_prep.train_tokenizer "
        f"--input corpus.jsonl --vocab-size 32000 --output {_strip_model_suffix(path)}"
    )


def _strip_model_suffix(path: str) -> str:
    return path[: -len(".model")] if path.endswith(".model") else path


def build_tokenizer(spec: str) -> Tokenizer:
    """Build a tokenizer from ``path/to/x.model`` or ``null:N`` (N = vocab size)."""
    spec = os.fspath(spec)
    if spec.startswith("null:"):
        try:
            n = int(spec[len("null:") :])
        except ValueError:
            raise ValueError(f"bad tokenizer spec {spec!r}; expected null:N, N an int") from None
        return NullTokenizer(n)
    if not os.path.isfile(spec):
        raise FileNotFoundError(_missing_model_message(spec))
    return SentencePieceTokenizer(spec)
