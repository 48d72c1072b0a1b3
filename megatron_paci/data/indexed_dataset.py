"""Indexed token dataset: a `.bin` of raw tokens plus an `.idx` describing it.

The byte layout is Megatron-LM's MMIDIDX format (see docs/design.md, "Data format"),
so files written by Megatron's preprocessing load here unchanged and the reverse.
Writing streams tokens to disk as they arrive; reading memory-maps both files, so a
dataset far larger than RAM costs only its (small) index in memory.
"""

from __future__ import annotations

import os
import struct
from array import array
from typing import Any

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic(9) + version(8) + dtype code(1) + S(8) + D(8)
HEADER_SIZE = 34

DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(t): code for code, t in DTYPE_CODES.items()}


class IndexFormatError(ValueError):
    """An `.idx`/`.bin` pair does not match the format; the message names the file."""


def best_token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype Megatron uses for a vocabulary: uint16 below 65500, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def _le(dtype: np.dtype) -> np.dtype:
    """The little-endian variant of `dtype` (the format is little-endian on every host)."""
    return np.dtype(dtype).newbyteorder("<")


def dtype_code(dtype: Any) -> int:
    """The format's code for `dtype`; ValueError for dtypes the format cannot express."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("=")
    if dt not in _CODE_OF_DTYPE:
        allowed = ", ".join(str(np.dtype(t)) for t in DTYPE_CODES.values())
        raise ValueError(f"token dtype {dt} is not supported; expected one of {allowed}")
    return _CODE_OF_DTYPE[dt]


def _to_numpy(tokens: Any) -> np.ndarray:
    if hasattr(tokens, "detach"):  # torch tensor, possibly on an accelerator
        tokens = tokens.detach().cpu().numpy()
    return np.asarray(tokens)


class IndexedDatasetBuilder:
    """Streams token sequences into a `.bin` and writes the matching `.idx` at the end.

    Only the per-sequence lengths and document boundaries stay in memory (12 bytes
    per sequence); token data goes straight to disk.
    """

    def __init__(self, bin_path: str, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self._write_dtype = _le(self.dtype)
        self.bin_path = bin_path
        self._file = open(bin_path, "wb")  # closed in finalize
        self._lengths = array("q")
        self._doc_indices = array("q", [0])
        self._finalized = False

    def _check_open(self) -> None:
        if self._finalized:
            raise RuntimeError(f"builder for {self.bin_path} is already finalized")

    def _as_tokens(self, tokens: Any) -> np.ndarray:
        arr = _to_numpy(tokens)
        if arr.ndim != 1:
            raise ValueError(f"expected a 1-D sequence of tokens, got shape {arr.shape}")
        if arr.size and arr.dtype != self.dtype:
            if np.issubdtype(self.dtype, np.integer):
                if not np.issubdtype(arr.dtype, np.integer):
                    raise ValueError(f"expected integer tokens, got dtype {arr.dtype}")
                info = np.iinfo(self.dtype)
                lo, hi = int(arr.min()), int(arr.max())
                if lo < info.min or hi > info.max:
                    raise ValueError(
                        f"token values [{lo}, {hi}] do not fit dtype {self.dtype} "
                        f"[{info.min}, {info.max}]"
                    )
        return np.ascontiguousarray(arr, dtype=self._write_dtype)

    def _write(self, arr: np.ndarray) -> None:
        self._file.write(arr.tobytes(order="C"))

    def add_item(self, tokens: Any) -> None:
        """Append one sequence."""
        self._check_open()
        arr = self._as_tokens(tokens)
        self._write(arr)
        self._lengths.append(arr.size)

    def end_document(self) -> None:
        """Mark a document boundary after the sequences added so far."""
        self._check_open()
        self._doc_indices.append(len(self._lengths))

    def add_document(self, tokens: Any, lengths: list[int] | None = None) -> None:
        """Append a whole document; `lengths` splits it into several sequences."""
        self._check_open()
        arr = self._as_tokens(tokens)
        if lengths is None:
            lengths = [arr.size]
        lengths = [int(n) for n in lengths]
        if any(n < 0 for n in lengths) or sum(lengths) != arr.size:
            raise ValueError(
                f"sequence lengths {lengths} must be non-negative and sum to the "
                f"document's {arr.size} tokens"
            )
        self._write(arr)
        self._lengths.extend(lengths)
        self._doc_indices.append(len(self._lengths))

    def finalize(self, idx_path: str) -> None:
        """Close the `.bin` and write the `.idx`.

        Sequences added after the last `end_document` form one final document, so a
        caller that forgets the last boundary still gets every sequence readable.
        """
        self._check_open()
        self._finalized = True
        self._file.close()
        if self._doc_indices[-1] != len(self._lengths):
            self._doc_indices.append(len(self._lengths))
        lengths = np.frombuffer(self._lengths, dtype=np.int64)
        if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
            raise ValueError(f"a sequence in {self.bin_path} is longer than int32 can index")
        pointers = np.zeros(lengths.size, dtype=np.int64)
        if lengths.size > 1:
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        docs = np.frombuffer(self._doc_indices, dtype=np.int64)
        with open(idx_path, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", self._code))
            f.write(struct.pack("<Q", lengths.size))
            f.write(struct.pack("<Q", docs.size))
            f.write(lengths.astype("<i4").tobytes(order="C"))
            f.write(pointers.astype("<i8").tobytes(order="C"))
            f.write(docs.astype("<i8").tobytes(order="C"))


def _preview(values: np.ndarray, n: int = 6) -> str:
    head = ", ".join(str(int(v)) for v in values[:n])
    return f"[{head}{', ...' if values.size > n else ''}] ({values.size} values)"


_CHECK_CHUNK = 1 << 22  # elements per vectorised pass, so a huge index costs bounded memory


def _check_bin_layout(
    idx_path: str,
    bin_path: str,
    bin_size: int,
    lengths: np.ndarray,
    pointers: np.ndarray,
    itemsize: int,
) -> None:
    """The `.bin` must be exactly the sequences back to back, as every writer lays it out.

    Pointers that skip, overlap or run past the end, and a `.bin` with bytes no
    sequence covers, all mean the two files do not belong together.
    """
    if bin_size % itemsize:
        raise IndexFormatError(
            f"{bin_path}: {bin_size} bytes is not a whole number of {itemsize}-byte tokens "
            f"({idx_path} says the tokens are {itemsize} bytes each; truncated?)"
        )
    expected = 0  # byte offset the next sequence must start at
    for start in range(0, lengths.size, _CHECK_CHUNK):
        sizes = lengths[start : start + _CHECK_CHUNK].astype(np.int64) * itemsize
        ptrs = pointers[start : start + _CHECK_CHUNK]
        want = expected + np.concatenate(([0], np.cumsum(sizes[:-1])))
        bad = np.flatnonzero(ptrs != want)
        if bad.size:
            i = int(bad[0])
            raise IndexFormatError(
                f"{idx_path}: sequence {start + i} starts at byte {int(ptrs[i])} of "
                f"{bin_path}, expected {int(want[i])} (the sequences before it end there); "
                "the index does not describe this .bin"
            )
        expected = int(want[-1] + sizes[-1])
    if bin_size < expected:
        raise IndexFormatError(
            f"{bin_path}: expected {expected} bytes as {idx_path} describes "
            f"({expected // itemsize} tokens), file has {bin_size} (truncated?)"
        )
    if bin_size > expected:
        raise IndexFormatError(
            f"{bin_path}: expected {expected} bytes as {idx_path} describes "
            f"({expected // itemsize} tokens), file has {bin_size - expected} bytes more "
            "(the .idx is from another run, or the .bin was appended to)"
        )


class IndexedDataset:
    """Read-only view of a `.bin`/`.idx` pair, validated up front and memory-mapped."""

    sequence_lengths: np.ndarray
    sequence_pointers: np.ndarray
    document_indices: np.ndarray
    dtype: np.dtype

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._open(prefix)

    def _open(self, prefix: str) -> None:
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset file not found: {path}")

        idx_size = os.path.getsize(idx_path)
        if idx_size < HEADER_SIZE:
            raise IndexFormatError(
                f"{idx_path}: expected a header of {HEADER_SIZE} bytes, file has {idx_size}"
            )
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        magic = header[:9]
        if magic != MAGIC:
            raise IndexFormatError(f"{idx_path}: expected magic {MAGIC!r}, found {magic!r}")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise IndexFormatError(f"{idx_path}: expected version {VERSION}, found {version}")
        (code,) = struct.unpack("<B", header[17:18])
        if code not in DTYPE_CODES:
            raise IndexFormatError(
                f"{idx_path}: expected a dtype code in {sorted(DTYPE_CODES)}, found {code}"
            )
        num_seqs, num_docs = struct.unpack("<QQ", header[18:34])
        expected = HEADER_SIZE + 12 * num_seqs + 8 * num_docs
        if idx_size < expected:
            raise IndexFormatError(
                f"{idx_path}: expected at least {expected} bytes for {num_seqs} sequences "
                f"and {num_docs} document boundaries, file has {idx_size} (truncated?)"
            )
        if idx_size > expected:
            raise IndexFormatError(
                f"{idx_path}: expected {expected} bytes for {num_seqs} sequences and "
                f"{num_docs} document boundaries, file has {idx_size - expected} bytes more "
                "(not written by one indexed-dataset writer?)"
            )
        if num_docs < 1:
            raise IndexFormatError(
                f"{idx_path}: expected at least one document boundary (the leading 0), found 0"
            )

        self.dtype = np.dtype(DTYPE_CODES[code])
        idx_buf = np.memmap(idx_path, mode="r", dtype=np.uint8)
        offset = HEADER_SIZE
        lengths = np.frombuffer(idx_buf, dtype="<i4", count=num_seqs, offset=offset)
        offset += 4 * num_seqs
        pointers = np.frombuffer(idx_buf, dtype="<i8", count=num_seqs, offset=offset)
        offset += 8 * num_seqs
        docs = np.frombuffer(idx_buf, dtype="<i8", count=num_docs, offset=offset)

        if num_seqs and int(lengths.min()) < 0:
            first = int(np.argmax(lengths < 0))
            raise IndexFormatError(
                f"{idx_path}: expected non-negative sequence lengths, sequence {first} has "
                f"{int(lengths[first])}"
            )
        if int(docs[0]) != 0 or int(docs[-1]) != num_seqs or np.any(np.diff(docs) < 0):
            raise IndexFormatError(
                f"{idx_path}: expected document boundaries rising from 0 to the {num_seqs} "
                f"sequences, found {_preview(docs)}"
            )
        bin_size = os.path.getsize(bin_path)
        _check_bin_layout(idx_path, bin_path, bin_size, lengths, pointers, self.dtype.itemsize)

        self._idx_buf = idx_buf
        self.sequence_lengths = lengths
        self.sequence_pointers = pointers
        self.document_indices = docs
        if bin_size:
            self._bin_buf = np.memmap(bin_path, mode="r", dtype=np.uint8)
        else:  # numpy cannot map an empty file
            self._bin_buf = np.empty(0, dtype=np.uint8)
        self._read_dtype = _le(self.dtype)

    # Memory maps do not pickle usefully; reopen in DataLoader worker processes instead.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open(self.prefix)

    def __len__(self) -> int:
        return int(self.sequence_lengths.shape[0])

    def __getitem__(self, i: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(len(self)))]
        return self.get(i)

    def all_tokens(self) -> np.ndarray:
        """Every token of the `.bin` in file order (which the checks make exactly the
        sequences back to back), without copying."""
        if not self._bin_buf.size:
            return np.empty(0, dtype=self._read_dtype)
        return np.frombuffer(self._bin_buf, dtype=self._read_dtype)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of sequence `i`, without copying."""
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {i} out of range for {n} sequences")
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {i} "
                f"of length {size}"
            )
        ptr = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin_buf, dtype=self._read_dtype, count=length, offset=ptr)
