"""Train a tokenizer on raw text: sentencepiece BPE (the default) or GPT-2 style byte-level BPE.

``--type sentencepiece`` writes PREFIX.model and PREFIX.vocab. Special ids are fixed so every
model built here agrees with megatron_paci.data.tokenizer: unk=0, bos=1, eos=2 (used as
end-of-document), no pad. Pieces 3..258 are the 256 byte-fallback pieces <0x00>..<0xFF>, so
any text encodes without unk. Normalization is off (identity, extra whitespace kept), so
decode(encode(s)) == s.

``--type bpe`` trains a byte-level BPE with the ``tokenizers`` library (GPT-2's byte-level
pre-tokenizer and decoder, ``<|endoftext|>`` as the only special token, id 0, used as
end-of-document) and writes into the directory OUTPUT: ``tokenizer.json`` plus GPT-2's file
pair ``vocab.json`` and ``merges.txt``. Any text round-trips without unknown tokens. Give
``OUTPUT/tokenizer.json`` or ``OUTPUT`` (the GPT-2 pair) as the tokenizer to preprocess and
training.

Examples:
    python -m data_prep.train_tokenizer --input data/corpus.jsonl --vocab-size 8000 \
        --output data/tok
    python -m data_prep.train_tokenizer --type bpe --input data/corpus.jsonl \
        --vocab-size 8000 --output data/bpe
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator

from data_prep.preprocess import available_cores, iter_file_documents

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, -1
BPE_EOD_TOKEN = "<|endoftext|>"
BYTE_LEVEL_ALPHABET = 256
MAX_SENTENCE_BYTES = 4192  # sentencepiece drops longer sentences; we split them instead


def split_long_line(line: str, max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Cut a line into pieces under max_bytes (UTF-8), at spaces where possible."""
    if len(line.encode("utf-8")) <= max_bytes:
        yield line
        return
    # Characters take at most 4 bytes, so max_bytes // 4 characters always fit.
    limit = max(1, max_bytes // 4)
    while line:
        if len(line.encode("utf-8")) <= max_bytes:
            yield line
            return
        cut = line.rfind(" ", limit // 2, limit)
        cut = limit if cut <= 0 else cut
        yield line[:cut]
        line = line[cut:]


def iter_sentences(
    paths: Iterable[str], json_key: str = "text", counter: list[int] | None = None
) -> Iterator[str]:
    """Lines of every document of every input, long ones split; blank lines skipped."""
    for path in paths:
        for text, *_ in iter_file_documents(path, json_key):
            for line in text.splitlines():
                if not line.strip():
                    continue
                for piece in split_long_line(line):
                    if counter is not None:
                        counter[0] += 1
                    yield piece


def _check_inputs(inputs: list[str], json_key: str) -> None:
    """Every input is a file and there is some text, before the trainer is started."""
    for path in inputs:
        if not os.path.exists(path):
            raise FileNotFoundError(f"input not found: {path}")
        if not os.path.isfile(path):
            raise ValueError(f"input {path} is not a file")
    if next(iter_documents(inputs, json_key), None) is None:
        raise ValueError(f"no text to train on in {', '.join(inputs)}: every document is "
                         "empty; expected at least one non-empty document")


def train(
    inputs: list[str],
    vocab_size: int,
    output: str,
    *,
    max_sentences: int = 2_000_000,
    character_coverage: float = 0.9995,
    json_key: str = "text",
    num_threads: int | None = None,
    seed: int = 1234,
    verbose: bool = False,
) -> dict:
    """Train and write ``output``.model/.vocab; returns a small summary dict."""
    import sentencepiece as spm

    _check_inputs(inputs, json_key)
    if vocab_size <= 259:
        raise ValueError(
            f"--vocab-size {vocab_size} is too small: 3 special + 256 byte pieces need 259 ids, "
            "plus the characters and merges of the corpus"
        )
    if output.endswith(".model"):
        output = output[: -len(".model")]
    if not os.path.basename(output) or os.path.isdir(output):
        raise ValueError(f"--output {output} is a directory; --type sentencepiece takes a "
                         f"prefix such as {os.path.join(output, 'tok')} (writes tok.model)")
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    if max_sentences and max_sentences <= 100:
        raise ValueError("--max-sentences must be 0 (all) or above 100 (a sentencepiece limit)")

    spm.set_random_generator_seed(seed)  # the shuffle/sample of input sentences is reproducible
    counter = [0]
    start = time.monotonic()
    reader = _Reader(iter_sentences(inputs, json_key, counter))
    # Trained under a temporary prefix and renamed, .model last: a run that fails midway
    # leaves no model that looks complete.
    tmp = tempfile.mkdtemp(prefix=".train_tokenizer-", dir=out_dir)
    try:
        with reader.reraise():
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(reader),
                model_prefix=os.path.join(tmp, "tok"),
                model_type="bpe",
                vocab_size=vocab_size,
                byte_fallback=True,
                character_coverage=character_coverage,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_id=PAD_ID,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                split_digits=True,
                allow_whitespace_only_pieces=True,
                max_sentence_length=MAX_SENTENCE_BYTES,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                num_threads=num_threads or available_cores(),
                minloglevel=0 if verbose else 1,
            )
        os.replace(os.path.join(tmp, "tok.vocab"), output + ".vocab")
        os.replace(os.path.join(tmp, "tok.model"), output + ".model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "model": output + ".model",
        "vocab": output + ".vocab",
        "vocab_size": vocab_size,
        "sentences_read": counter[0],
        "seconds": time.monotonic() - start,
    }


class _Reader:
    """Feeds a trainer and keeps the input's own error (file and line).

    Both training libraries turn an exception raised by the iterator into their own
    RuntimeError carrying a Python traceback, or stop quietly and train on what they got.
    """

    def __init__(self, items: Iterator[str]) -> None:
        self._items = items
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._items
        except Exception as e:
            self.error = e
            raise

    @contextlib.contextmanager
    def reraise(self) -> Iterator[None]:
        try:
            yield
        except Exception:
            if self.error is not None:
                raise self.error from None
            raise
        if self.error is not None:
            raise self.error


def iter_documents(paths: Iterable[str], json_key: str = "text",
                   counter: list[int] | None = None) -> Iterator[str]:
    """Whole documents of every input (newlines kept, so merges can span them)."""
    for path in paths:
        for text, *_ in iter_file_documents(path, json_key):
            if text.strip():
                if counter is not None:
                    counter[0] += 1
                yield text


def train_byte_level_bpe(
    inputs: list[str],
    vocab_size: int,
    output: str,
    *,
    json_key: str = "text",
    min_frequency: int = 2,
    verbose: bool = False,
) -> dict:
    """Train a byte-level BPE; writes OUTPUT/tokenizer.json, vocab.json, merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_inputs(inputs, json_key)
    if vocab_size <= BYTE_LEVEL_ALPHABET + 1:
        raise ValueError(
            f"--vocab-size {vocab_size} is too small: <|endoftext|> + 256 byte symbols need "
            f"{BYTE_LEVEL_ALPHABET + 1} ids, plus the merges of the corpus")
    if os.path.isfile(output):
        raise ValueError(f"--output {output} is a file; --type bpe writes into a directory")
    os.makedirs(output, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[BPE_EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=verbose)
    counter = [0]
    start = time.monotonic()
    reader = _Reader(iter_documents(inputs, json_key, counter))
    with reader.reraise():
        tok.train_from_iterator(iter(reader), trainer)
    # Written beside, then renamed, tokenizer.json last: a run stopped midway leaves no set
    # of files that looks complete.
    tmp = tempfile.mkdtemp(prefix=".train_tokenizer-", dir=output)
    try:
        tok.save(os.path.join(tmp, "tokenizer.json"))
        tok.model.save(tmp)
        files = [os.path.join(output, n) for n in ("vocab.json", "merges.txt", "tokenizer.json")]
        for f in files:
            os.replace(os.path.join(tmp, os.path.basename(f)), f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokenizer_json, vocab_json, merges_txt = files[2], files[0], files[1]
    return {
        "files": [tokenizer_json, vocab_json, merges_txt],
        "vocab_size": tok.get_vocab_size(),
        "read": f"{counter[0]:,} documents",
        "seconds": time.monotonic() - start,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.train_tokenizer",
        description=(
            "Train a tokenizer. Inputs: JSON lines (.jsonl/.json/.ndjson, text under "
            "--json-key) or plain text (documents separated by blank lines). --type "
            "sentencepiece (default): a sentencepiece BPE model with byte fallback, fed line "
            "by line; ids unk=0, bos=1, eos=2 (end of document), no pad. --type bpe: a GPT-2 "
            "style byte-level BPE (tokenizers library), fed whole documents; <|endoftext|>=0 "
            "is the end of document."
        ),
    )
    p.add_argument("--type", choices=("sentencepiece", "bpe"), default="sentencepiece",
                   help="sentencepiece: OUTPUT.model (default); bpe: byte-level BPE files in "
                   "the directory OUTPUT")
    p.add_argument("--input", nargs="+", required=True, help="one or more input files")
    p.add_argument("--vocab-size", type=int, required=True,
                   help="number of ids, special and byte pieces included")
    p.add_argument("--output", required=True,
                   help="sentencepiece: prefix, writes OUTPUT.model and OUTPUT.vocab; bpe: a "
                   "directory, writes tokenizer.json, vocab.json and merges.txt in it")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="sentencepiece only: train on a shuffled sample of at most this many "
                   "lines (0 = all)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="sentencepiece only: share of characters given their own piece; the "
                   "rest use bytes")
    p.add_argument("--min-frequency", type=int, default=2,
                   help="bpe only: a pair must occur this often to be merged")
    p.add_argument("--json-key", default="text", help="JSON key holding the text")
    p.add_argument("--num-threads", type=int, default=None,
                   help="sentencepiece only: training threads (default: available cores)")
    p.add_argument("--seed", type=int, default=1234,
                   help="sentencepiece only: seed of the sentence sample and shuffle")
    p.add_argument("--verbose", action="store_true",
                   help="show the training library's own log / progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.type == "bpe":
            info = train_byte_level_bpe(args.input, args.vocab_size, args.output,
                                        json_key=args.json_key,
                                        min_frequency=args.min_frequency, verbose=args.verbose)
        else:
            info = train(args.input, args.vocab_size, args.output,
                         max_sentences=args.max_sentences,
                         character_coverage=args.character_coverage, json_key=args.json_key,
                         num_threads=args.num_threads, seed=args.seed, verbose=args.verbose)
            info.update(files=[info["model"], info["vocab"]],
                        read=f"{info['sentences_read']:,} lines")
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # sentencepiece reports bad settings this way
        print(f"error: sentencepiece training failed: {' '.join(str(e).split())}",
              file=sys.stderr)
        return 1
    kind = "byte-level BPE" if args.type == "bpe" else "sentencepiece BPE"
    files = "".join(f"\n  {f}" for f in info["files"])
    print(f"trained {kind} tokenizer: vocab {info['vocab_size']}, {info['read']} read, "
          f"{info['seconds']:.1f} s{files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
