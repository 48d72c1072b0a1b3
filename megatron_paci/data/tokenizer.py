"""Tokenizers behind one small interface, so data prep and training agree on ids.

``build_tokenizer(spec)`` reads ``data.tokenizer`` / ``--tokenizer``. The accepted forms,
tried in this order:

- ``null:N``: Megatron's "null" tokenizer: the text already is whitespace separated integer
  ids below N; ``eod = N - 1``. No file; handy for tests and synthetic data.
- ``gpt2-bpe:VOCAB,MERGES``: GPT-2's byte-level BPE from a ``vocab.json`` and a ``merges.txt``
  (what Megatron's GPT2BPETokenizer and most Megatron datasets use). ``eod`` is the
  ``<|endoftext|>`` token, as in Megatron; literal ``<|endoftext|>`` text is encoded as text,
  as Megatron does.
- a directory: the same GPT-2 BPE from ``DIR/vocab.json`` and ``DIR/merges.txt`` (a
  directory written by ``data_prep.train_tokenizer --type bpe`` or a GPT-2 download).
- a path ending in ``.model``: a sentencepiece model, as written by
  ``data_prep.train_tokenizer`` (the default ``--type sentencepiece``). Those models use
  unk=0, bos=1, eos=2, no pad; ``eod`` is the model's eos id.
- any other path ending in ``.json``: a Hugging Face ``tokenizer.json``. ``eod`` is the
  first of ``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ``<eos>``, ``<|eos|>`` that the
  tokenizer knows. ``tokenize`` adds no special tokens (no BOS/EOS post-processing);
  ``--append-eod`` adds the end of document.

The GPT-2 and ``tokenizer.json`` forms take ``#eod=TOKEN`` at the end to name the
end-of-document token instead (``data/tok/tokenizer.json#eod=<|im_end|>``). All of them load
local files only (the ``tokenizers`` library; nothing is downloaded).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

NULL_PREFIX = "null:"
GPT2_BPE_PREFIX = "gpt2-bpe:"
EOD_SUFFIX = "#eod="
GPT2_EOD_TOKEN = "<|endoftext|>"
CONVENTIONAL_EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
ACCEPTED_FORMS = (
    "accepted forms: null:N; gpt2-bpe:VOCAB,MERGES or a directory holding vocab.json and "
    "merges.txt (GPT-2 BPE); a sentencepiece .model file; a Hugging Face tokenizer .json file; "
    "the GPT-2 and .json forms may end in #eod=TOKEN"
)


@runtime_checkable
class Tokenizer(Protocol):
    """What data prep and training need from a tokenizer."""

    vocab_size: int
    eod: int

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Iterable[int]) -> str: ...

    def describe(self) -> dict[str, Any]: ...


def file_fingerprint(paths: Iterable[str]) -> str:
    """sha256 over the files' own sha256 digests, in order: equal files give equal ids."""
    outer = hashlib.sha256()
    for path in paths:
        inner = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                inner.update(block)
        outer.update(inner.digest())
    return outer.hexdigest()


def _description(kind: str, files: list[str], vocab_size: int, eod: int) -> dict[str, Any]:
    return {"kind": kind, "files": [os.path.abspath(p) for p in files],
            "vocab_size": int(vocab_size), "eod": int(eod),
            "sha256": file_fingerprint(files) if files else None}


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

    def describe(self) -> dict[str, Any]:
        return _description("sentencepiece", [self.model_path], self.vocab_size, self.eod)

    def __getstate__(self) -> dict:
        # The C++ processor does not pickle; rebuild it from the path in the other process.
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


class _TokenizersLibraryTokenizer:
    """Shared part of the two forms built on the ``tokenizers`` library."""

    kind = ""

    def _finish(self, tok: Any, files: list[str], eod: int) -> None:
        self._tok = tok
        self.files = files
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1 if vocab else 0
        self.eod: int = int(eod)

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def describe(self) -> dict[str, Any]:
        return _description(self.kind, self.files, self.vocab_size, self.eod)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.files!r}, vocab_size={self.vocab_size})"


class GPT2BPETokenizer(_TokenizersLibraryTokenizer):
    """GPT-2 byte-level BPE from vocab.json + merges.txt, ids as Megatron's GPT2BPETokenizer."""

    kind = "gpt2-bpe"

    def __init__(self, vocab_file: str, merges_file: str, eod_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _Lib
        from tokenizers import decoders, models, pre_tokenizers

        vocab_file, merges_file = os.fspath(vocab_file), os.fspath(merges_file)
        for path in (vocab_file, merges_file):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"GPT-2 BPE file not found: {path}; {ACCEPTED_FORMS}")
        self._args = (vocab_file, merges_file, eod_token)
        try:
            tok = _Lib(models.BPE.from_file(vocab_file, merges_file))
        except Exception as e:  # the library raises its own Exception type
            raise ValueError(f"cannot read GPT-2 BPE files {vocab_file} and {merges_file}: "
                             f"{e}") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        name = eod_token or GPT2_EOD_TOKEN
        eod = tok.token_to_id(name)
        if eod is None:
            hint = ("" if eod_token else
                    f"; name the end-of-document token with gpt2-bpe:{vocab_file},"
                    f"{merges_file}{EOD_SUFFIX}TOKEN")
            raise ValueError(f"GPT-2 vocabulary {vocab_file} has no {name!r} token, needed as "
                             f"the end-of-document token{hint}")
        self._finish(tok, [vocab_file, merges_file], eod)

    def __getstate__(self) -> dict:
        return {"args": self._args}

    def __setstate__(self, state: dict) -> None:
        self.__init__(*state["args"])


class HFJsonTokenizer(_TokenizersLibraryTokenizer):
    """Any Hugging Face ``tokenizer.json``; ``eod`` from ``eod_token`` or a conventional name."""

    kind = "hf-tokenizer-json"

    def __init__(self, path: str, eod_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _Lib

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}; {ACCEPTED_FORMS}")
        self._args = (path, eod_token)
        try:
            tok = _Lib.from_file(path)
        except Exception as e:  # the library raises its own Exception type
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(
                f"{path} is not a Hugging Face tokenizer.json ({first}); for GPT-2's "
                f"vocab.json + merges.txt give gpt2-bpe:VOCAB,MERGES or their directory; "
                f"{ACCEPTED_FORMS}") from None
        names = (eod_token,) if eod_token else CONVENTIONAL_EOD_TOKENS
        found = [(n, tok.token_to_id(n)) for n in names if tok.token_to_id(n) is not None]
        if not found:
            looked = ", ".join(names)
            raise ValueError(
                f"tokenizer {path} has no end-of-document token: looked for {looked}; name "
                f"one with {path}{EOD_SUFFIX}TOKEN")
        self._finish(tok, [path], found[0][1])

    def __getstate__(self) -> dict:
        return {"args": self._args}

    def __setstate__(self, state: dict) -> None:
        self.__init__(*state["args"])


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

    def describe(self) -> dict[str, Any]:
        return _description("null", [], self.vocab_size, self.eod)

    def __repr__(self) -> str:
        return f"NullTokenizer(vocab_size={self.vocab_size})"


def _missing_model_message(path: str) -> str:
    return (
        f"tokenizer model not found: {path}. Train one with: python -m data_prep.train_tokenizer "
        f"--input corpus.jsonl --vocab-size 32000 --output {_strip_model_suffix(path)} "
        f"({ACCEPTED_FORMS})"
    )


def _strip_model_suffix(path: str) -> str:
    return path[: -len(".model")] if path.endswith(".model") else path


def build_tokenizer(spec: str) -> Tokenizer:
    """Build a tokenizer from a spec string; the forms are in this module's docstring."""
    spec = os.fspath(spec)
    if spec.startswith(NULL_PREFIX):
        try:
            n = int(spec[len(NULL_PREFIX):])
        except ValueError:
            raise ValueError(f"bad tokenizer spec {spec!r}; expected null:N, N an int") from None
        return NullTokenizer(n)
    path, eod_token = spec, None
    if EOD_SUFFIX in spec:
        path, eod_token = spec.rsplit(EOD_SUFFIX, 1)
        if not eod_token:
            raise ValueError(f"bad tokenizer spec {spec!r}: nothing after {EOD_SUFFIX}")
    if path.startswith(GPT2_BPE_PREFIX):
        files = path[len(GPT2_BPE_PREFIX):].split(",")
        if len(files) != 2 or not all(files):
            raise ValueError(f"bad tokenizer spec {spec!r}: expected gpt2-bpe:VOCAB,MERGES "
                             f"(two files, comma separated); {ACCEPTED_FORMS}")
        return GPT2BPETokenizer(files[0], files[1], eod_token)
    if os.path.isdir(path):
        vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        missing = [os.path.basename(f) for f in (vocab, merges) if not os.path.isfile(f)]
        if missing:
            hint = ""
            if os.path.isfile(os.path.join(path, "tokenizer.json")):
                hint = f" (for its tokenizer.json give {os.path.join(path, 'tokenizer.json')})"
            raise FileNotFoundError(f"tokenizer directory {path} has no {' or '.join(missing)}"
                                    f"{hint}; {ACCEPTED_FORMS}")
        return GPT2BPETokenizer(vocab, merges, eod_token)
    if path.endswith(".model"):
        if eod_token is not None:
            raise ValueError(f"bad tokenizer spec {spec!r}: a sentencepiece model takes no "
                             f"{EOD_SUFFIX} (its eos piece is the end of document)")
        if not os.path.isfile(path):
            raise FileNotFoundError(_missing_model_message(path))
        return SentencePieceTokenizer(path)
    if path.endswith(".json"):
        return HFJsonTokenizer(path, eod_token)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer not found: {path}; {ACCEPTED_FORMS}")
    raise ValueError(f"unknown tokenizer form: {spec}; {ACCEPTED_FORMS}")
