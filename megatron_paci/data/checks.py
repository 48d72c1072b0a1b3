"""Checks a dataset must pass before training reads it, beyond its file format.

A token id at or past the tokenizer's vocabulary means the data was made with another
tokenizer (or the `.bin` is damaged): past the model's embedding it stops step 1 with
"index out of range in self", below it it trains rows no text ever maps to. The ids
are scanned once per `.bin`; the range found is cached in a small JSON keyed by the
size and mtime of the `.bin` and `.idx`, so later launches do not read the data again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np

from megatron_paci.data.indexed_dataset import (
    IndexedDataset,
    data_file_path,
    index_file_path,
)

TOKEN_RANGE_FORMAT = "megatron_paci token range v1"
# Tokens per vectorised pass: 32 MiB of uint16, fast and bounded in memory.
_SCAN_CHUNK = 1 << 24
# Below this a scan takes well under a second and needs no progress bar.
_PROGRESS_BYTES = 1 << 28


class DataError(ValueError):
    """The data cannot train this model; the message names the file and what is wrong."""


def _fallback_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "megatron_paci_index_cache")


def _stamp(prefix: str) -> dict:
    """What must not change for a cached scan to still describe the files."""
    out = {}
    for kind, path in (("bin", data_file_path(prefix)), ("idx", index_file_path(prefix))):
        st = os.stat(path)
        out[f"{kind}_size"], out[f"{kind}_mtime_ns"] = st.st_size, st.st_mtime_ns
    return out


def token_range_cache_path(prefix: str, directory: str) -> str:
    """The cache's name: the prefix's basename plus a hash of its absolute path."""
    h = hashlib.sha256(os.path.abspath(prefix).encode()).hexdigest()[:10]
    return os.path.join(directory, f"{os.path.basename(prefix)}_{h}_token_range.json")


def _cache_dirs(prefix: str, cache_dir: str | None) -> tuple[list[str], list[str]]:
    """(directories to read from, directories to try writing to), as the index caches."""
    data_dir = os.path.dirname(os.path.abspath(prefix))
    primary = os.path.abspath(cache_dir) if cache_dir else data_dir
    fallback = _fallback_cache_dir()
    return list(dict.fromkeys([primary, data_dir, fallback])), list(
        dict.fromkeys([primary, fallback])
    )


def _read_cached(path: str, key: dict) -> tuple[float, float] | None:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("format") != TOKEN_RANGE_FORMAT or record.get("key") != key:
            return None
        return record["min"], record["max"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable or stale: scan again


def _write_cached(directories: list[str], prefix: str, key: dict, lo: float, hi: float) -> None:
    record = {"format": TOKEN_RANGE_FORMAT, "prefix": os.path.abspath(prefix), "key": key,
              "min": lo, "max": hi}
    for directory in directories:
        path = token_range_cache_path(prefix, directory)
        tmp = None
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f)
            os.replace(tmp, path)  # atomic: ranks scanning at once never see half a file
            return
        except OSError:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
            continue  # a cache only saves time; the next directory, or none


def scan_token_range(indexed: IndexedDataset, progress: bool = False) -> tuple[float, float]:
    """(min, max) token id over the whole `.bin`, in vectorised chunks of the memmap."""
    from tqdm import tqdm

    tokens = indexed.all_tokens()
    signed = not np.issubdtype(indexed.dtype, np.unsignedinteger)
    lo, hi = None, None
    bar = tqdm(total=tokens.size * indexed.dtype.itemsize, unit="B", unit_scale=True,
               desc=f"token ids {os.path.basename(data_file_path(indexed.prefix))}",
               disable=not progress or tokens.nbytes < _PROGRESS_BYTES)
    with bar:
        for start in range(0, tokens.size, _SCAN_CHUNK):
            part = tokens[start : start + _SCAN_CHUNK]
            part_hi = part.max()
            hi = part_hi if hi is None else max(hi, part_hi)
            if signed:  # unsigned ids cannot be negative: half the work saved
                part_lo = part.min()
                lo = part_lo if lo is None else min(lo, part_lo)
            bar.update(part.nbytes)
    if hi is None:
        return 0, -1  # no tokens
    if lo is None:
        lo = 0
    as_number = float if np.issubdtype(indexed.dtype, np.floating) else int
    return as_number(lo), as_number(hi)


def token_range(
    indexed: IndexedDataset, cache_dir: str | None = None, progress: bool = False
) -> tuple[float, float]:
    """(min, max) token id of the dataset, from the cache when the files are unchanged."""
    key = _stamp(indexed.prefix)
    read_dirs, write_dirs = _cache_dirs(indexed.prefix, cache_dir)
    for directory in read_dirs:
        cached = _read_cached(token_range_cache_path(indexed.prefix, directory), key)
        if cached is not None:
            return cached
    lo, hi = scan_token_range(indexed, progress)
    _write_cached(write_dirs, indexed.prefix, key, lo, hi)
    return lo, hi


def _first_outside(indexed: IndexedDataset, vocab_size: int) -> tuple[int, float]:
    """(position, value) of the first token outside [0, vocab_size); the error path only."""
    tokens = indexed.all_tokens()
    for start in range(0, tokens.size, _SCAN_CHUNK):
        part = tokens[start : start + _SCAN_CHUNK]
        bad = np.flatnonzero(~((part >= 0) & (part < vocab_size)))
        if bad.size:
            return start + int(bad[0]), part[bad[0]].item()
    return -1, 0


def check_token_ids(
    indexed: IndexedDataset,
    vocab_size: int,
    vocab_source: str,
    cache_dir: str | None = None,
    progress: bool = False,
) -> None:
    """Refuse a dataset holding ids outside [0, vocab_size) of `vocab_source`."""
    dtype = indexed.dtype
    if np.issubdtype(dtype, np.unsignedinteger) and np.iinfo(dtype).max < vocab_size:
        return  # the dtype cannot hold an id this large
    lo, hi = token_range(indexed, cache_dir, progress)
    if hi < lo:  # empty
        return
    if 0 <= lo and hi < vocab_size:  # written so that NaN fails too
        return
    pos, value = _first_outside(indexed, vocab_size)
    seq = int(np.searchsorted(indexed.sequence_pointers, pos * dtype.itemsize, "right")) - 1
    doc = int(np.searchsorted(indexed.document_indices, seq, "right")) - 1
    span = f"max token id {hi}" if 0 <= lo else f"token ids from {lo} to {hi}"
    raise DataError(
        f"{data_file_path(indexed.prefix)}: {span}, but {vocab_source} has a vocabulary of "
        f"{vocab_size} (ids 0..{vocab_size - 1}); first id {value} at token {pos} "
        f"(sequence {seq}, document {doc}). The data was tokenized with another tokenizer "
        "(set data.tokenizer to that one) or the .bin is damaged (preprocess it again)"
    )
