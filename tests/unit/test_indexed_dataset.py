"""The .bin/.idx format byte for byte, against layouts computed here with struct."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from megatron_paci.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexFormatError,
    best_token_dtype,
    data_file_path,
    index_file_path,
)

MAGIC = b"MMIDIDX\x00\x00"


def idx_bytes(code, lengths, pointers, docs, version=1, magic=MAGIC):
    """The .idx layout of design.md, written out field by field."""
    out = magic + struct.pack("<Q", version) + struct.pack("<B", code)
    out += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(docs))
    out += struct.pack(f"<{len(lengths)}i", *lengths)
    out += struct.pack(f"<{len(pointers)}q", *pointers)
    out += struct.pack(f"<{len(docs)}q", *docs)
    return out


def write_files(prefix, idx, bin_):
    with open(prefix + ".idx", "wb") as f:
        f.write(idx)
    with open(prefix + ".bin", "wb") as f:
        f.write(bin_)


def test_dtype_codes_and_paths():
    assert DTYPE_CODES == {
        1: np.uint8,
        2: np.int8,
        3: np.int16,
        4: np.int32,
        5: np.int64,
        6: np.float64,
        7: np.float32,
        8: np.uint16,
    }
    assert best_token_dtype(50257) == np.uint16
    assert best_token_dtype(65499) == np.uint16
    assert best_token_dtype(65500) == np.int32
    assert best_token_dtype(128256) == np.int32
    assert data_file_path("/a/b") == "/a/b.bin"
    assert index_file_path("/a/b") == "/a/b.idx"


def test_builder_uint16_bytes(tmp_path):
    prefix = str(tmp_path / "u16")
    b = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    b.add_item([1, 2, 3])
    b.add_item(np.array([4, 5], dtype=np.int64))
    b.end_document()
    b.add_document([6, 7, 8, 9], lengths=[1, 3])
    b.add_document(torch.tensor([65535]))
    b.finalize(prefix + ".idx")

    expected_bin = struct.pack("<10H", 1, 2, 3, 4, 5, 6, 7, 8, 9, 65535)
    # lengths 3,2,1,3,1 tokens of 2 bytes -> byte offsets 0,6,10,12,18
    expected_idx = idx_bytes(8, [3, 2, 1, 3, 1], [0, 6, 10, 12, 18], [0, 2, 4, 5])
    assert (tmp_path / "u16.bin").read_bytes() == expected_bin
    assert (tmp_path / "u16.idx").read_bytes() == expected_idx


def test_builder_int32_bytes(tmp_path):
    prefix = str(tmp_path / "i32")
    b = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    b.add_document([70000, -1])
    b.add_document(torch.tensor([5, 100000, 7], dtype=torch.int64))
    b.add_item([])  # an empty sequence is legal
    b.end_document()
    b.finalize(prefix + ".idx")

    expected_bin = struct.pack("<5i", 70000, -1, 5, 100000, 7)
    expected_idx = idx_bytes(4, [2, 3, 0], [0, 8, 20], [0, 1, 2, 3])
    assert (tmp_path / "i32.bin").read_bytes() == expected_bin
    assert (tmp_path / "i32.idx").read_bytes() == expected_idx


def test_finalize_closes_open_document(tmp_path):
    prefix = str(tmp_path / "open")
    b = IndexedDatasetBuilder(prefix + ".bin", np.uint8)
    b.add_item([1])
    b.end_document()
    b.add_item([2, 3])
    b.finalize(prefix + ".idx")
    assert (tmp_path / "open.idx").read_bytes() == idx_bytes(1, [1, 2], [0, 1], [0, 1, 2])
    with pytest.raises(RuntimeError):
        b.add_item([4])


def test_builder_rejects_bad_input(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.uint16)
    with pytest.raises(ValueError, match="fit"):
        b.add_item(np.array([70000]))
    with pytest.raises(ValueError, match="sum"):
        b.add_document([1, 2, 3], lengths=[1, 1])
    with pytest.raises(ValueError, match="1-D"):
        b.add_item([[1, 2]])
    with pytest.raises(ValueError, match="not supported"):
        IndexedDatasetBuilder(str(tmp_path / "y.bin"), np.uint32)


def test_reader_reads_hand_written_file(tmp_path):
    prefix = str(tmp_path / "hand")
    tokens = [10, 11, 12, 13, 14, 15, 16]
    # 3 sequences (3, 0, 4 tokens) in 2 documents: [seq0], [seq1, seq2]
    write_files(
        prefix,
        idx_bytes(4, [3, 0, 4], [0, 12, 12], [0, 1, 3]),
        struct.pack("<7i", *tokens),
    )
    ds = IndexedDataset(prefix)
    assert len(ds) == 3
    assert ds.dtype == np.int32
    assert ds.sequence_lengths.dtype == np.int32
    assert ds.sequence_pointers.dtype == np.int64
    assert ds.document_indices.dtype == np.int64
    assert ds.sequence_lengths.tolist() == [3, 0, 4]
    assert ds.sequence_pointers.tolist() == [0, 12, 12]
    assert ds.document_indices.tolist() == [0, 1, 3]
    assert ds[0].tolist() == [10, 11, 12]
    assert ds[1].tolist() == []
    assert ds[2].tolist() == [13, 14, 15, 16]
    assert ds[-1].tolist() == [13, 14, 15, 16]
    assert ds.get(2, offset=1).tolist() == [14, 15, 16]
    assert ds.get(2, offset=1, length=2).tolist() == [14, 15]
    assert ds.get(0, length=0).tolist() == []
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=2)


def test_reader_uint16_hand_written(tmp_path):
    prefix = str(tmp_path / "h16")
    write_files(prefix, idx_bytes(8, [2, 1], [0, 4], [0, 2]), struct.pack("<3H", 65535, 0, 300))
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16
    assert ds[0].tolist() == [65535, 0]
    assert ds[1].tolist() == [300]


def test_round_trip_many_documents(tmp_path):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "many")
    docs = []
    b = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for _ in range(300):
        lengths = rng.integers(0, 40, size=rng.integers(1, 4)).tolist()
        toks = rng.integers(0, 65535, size=sum(lengths))
        b.add_document(toks, lengths=lengths)
        docs.append((toks, lengths))
    b.finalize(prefix + ".idx")

    ds = IndexedDataset(prefix)
    seqs = []
    boundaries = [0]
    for toks, lengths in docs:
        start = 0
        for n in lengths:
            seqs.append(toks[start : start + n])
            start += n
        boundaries.append(len(seqs))
    assert len(ds) == len(seqs)
    assert ds.document_indices.tolist() == boundaries
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(ds[i], s)
    assert os.path.getsize(prefix + ".bin") == 2 * sum(len(s) for s in seqs)
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[len(seqs) - 1], seqs[-1])


GOOD = dict(code=4, lengths=[2, 1], pointers=[0, 8], docs=[0, 1, 2])
GOOD_BIN = struct.pack("<3i", 1, 2, 3)


@pytest.mark.parametrize(
    "idx, bin_, what",
    [
        (idx_bytes(**GOOD, magic=b"MMIDIDY\x00\x00"), GOOD_BIN, "magic"),
        (idx_bytes(**GOOD, version=2), GOOD_BIN, "version"),
        (idx_bytes(9, [2, 1], [0, 8], [0, 1, 2]), GOOD_BIN, "dtype code"),
        (idx_bytes(**GOOD), GOOD_BIN[:-1], "truncated"),
        (idx_bytes(**GOOD)[:-4], GOOD_BIN, "at least"),
        (MAGIC + b"\x01", GOOD_BIN, "header"),
        (idx_bytes(4, [2, 1], [0, 8], [0, 3, 2]), GOOD_BIN, "document boundaries"),
    ],
)
def test_bad_files_raise_index_format_error(tmp_path, idx, bin_, what):
    prefix = str(tmp_path / "bad")
    write_files(prefix, idx, bin_)
    with pytest.raises(IndexFormatError, match=what) as info:
        IndexedDataset(prefix)
    assert "bad.idx" in str(info.value) or "bad.bin" in str(info.value)
    if what == "truncated":
        assert "bad.bin" in str(info.value)


def test_good_file_of_bad_cases_loads(tmp_path):
    prefix = str(tmp_path / "good")
    write_files(prefix, idx_bytes(**GOOD), GOOD_BIN)
    assert IndexedDataset(prefix)[1].tolist() == [3]


@pytest.mark.parametrize("missing", [".idx", ".bin"])
def test_missing_files_name_the_path(tmp_path, missing):
    prefix = str(tmp_path / "gone")
    write_files(prefix, idx_bytes(**GOOD), GOOD_BIN)
    os.remove(prefix + missing)
    with pytest.raises(FileNotFoundError, match=f"gone\\{missing}"):
        IndexedDataset(prefix)
