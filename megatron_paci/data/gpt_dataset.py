"""GPT pretraining samples over an indexed dataset, the way Megatron-LM draws them.

Documents of a split are shuffled (per epoch group), concatenated into one token
stream and cut into samples of `seq_length + 1` tokens that overlap by one token, so
every token except the last of the stream is a prediction target exactly once per
epoch. Three index arrays describe this and are cached on disk:

- document index: the shuffled order of documents over all epochs;
- sample index: for sample k, where its first token lies (position in the document
  index, offset in that document); row k + 1 is where it ends;
- shuffle index: the order samples are served in.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megatron_paci.data.blended import BlendedDataset
from megatron_paci.data.checks import DataError, check_token_ids
from megatron_paci.data.indexed_dataset import (
    IndexedDataset,
    data_file_path,
    index_file_path,
)

SPLIT_NAMES = ("train", "valid", "test")
# Bump when the index-building algorithm changes, so old caches are not reused.
_INDEX_ALGORITHM_VERSION = "1"
# Megatron asks each blended child for 0.5% more samples than its share, as slack.
_BLEND_OVERSAMPLE = 1.005
# A split repeated more often than this is worth a warning: the run sees little new text.
MANY_EPOCHS = 10


def parse_split(split: str) -> list[float]:
    """Parse "969,30,1" (or "969/30/1") into normalized train/valid/test weights.

    Missing trailing entries count as 0, as in Megatron ("98,2" has no test split).
    """
    text = str(split).strip()
    sep = "/" if "/" in text else ","
    parts = [p.strip() for p in text.split(sep)]
    if not text or any(p == "" for p in parts):
        raise ValueError(f"bad split string {split!r}: expected e.g. '969,30,1'")
    if len(parts) > 3:
        raise ValueError(f"bad split string {split!r}: at most 3 entries (train,valid,test)")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"bad split string {split!r}: entries must be numbers") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"bad split string {split!r}: entries must be finite and >= 0")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"bad split string {split!r}: entries must not all be 0")
    values += [0.0] * (3 - len(values))
    return [v / total for v in values]


def split_document_ranges(num_documents: int, split: str) -> list[tuple[int, int]]:
    """Three contiguous [start, end) document ranges, rounded as Megatron rounds them.

    Each split gets round(weight * N) documents (Python's round-half-even); whatever
    rounding leaves over or short is absorbed by the first split.
    """
    if num_documents < 0:
        raise ValueError(f"num_documents must be >= 0, got {num_documents}")
    weights = parse_split(split)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * float(num_documents))))
    diff = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    if any(b < a for a, b in zip(bounds, bounds[1:], strict=False)) or bounds[1] < 0:
        raise ValueError(
            f"split {split!r} over {num_documents} documents gives invalid ranges {bounds}"
        )
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def get_num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose tokens yield `num_samples` samples: (E*T - 1) // L >= N."""
    if tokens_per_epoch <= 0:
        raise ValueError(f"tokens_per_epoch must be > 0, got {tokens_per_epoch}")
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def use_separate_last_epoch(
    num_epochs: int, tokens_per_epoch: int, seq_length: int, num_samples: int
) -> bool:
    """Megatron shuffles the last epoch on its own when less than 80% of it is used.

    Otherwise the few samples taken from the last epoch would be drawn from a mix
    dominated by earlier epochs, over-representing repeated documents.
    """
    if num_epochs == 1:
        return False
    from_earlier = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    last_epoch_samples = num_samples - from_earlier
    per_epoch = (tokens_per_epoch - 1) // seq_length
    if not 0 <= last_epoch_samples <= per_epoch + 1:
        raise ValueError(
            f"{num_epochs} epochs is not the fewest for {num_samples} samples of "
            f"{seq_length} tokens from {tokens_per_epoch} tokens per epoch"
        )
    return last_epoch_samples < int(0.80 * per_epoch)


def build_document_index(
    documents: np.ndarray,
    num_epochs: int,
    rng: np.random.RandomState,
    separate_last_epoch: bool,
) -> np.ndarray:
    """Documents repeated `num_epochs` times and shuffled (last epoch apart if asked)."""
    documents = np.asarray(documents, dtype=np.int64)
    if not separate_last_epoch or num_epochs == 1:
        index = np.tile(documents, num_epochs)
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_index(
    sizes: np.ndarray,
    document_index: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
) -> np.ndarray:
    """Sample boundaries as (position in document_index, token offset) rows.

    Sample k spans stream tokens [k*L, k*L + L], so row k (k >= 1) is simply the
    location of stream token k*L; row 0 is (0, 0). Located with one searchsorted over
    cumulative document sizes, which lands on the document that actually holds the
    token (empty documents are skipped).
    """
    if seq_length <= 0:
        raise ValueError(f"seq_length must be > 0, got {seq_length}")
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    doc_sizes = np.asarray(sizes)[np.asarray(document_index)].astype(np.int64)
    ends = np.cumsum(doc_sizes)
    total = int(ends[-1]) if ends.size else 0
    if num_samples > 0 and total < num_samples * seq_length + 1:
        raise ValueError(
            f"document index holds {total} tokens, fewer than the "
            f"{num_samples * seq_length + 1} that {num_samples} samples need"
        )
    sample_index = np.zeros((max(num_samples, 0) + 1, 2), dtype=np.int64)
    if num_samples > 0:
        positions = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
        doc_pos = np.searchsorted(ends, positions, side="right")
        sample_index[1:, 0] = doc_pos
        sample_index[1:, 1] = positions - (ends[doc_pos] - doc_sizes[doc_pos])
    return sample_index


def build_shuffle_index(
    num_samples: int, total_size: int, rng: np.random.RandomState
) -> np.ndarray:
    """Permutation of [0, total_size): the first `num_samples` and the rest shuffled apart."""
    first = np.arange(num_samples, dtype=np.int64)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=np.int64)
    rng.shuffle(last)
    return np.concatenate((first, last))


def _document_sizes(indexed: IndexedDataset) -> np.ndarray:
    """Tokens per document (a document may hold several sequences)."""
    lengths = np.concatenate(([0], np.cumsum(indexed.sequence_lengths, dtype=np.int64)))
    return np.diff(lengths[np.asarray(indexed.document_indices)])


def _save_atomic(path: str, array: np.ndarray) -> None:
    """Write via a temp file and os.replace, so readers never see a partial file."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_VALIDATE_CHUNK = 1 << 22  # rows per vectorised pass when checking a cached index


def _chunked_range(arr: np.ndarray) -> tuple[int, int]:
    """(min, max) of a memory-mapped array, read a bounded piece at a time."""
    lo, hi = None, None
    for start in range(0, arr.shape[0], _VALIDATE_CHUNK):
        part = np.asarray(arr[start : start + _VALIDATE_CHUNK])
        lo = int(part.min()) if lo is None else min(lo, int(part.min()))
        hi = int(part.max()) if hi is None else max(hi, int(part.max()))
    return (0, -1) if lo is None else (lo, hi)


def _sample_index_problem(
    sample_index: np.ndarray, document_index: np.ndarray, document_sizes: np.ndarray
) -> str | None:
    """Rows 1.. must point at real tokens, in stream order."""
    prev = 0
    for start in range(1, sample_index.shape[0], _VALIDATE_CHUNK):
        rows = np.asarray(sample_index[start : start + _VALIDATE_CHUNK])
        pos, off = rows[:, 0], rows[:, 1]
        if int(pos.min()) < prev or np.any(np.diff(pos) < 0):
            return "not in stream order (positions decrease)"
        if int(pos.max()) >= document_index.shape[0]:
            return (f"pointing at document index position {int(pos.max())}, past its "
                    f"{document_index.shape[0]} entries")
        sizes = document_sizes[np.asarray(document_index[pos])]
        if int(off.min()) < 0 or np.any(off >= sizes):
            return "pointing at token offsets outside their documents"
        prev = int(pos[-1])
    return None


def _fallback_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "megatron_paci_index_cache")


_CACHE_KINDS = ("document_index", "sample_index", "shuffle_index")


class GPTDataset(torch.utils.data.Dataset):
    """Samples of `seq_length + 1` tokens (inputs plus shifted labels) from `documents`.

    `len()` is the number of samples the built epochs hold, which is at least
    `num_samples` (as in Megatron); the extra samples come from the last epoch.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        prefix: str,
        name: str,
        documents: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: str | None = None,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"{name}: num_samples must be > 0, got {num_samples}")
        if seq_length <= 0:
            raise ValueError(f"{name}: seq_length must be > 0, got {seq_length}")
        self.indexed = indexed
        self.prefix = prefix
        self.name = name
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.documents = np.asarray(documents, dtype=np.int64)
        self.document_sizes = _document_sizes(indexed)
        num_docs = self.document_sizes.shape[0]
        if self.documents.size == 0:
            raise ValueError(f"{name}: no documents given for {prefix}")
        if self.documents.min() < 0 or self.documents.max() >= num_docs:
            raise ValueError(f"{name}: document ids must lie in [0, {num_docs}) for {prefix}")
        self.tokens_per_epoch = int(self.document_sizes[self.documents].sum())
        self._check_corpus_size()

        self.document_index, self.sample_index, self.shuffle_index = self._load_or_build(cache_dir)

    def _check_corpus_size(self) -> None:
        """Refuse a split shorter than one sample; warn when it must repeat many times.

        Megatron would repeat a corpus of 10 tokens hundreds of times to fill samples
        of 2049, which trains on nothing but repetition and says nothing.
        """
        need = self.seq_length + 1
        what = (f"{self.prefix}: the {self.name} split ({self.documents.size} documents, "
                f"{self.tokens_per_epoch} tokens)")
        if self.tokens_per_epoch < need:
            raise DataError(
                f"{what} is shorter than one sample of seq_length {self.seq_length}, which "
                f"needs {need} tokens; give more data, a larger share of it to {self.name} "
                "in data.split, or a shorter model.seq_length"
            )
        epochs = get_num_epochs(self.tokens_per_epoch, self.seq_length, self.num_samples)
        if epochs > MANY_EPOCHS:
            warnings.warn(
                f"{what} holds {(self.tokens_per_epoch - 1) // self.seq_length} samples of "
                f"{need} tokens; the {self.num_samples} samples asked for repeat it "
                f"{epochs} times",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- index construction and caching -------------------------------------------------

    def _cache_key(self) -> str:
        """Hash of everything the three indices depend on."""
        h = hashlib.sha256()
        for part in (
            _INDEX_ALGORITHM_VERSION,
            self.name,
            self.num_samples,
            self.seq_length,
            self.seed,
        ):
            h.update(repr(part).encode() + b"\0")
        for arr in (self.documents, self.indexed.sequence_lengths, self.indexed.document_indices):
            a = np.ascontiguousarray(arr, dtype=np.int64)
            h.update(repr(a.shape).encode())
            h.update(a.tobytes())
        return h.hexdigest()[:20]

    def _cache_paths(self, directory: str) -> dict[str, str]:
        stem = f"{os.path.basename(self.prefix)}_{self.name}_{self._cache_key()}"
        return {kind: os.path.join(directory, f"{stem}_{kind}.npy") for kind in _CACHE_KINDS}

    def _load_cached(self, paths: dict[str, str]) -> tuple[np.ndarray, ...] | None:
        """The three cached indices, or None (with a warning naming the file) when one is
        unreadable or does not fit this dataset: truncated, overwritten, another shape."""
        loaded = []
        for kind in _CACHE_KINDS:
            try:
                arr = np.load(paths[kind], mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                problem = f"unreadable: {err}"
            else:
                loaded.append(arr)
                problem = self._cached_problem(kind, loaded)
            if problem:
                warnings.warn(
                    f"index cache {paths[kind]} is {problem}; rebuilding it",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return None
        return tuple(loaded)

    def _cached_problem(self, kind: str, loaded: list[np.ndarray]) -> str | None:
        """Why the last of `loaded` (document, sample, shuffle index, in that order) cannot
        be this dataset's `kind` index; None when it can. Shapes against the sizes the
        build would give, values against the ranges later lookups index with."""
        arr = loaded[-1]
        epochs = get_num_epochs(self.tokens_per_epoch, self.seq_length, self.num_samples)
        total = (epochs * self.tokens_per_epoch - 1) // self.seq_length
        shape = {
            "document_index": (epochs * self.documents.size,),
            "sample_index": (total + 1, 2),
            "shuffle_index": (total,),
        }[kind]
        if arr.dtype != np.int64 or arr.shape != shape:
            return f"{arr.dtype} of shape {arr.shape}, expected int64 of shape {shape}"
        if kind == "document_index":
            lo, hi = _chunked_range(arr)
            ok_lo, ok_hi = int(self.documents.min()), int(self.documents.max())
            if arr.size and (lo < ok_lo or hi > ok_hi):
                return f"holding documents {lo}..{hi}, expected ids in {ok_lo}..{ok_hi}"
        elif kind == "sample_index":
            if arr[0].tolist() != [0, 0]:
                return f"starting at {arr[0].tolist()}, expected [0, 0]"
            return _sample_index_problem(arr, loaded[0], self.document_sizes)
        else:
            lo, hi = _chunked_range(arr)
            if arr.size and (lo < 0 or hi >= total):
                return f"holding samples {lo}..{hi}, expected 0..{total - 1}"
        return None

    def _build(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        num_epochs = get_num_epochs(self.tokens_per_epoch, self.seq_length, self.num_samples)
        separate = use_separate_last_epoch(
            num_epochs, self.tokens_per_epoch, self.seq_length, self.num_samples
        )
        rng = np.random.RandomState(self.seed)
        document_index = build_document_index(self.documents, num_epochs, rng, separate)
        sample_index = build_sample_index(
            self.document_sizes, document_index, self.seq_length, num_epochs, self.tokens_per_epoch
        )
        total = sample_index.shape[0] - 1
        if separate:
            first = ((num_epochs - 1) * self.tokens_per_epoch - 1) // self.seq_length
        else:
            first = total
        shuffle_index = build_shuffle_index(first, total, rng)
        return document_index, sample_index, shuffle_index

    def _load_or_build(self, cache_dir: str | None) -> tuple[np.ndarray, ...]:
        data_dir = os.path.dirname(os.path.abspath(self.prefix))
        primary = os.path.abspath(cache_dir) if cache_dir else data_dir
        fallback = _fallback_cache_dir()
        search = list(dict.fromkeys([primary, data_dir, fallback]))
        for directory in search:
            paths = self._cache_paths(directory)
            if all(os.path.isfile(p) for p in paths.values()):
                loaded = self._load_cached(paths)
                if loaded is not None:
                    self.cache_paths = paths
                    return loaded

        arrays = self._build()
        for directory in dict.fromkeys([primary, fallback]):
            paths = self._cache_paths(directory)
            try:
                os.makedirs(directory, exist_ok=True)
                for kind, arr in zip(_CACHE_KINDS, arrays, strict=True):
                    _save_atomic(paths[kind], arr)
            except OSError as err:
                nxt = "a temp dir" if directory != fallback else "no cache"
                warnings.warn(
                    f"cannot write {self.name} index cache for {self.prefix} in {directory} "
                    f"({err}); falling back to {nxt}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            self.cache_paths = paths
            break
        else:
            self.cache_paths = {}
        return arrays

    # -- sample access -------------------------------------------------------------------

    def _document_tokens(self, doc: int, offset: int, length: int) -> list[np.ndarray]:
        """Tokens [offset, offset+length) of document `doc`, walking its sequences."""
        pieces = []
        first = int(self.indexed.document_indices[doc])
        last = int(self.indexed.document_indices[doc + 1])
        for seq in range(first, last):
            if length <= 0:
                break
            size = int(self.indexed.sequence_lengths[seq])
            if offset >= size:
                offset -= size
                continue
            take = min(size - offset, length)
            pieces.append(self.indexed.get(seq, offset=offset, length=take))
            length -= take
            offset = 0
        return pieces

    def __len__(self) -> int:
        return int(self.sample_index.shape[0] - 1)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        n = len(self)
        idx = int(idx)
        if not -n <= idx < n:
            raise IndexError(f"{self.name}: sample {idx} out of range for {n} samples")
        k = int(self.shuffle_index[idx])
        doc_f, off_f = (int(v) for v in self.sample_index[k])
        doc_l, off_l = (int(v) for v in self.sample_index[k + 1])
        sizes = self.document_sizes
        pieces: list[np.ndarray] = []
        if doc_f == doc_l:
            d = int(self.document_index[doc_f])
            pieces += self._document_tokens(d, off_f, off_l - off_f + 1)
        else:
            d = int(self.document_index[doc_f])
            pieces += self._document_tokens(d, off_f, int(sizes[d]) - off_f)
            for pos in range(doc_f + 1, doc_l):
                d = int(self.document_index[pos])
                pieces += self._document_tokens(d, 0, int(sizes[d]))
            d = int(self.document_index[doc_l])
            pieces += self._document_tokens(d, 0, off_l + 1)
        tokens = np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)
        assert tokens.shape[0] == self.seq_length + 1, (tokens.shape, self.seq_length)
        return {"tokens": tokens}


# -- building train/valid/test ------------------------------------------------------------


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float | np.integer | np.floating):
        return True
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


def parse_prefixes_and_weights(entries: Sequence) -> tuple[list[str], list[float]]:
    """Megatron's data path forms: [p], [p1, p2] (equal weights), [w1, p1, w2, p2]."""
    entries = list(entries)
    if not entries:
        raise ValueError("no data prefixes given")
    if _is_number(entries[0]):
        if len(entries) % 2:
            raise ValueError(
                f"weighted data path must alternate weight, prefix; got odd length "
                f"{len(entries)}: {entries!r}"
            )
        weights, prefixes = [], []
        for w, p in zip(entries[0::2], entries[1::2], strict=True):
            if not _is_number(w):
                raise ValueError(f"expected a weight before prefix {p!r}, got {w!r}")
            if not isinstance(p, str | os.PathLike) or _is_number(p):
                raise ValueError(f"expected a prefix after weight {w!r}, got {p!r}")
            wf = float(w)
            if not math.isfinite(wf) or wf < 0:
                raise ValueError(f"weight {w!r} of prefix {p!r} must be finite and >= 0")
            weights.append(wf)
            prefixes.append(os.fspath(p))
        if sum(weights) <= 0:
            raise ValueError(f"data path weights must not all be 0: {entries!r}")
    else:
        prefixes = []
        for p in entries:
            if not isinstance(p, str | os.PathLike) or _is_number(p):
                raise ValueError(
                    f"entry {p!r}: unweighted data path must list prefixes only; "
                    f"use [w1, p1, w2, p2] for weights"
                )
            prefixes.append(os.fspath(p))
        weights = [1.0] * len(prefixes)
    total = sum(weights)
    return prefixes, [w / total for w in weights]


def _check_files(prefix: str) -> None:
    for path in (index_file_path(prefix), data_file_path(prefix)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data prefix {prefix!r}: file not found: {path}")


def _build_split(
    indexed: IndexedDataset,
    prefix: str,
    name: str,
    doc_range: tuple[int, int],
    num_samples: int,
    seq_length: int,
    seed: int,
    cache_dir: str | None,
) -> GPTDataset | None:
    start, end = doc_range
    if end <= start or num_samples <= 0:
        return None
    documents = np.arange(start, end, dtype=np.int64)
    return GPTDataset(indexed, prefix, name, documents, num_samples, seq_length, seed, cache_dir)


def build_gpt_datasets(
    prefixes_and_weights: list,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    cache_dir: str | None = None,
    vocab_size: int | None = None,
    vocab_source: str = "the tokenizer",
    progress: bool = False,
) -> tuple[torch.utils.data.Dataset | None, ...]:
    """Train/valid/test datasets; several prefixes are blended by their weights.

    Each prefix is split by documents on its own; a blended split asks every child
    for ceil(w * n * 1.005) samples, as Megatron does. Splits with no documents or no
    requested samples are None. With `vocab_size`, every prefix's token ids must lie
    in [0, vocab_size) (`vocab_source` names that vocabulary in the error; `progress`
    shows a bar while a large `.bin` is scanned for the first time).
    """
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples!r}")
    prefixes, weights = parse_prefixes_and_weights(prefixes_and_weights)
    parse_split(split)  # fail early on a bad split string
    for prefix in prefixes:
        _check_files(prefix)

    active = [(p, w) for p, w in zip(prefixes, weights, strict=True) if w > 0]
    indexed = {p: IndexedDataset(p) for p, _ in active}
    if vocab_size is not None:
        for p in indexed.values():
            check_token_ids(p, vocab_size, vocab_source, cache_dir, progress)
    ranges = {
        p: split_document_ranges(len(indexed[p].document_indices) - 1, split) for p, _ in active
    }

    if len(active) == 1:
        p = active[0][0]
        return tuple(
            _build_split(
                indexed[p], p, name, ranges[p][i], num_samples[i], seq_length, seed, cache_dir
            )
            for i, name in enumerate(SPLIT_NAMES)
        )

    result: list[torch.utils.data.Dataset | None] = []
    for i, name in enumerate(SPLIT_NAMES):
        n = int(num_samples[i])
        if n <= 0:
            result.append(None)
            continue
        # Prefixes whose share of this split holds no documents drop out of the blend.
        eligible = [(p, w) for p, w in active if ranges[p][i][1] > ranges[p][i][0]]
        total = sum(w for _, w in eligible)
        children, child_weights = [], []
        for p, w in eligible:
            share = int(math.ceil(w / total * n * _BLEND_OVERSAMPLE))
            children.append(
                _build_split(indexed[p], p, name, ranges[p][i], share, seq_length, seed, cache_dir)
            )
            child_weights.append(w / total)
        result.append(BlendedDataset(children, child_weights, n) if children else None)
    return tuple(result)
