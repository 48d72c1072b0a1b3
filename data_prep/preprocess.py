"""Tokenize raw text into the indexed dataset format (OUT.bin + OUT.idx).

Beside them goes OUT.tokenizer_info.json, naming the tokenizer (kind, files, vocab size, eod,
sha256), so training refuses a data.tokenizer that would read the ids differently.

One sequence per document, documents in input order, so the output does not depend on the
number of workers. Reading is a generator and the worker pool is fed through a bounded window,
so memory stays flat however big the input is.

Example:
    python -m data_prep.preprocess --input data/corpus.jsonl \
        --tokenizer data/tok.model --output-prefix data/corpus --workers 4 --append-eod
    python -m data_prep.preprocess --input data/corpus.jsonl \
        --tokenizer gpt2-bpe:gpt2/vocab.json,gpt2/merges.txt --output-prefix data/corpus \
        --append-eod
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from megatron_paci.data.indexed_dataset import (
    IndexedDatasetBuilder,
    best_token_dtype,
    data_file_path,
    index_file_path,
)
from megatron_paci.data.tokenizer import build_tokenizer
from megatron_paci.data.tokenizer_record import record_path, write_tokenizer_record

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
HF_PREFIX = "hf:"


def available_cores() -> int:
    """CPU cores this process may use (respects affinity masks, e.g. under slurm)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _as_text(value: object, where: str, key: str) -> str:
    """The document under ``key``: a string (numbers are written out; null is empty)."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: {key!r} holds {type(value).__name__} {_clip(value)}; "
                         "expected a string")
    return value if isinstance(value, str) else str(value)


def _clip(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_unicode(text: str, where: str) -> str:
    """JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: the text holds {text[e.start]!r}, a lone surrogate and not "
                         "valid Unicode") from None
    return text


def _decode(raw: bytes, where: str, first: bool = False) -> str:
    try:  # a byte order mark may open the file (utf-8-sig); it is not text
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                         f"{e.start + 1}); expected UTF-8 text") from None


# --------------------------------------------------------------------------- input readers
# Each yields (text, bytes consumed, "FILE:LINE" of the document) per document.

Document = tuple[str, int, str]


def is_json_lines(path: str) -> bool:
    return path.lower().endswith(JSON_SUFFIXES)


def iter_jsonl(path: str, json_key: str = "text") -> Iterator[Document]:
    """Yield (text, bytes consumed, where) per JSON line; blank lines are ignored."""
    skipped = 0  # bytes of blank lines, counted with the next document for the progress bar
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            text = _decode(line, where, lineno == 1)
            if not text.strip():
                skipped += len(line)
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e}); expected one JSON object "
                                 "per line") from None
            except RecursionError:
                raise ValueError(f"{where}: JSON nested too deeply to read") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: a JSON {type(obj).__name__}, expected an object "
                                 f"with a {json_key!r} key")
            if json_key not in obj:
                keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
                raise ValueError(
                    f"{where}: no {json_key!r} key in this JSON line (its keys: {keys}); "
                    "choose the key with --json-key"
                )
            yield _check_unicode(_as_text(obj[json_key], where, json_key), where), \
                len(line) + skipped, where
            skipped = 0


def iter_text(path: str) -> Iterator[Document]:
    """Yield (document, bytes consumed, where) from plain text split on blank lines.

    A document is its lines joined by "\\n" (no trailing newline). The text must be UTF-8:
    a stray byte is an error naming the line, not a silent replacement character.
    """
    lines: list[str] = []
    nbytes = 0
    first = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            nbytes += len(raw)
            line = _decode(raw, f"{path}:{lineno}", lineno == 1).rstrip("\r\n")
            if line.strip():
                if not lines:
                    first = lineno
                lines.append(line)
            elif lines:
                yield "\n".join(lines), nbytes, f"{path}:{first}"
                lines, nbytes = [], 0
    if lines:
        yield "\n".join(lines), nbytes, f"{path}:{first}"


def iter_file_documents(path: str, json_key: str = "text") -> Iterator[Document]:
    """Documents of a local file: JSON lines (.jsonl/.json/.ndjson) or plain text otherwise."""
    if is_json_lines(path):
        return iter_jsonl(path, json_key)
    return iter_text(path)


def _is_saved_hf_dataset(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_dict.json"))
        or os.path.isfile(os.path.join(path, "state.json"))
    )


def open_hf_dataset(
    spec: str, split: str, data_files: list[str] | None
) -> tuple[Iterable[dict], int | None]:
    """Open ``hf:NAME[:CONFIG]`` (streaming) or ``hf:DIR`` saved with save_to_disk.

    Returns the rows and their number when it is known up front (for the progress bar).
    """
    import datasets

    name = spec[len(HF_PREFIX) :]
    if _is_saved_hf_dataset(name):
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"split {split!r} not in {name} (has {sorted(ds)})")
            ds = ds[split]
        return ds, len(ds)
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    ds = datasets.load_dataset(
        name, config, split=split, data_files=data_files or None, streaming=True
    )
    total = None
    try:
        total = int(ds.info.splits[split].num_examples)
    except Exception:  # the count is only a nicety for the progress bar
        total = None
    return ds, total


def iter_hf_documents(rows: Iterable[dict], json_key: str) -> Iterator[Document]:
    for i, row in enumerate(rows):
        where = f"row {i} of the dataset"
        if json_key not in row:
            raise ValueError(f"{where} has no {json_key!r} column (see --json-key)")
        yield _check_unicode(_as_text(row[json_key], where, json_key), where), 0, where


# --------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(tokenizer_spec: str, append_eod: bool, dtype_str: str) -> None:
    """Build the tokenizer once per worker process (it does not pickle cheaply)."""
    tok = build_tokenizer(tokenizer_spec)
    _WORKER.update(tokenizer=tok, append_eod=append_eod, dtype=np.dtype(dtype_str))


def _encode(item: Document) -> tuple[np.ndarray | None, int]:
    text, nbytes, where = item
    if not text.strip():
        return None, nbytes
    tok = _WORKER["tokenizer"]
    try:
        ids = tok.tokenize(text)
    except Exception as e:  # tokenizer libraries raise their own types; say which document
        raise ValueError(f"{where}: cannot tokenize this document: {e}") from None
    if _WORKER["append_eod"]:
        ids.append(tok.eod)
    if not ids:
        return None, nbytes
    return np.asarray(ids, dtype=_WORKER["dtype"]), nbytes


class _Window:
    """Hold back the reader so at most ``size`` documents are in flight.

    Pool.imap pulls its input in a background thread as fast as it can; without this the
    whole corpus could end up queued in memory. ``stop`` unblocks that thread on errors, so
    the pool can shut down (Pool.terminate joins it).
    """

    def __init__(self, size: int) -> None:
        self._sem = threading.Semaphore(size)
        self._stop = threading.Event()

    def feed(self, items: Iterable) -> Iterator:
        for item in items:
            while not self._sem.acquire(timeout=0.1):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            yield item

    def release(self) -> None:
        self._sem.release()

    def stop(self) -> None:
        self._stop.set()


# --------------------------------------------------------------------------- main


@dataclass
class Stats:
    docs: int = 0
    empty: int = 0
    tokens: int = 0
    nbytes: int = 0
    seconds: float = 0.0


class _Progress:
    """tqdm bar on a terminal; a plain line every --log-interval documents otherwise."""

    def __init__(self, total_bytes: int | None, total_docs: int | None, log_interval: int):
        self.total_bytes, self.total_docs = total_bytes, total_docs
        self.log_interval = max(1, log_interval)
        self.start = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            if total_bytes:
                self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing")
            else:
                self.bar = tqdm(total=total_docs, unit="doc", desc="tokenizing")
        self._pending_bytes = 0
        self._pending_docs = 0

    def update(self, stats: Stats, nbytes: int) -> None:
        self._pending_bytes += nbytes
        self._pending_docs += 1
        n = stats.docs + stats.empty
        if n % self.log_interval:
            return
        rate = stats.tokens / max(time.monotonic() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(self._pending_bytes if self.total_bytes else self._pending_docs)
            self.bar.set_postfix(docs=stats.docs, tok_s=f"{rate:,.0f}", refresh=False)
        else:
            where = ""
            if self.total_bytes:
                where = f" ({100.0 * stats.nbytes / self.total_bytes:.1f}% of input)"
            elif self.total_docs:
                where = f" ({100.0 * n / self.total_docs:.1f}% of docs)"
            print(f"  {stats.docs:,} docs, {stats.tokens:,} tokens, {rate:,.0f} tok/s{where}",
                  file=sys.stderr, flush=True)
        self._pending_bytes = self._pending_docs = 0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self._pending_bytes if self.total_bytes else self._pending_docs)
            self.bar.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.preprocess",
        description=(
            "Tokenize documents into OUT.bin + OUT.idx (Megatron indexed dataset), one "
            "sequence per document in input order. Inputs: JSON lines (.jsonl/.json/.ndjson, "
            "one object per line, text under --json-key); plain text (any other file; "
            "documents are separated by one or more blank lines); or a Hugging Face dataset "
            "via hf:NAME[:CONFIG] (streamed), hf:json --hf-data-files a.jsonl (local files), "
            "or hf:DIR for a directory written by save_to_disk."
        ),
    )
    p.add_argument("--input", required=True, help="input file, or hf:NAME[:CONFIG] / hf:DIR")
    p.add_argument("--tokenizer", required=True,
                   help="a sentencepiece .model file; a Hugging Face tokenizer .json file; a "
                   "directory with GPT-2's vocab.json + merges.txt, or gpt2-bpe:VOCAB,MERGES; "
                   "or null:N (text is ids). The .json and GPT-2 forms may end in #eod=TOKEN")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX.bin, PREFIX.idx and PREFIX.tokenizer_info.json")
    p.add_argument("--workers", type=int, default=available_cores(),
                   help="tokenizer processes; 1 runs in this process (default: all cores)")
    p.add_argument("--chunksize", type=int, default=64, help="documents per task sent to a worker")
    p.add_argument("--append-eod", action="store_true",
                   help="append the tokenizer's end-of-document id to every document")
    p.add_argument("--json-key", default="text", help="JSON key / dataset column with the text")
    p.add_argument("--hf-split", default="train", help="split for hf: inputs")
    p.add_argument("--hf-data-files", nargs="+", default=None,
                   help="local data files for hf:json / hf:text / hf:parquet ...")
    p.add_argument("--log-interval", type=int, default=1000,
                   help="documents between progress updates; without a terminal on stderr each "
                   "update is a printed line instead of the tqdm bar")
    return p


def _check_output_dir(prefix: str) -> None:
    if not os.path.basename(prefix) or os.path.isdir(prefix):
        raise ValueError(f"--output-prefix {prefix} is a directory; give a path prefix such "
                         f"as {os.path.join(prefix, 'corpus')} (writes corpus.bin, corpus.idx)")
    for path in (data_file_path(prefix), index_file_path(prefix), record_path(prefix)):
        if os.path.isdir(path):
            raise ValueError(f"--output-prefix {prefix}: {path} is a directory")
    out_dir = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create output directory {out_dir}: {e}") from None
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"output directory is not writable: {out_dir}")


def preprocess(args: argparse.Namespace) -> Stats:
    """Run the whole pipeline; raises before any work if input/tokenizer/output are unusable."""
    if _is_saved_hf_dataset(args.input):
        args.input = HF_PREFIX + args.input
    is_hf = args.input.startswith(HF_PREFIX)
    if not is_hf and not os.path.exists(args.input):
        raise FileNotFoundError(f"input not found: {args.input}")
    if not is_hf and not os.path.isfile(args.input):
        raise ValueError(f"input {args.input} is not a file (nor a dataset saved with "
                         "save_to_disk)")
    if args.hf_data_files:
        for f in args.hf_data_files:
            if not os.path.exists(f):
                raise FileNotFoundError(f"--hf-data-files entry not found: {f}")
    tokenizer = build_tokenizer(args.tokenizer)  # FileNotFoundError names the path
    _check_output_dir(args.output_prefix)
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")

    dtype = np.dtype(best_token_dtype(tokenizer.vocab_size))
    total_bytes = total_docs = None
    if is_hf:
        rows, total_docs = open_hf_dataset(args.input, args.hf_split, args.hf_data_files)
        docs: Iterable[tuple[str, int]] = iter_hf_documents(rows, args.json_key)
    else:
        total_bytes = os.path.getsize(args.input)
        docs = iter_file_documents(args.input, args.json_key)

    bin_path, idx_path = data_file_path(args.output_prefix), index_file_path(args.output_prefix)
    rec_path = record_path(args.output_prefix)
    tmp_bin, tmp_idx, tmp_rec = bin_path + ".tmp", idx_path + ".tmp", rec_path + ".tmp"
    stats = Stats()
    start = time.monotonic()
    progress = _Progress(total_bytes, total_docs, args.log_interval)
    init_args = (args.tokenizer, bool(args.append_eod), dtype.str)
    builder = IndexedDatasetBuilder(tmp_bin, dtype)
    try:
        if args.workers == 1:
            _init_worker(*init_args)
            _consume(map(_encode, docs), builder, stats, progress, None)
        else:
            chunksize = max(1, args.chunksize)
            window = _Window(chunksize * args.workers * 4)
            with multiprocessing.Pool(args.workers, _init_worker, init_args) as pool:
                try:
                    results = pool.imap(_encode, window.feed(docs), chunksize=chunksize)
                    _consume(results, builder, stats, progress, window)
                finally:
                    window.stop()
        if stats.docs == 0:
            raise ValueError(f"{args.input}: no documents to write ({stats.empty:,} empty "
                             "skipped); expected at least one non-empty document")
        builder.finalize(tmp_idx)
        write_tokenizer_record(tmp_rec, tokenizer, args.tokenizer)
        # The .idx goes last, and an old one first: whatever stops this midway, an .idx
        # beside a .bin is one written for it.
        if os.path.exists(idx_path):
            os.remove(idx_path)
        os.replace(tmp_rec, rec_path)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    except BaseException:
        progress.close()
        for p in (tmp_bin, tmp_idx, tmp_rec):
            if os.path.exists(p):
                os.remove(p)
        raise
    progress.close()
    stats.seconds = time.monotonic() - start
    return stats


def _consume(
    results: Iterable, builder, stats: Stats, progress: _Progress, window: _Window | None
) -> None:
    for arr, nbytes in results:
        if window is not None:
            window.release()
        stats.nbytes += nbytes
        if arr is None:
            stats.empty += 1
        else:
            builder.add_document(arr)  # one sequence per document
            stats.docs += 1
            stats.tokens += int(arr.size)
        progress.update(stats, nbytes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stats = preprocess(args)
    except (OSError, ValueError) as e:  # OSError: FileNotFound, Permission, disk full...
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; {args.output_prefix}.bin/.idx not written", file=sys.stderr)
        return 130
    rate = stats.tokens / max(stats.seconds, 1e-9)
    print(
        f"done: {stats.docs:,} documents ({stats.empty:,} empty skipped), {stats.tokens:,} tokens "
        f"in {stats.seconds:.1f} s ({rate:,.0f} tok/s)\n"
        f"  {data_file_path(args.output_prefix)}\n  {index_file_path(args.output_prefix)}\n"
        f"  {record_path(args.output_prefix)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
