"""Train a sentencepiece BPE tokenizer (with byte fallback) on raw text.

Writes PREFIX.model and PREFIX.vocab. Special ids are fixed so every model built here agrees
with megatron_paci.data.tokenizer: unk=0, bos=1, eos=2 (used as end-of-document), no pad.
Pieces 3..258 are the 256 byte-fallback pieces <0x00>..<0xFF>, so any text encodes without
unk. Normalization is off (identity, extra whitespace kept), so decode(encode(s)) == s.

Example:
    python -m data_prep.train_tokenizer --input data/corpus.jsonl --vocab-size 8000 \
        --output data/tok
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Iterator

from data_prep.preprocess import available_cores, iter_file_documents

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, -1
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
        for text, _ in iter_file_documents(path, json_key):
            for line in text.splitlines():
                if not line.strip():
                    continue
                for piece in split_long_line(line):
                    if counter is not None:
                        counter[0] += 1
                    yield piece


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

    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input not found: {path}")
    if vocab_size <= 259:
        raise ValueError(
            f"--vocab-size {vocab_size} is too small: 3 special + 256 byte pieces need 259 ids, "
            "plus the characters and merges of the corpus"
        )
    if output.endswith(".model"):
        output = output[: -len(".model")]
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    if max_sentences and max_sentences <= 100:
        raise ValueError("--max-sentences must be 0 (all) or above 100 (a sentencepiece limit)")

    spm.set_random_generator_seed(seed)  # the shuffle/sample of input sentences is reproducible
    counter = [0]
    start = time.monotonic()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter_sentences(inputs, json_key, counter),
        model_prefix=output,
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
    return {
        "model": output + ".model",
        "vocab": output + ".vocab",
        "vocab_size": vocab_size,
        "sentences_read": counter[0],
        "seconds": time.monotonic() - start,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.train_tokenizer",
        description=(
            "Train a sentencepiece BPE model with byte fallback. Inputs: JSON lines "
            "(.jsonl/.json/.ndjson, text under --json-key) or plain text. Documents are fed "
            "line by line. Ids: unk=0, bos=1, eos=2 (end of document), no pad."
        ),
    )
    p.add_argument("--input", nargs="+", required=True, help="one or more input files")
    p.add_argument("--vocab-size", type=int, required=True,
                   help="pieces in the vocabulary, special ids included (e.g. 4096)")
    p.add_argument("--output", required=True, help="writes OUTPUT.model and OUTPUT.vocab")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="train on a shuffled sample of at most this many lines (0 = all)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters given their own piece; the rest use bytes")
    p.add_argument("--json-key", default="text",
                   help="key holding the text in JSON-lines input (default text)")
    p.add_argument("--num-threads", type=int, default=None, help="default: available cores")
    p.add_argument("--seed", type=int, default=1234,
                   help="seed of the line sample taken with --max-sentences (default 1234)")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = train(
            args.input,
            args.vocab_size,
            args.output,
            max_sentences=args.max_sentences,
            character_coverage=args.character_coverage,
            json_key=args.json_key,
            num_threads=args.num_threads,
            seed=args.seed,
            verbose=args.verbose,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # sentencepiece reports bad settings this way
        print(f"error: sentencepiece training failed: {e}", file=sys.stderr)
        return 1
    print(
        f"trained BPE tokenizer: vocab {info['vocab_size']}, {info['sentences_read']:,} lines "
        f"read, {info['seconds']:.1f} s\n  {info['model']}\n  {info['vocab']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
