"""Data faults are refused (or repaired) before training, naming the file.

Datasets are written with the project's builder and then damaged by hand; expected sizes,
offsets and positions are computed here from the .idx layout of design.md.
"""

import glob
import json
import os
import struct
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_paci.data import checks, gpt_dataset
from megatron_paci.data.checks import DataError, check_token_ids, token_range
from megatron_paci.data.gpt_dataset import GPTDataset, build_gpt_datasets
from megatron_paci.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexFormatError,
)

HEADER = 34  # magic 9 + version 8 + dtype 1 + S 8 + D 8


def build(prefix, docs, dtype=np.uint16):
    """One sequence per document; returns the documents as written."""
    b = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for d in docs:
        b.add_document(np.asarray(d))
    b.finalize(prefix + ".idx")
    return [np.asarray(d) for d in docs]


@pytest.fixture
def three(tmp_path):
    """3 documents of 5, 3, 4 uint16 tokens: .bin is 24 bytes, .idx 34 + 12*3 + 8*4."""
    prefix = str(tmp_path / "three")
    build(prefix, [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]])
    assert os.path.getsize(prefix + ".bin") == 24
    assert os.path.getsize(prefix + ".idx") == HEADER + 36 + 32
    return prefix


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def refused(prefix, *needles):
    with pytest.raises(IndexFormatError) as info:
        IndexedDataset(prefix)
    assert isinstance(info.value, ValueError)  # the launcher turns it into one error line
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    return str(info.value)


# -- .bin and .idx disagree ---------------------------------------------------------------


def test_bin_longer_than_index_describes(three):
    with open(three + ".bin", "ab") as f:
        f.write(b"\x00\x00" * 3)  # three whole tokens more
    refused(three, three + ".bin", "expected 24 bytes", "12 tokens", "6 bytes more")


def test_bin_shorter_than_index_describes(three):
    with open(three + ".bin", "r+b") as f:
        f.truncate(22)  # one token short
    refused(three, three + ".bin", "expected 24 bytes", "file has 22", "truncated")


def test_bin_not_whole_tokens(three):
    with open(three + ".bin", "ab") as f:
        f.write(b"\x07")
    refused(three, three + ".bin", "25 bytes", "2-byte tokens")


def test_pointer_that_skips(three):
    # pointers of sequences 0, 1, 2 are at HEADER + 4*3 + 8*i; sequence 2 must start at 16
    patch(three + ".idx", HEADER + 12 + 16, struct.pack("<q", 18))
    refused(three, three + ".idx", "sequence 2 starts at byte 18", "expected 16")


def test_overlapping_pointer(three):
    patch(three + ".idx", HEADER + 12 + 8, struct.pack("<q", 0))
    refused(three, "sequence 1 starts at byte 0", "expected 10")


def test_length_that_disagrees_with_pointers(three):
    # sequence 0 claims 6 tokens: sequence 1 would have to start at 12, not 10
    patch(three + ".idx", HEADER, struct.pack("<i", 6))
    refused(three, "sequence 1 starts at byte 10", "expected 12")


def test_negative_length(three):
    patch(three + ".idx", HEADER + 4, struct.pack("<i", -3))
    refused(three, three + ".idx", "non-negative", "sequence 1 has -3")


def test_index_with_trailing_bytes(three):
    with open(three + ".idx", "ab") as f:
        f.write(b"\x00" * 5)
    refused(three, three + ".idx", f"expected {HEADER + 68} bytes", "5 bytes more")


def test_truncated_index(three):
    with open(three + ".idx", "r+b") as f:
        f.truncate(HEADER + 68 - 8)
    refused(three, three + ".idx", f"at least {HEADER + 68}", "truncated")


@pytest.mark.parametrize("docs", [[0, 1, 2, 2], [1, 1, 2, 3], [0, 2, 1, 3]])
def test_document_boundaries_inconsistent_with_sequence_count(three, docs):
    # [0, 1, 2, 2] ends before sequence 2; [1, ...] skips sequence 0; [0, 2, 1, 3] decreases
    patch(three + ".idx", HEADER + 36, struct.pack("<4q", *docs))
    refused(three, three + ".idx", "document boundaries rising from 0 to the 3 sequences")


def test_no_document_boundaries(tmp_path):
    prefix = str(tmp_path / "nodocs")
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 0, 0)
    with open(prefix + ".idx", "wb") as f:
        f.write(header)
    open(prefix + ".bin", "wb").close()
    refused(prefix, prefix + ".idx", "at least one document boundary")


def test_untouched_files_load(three):
    ds = IndexedDataset(three)
    assert [ds[i].tolist() for i in range(3)] == [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
    assert ds.all_tokens().tolist() == list(range(1, 13))


@settings(max_examples=60, deadline=None)
@given(delta=st.integers(-24, 40).filter(bool))
def test_any_change_of_bin_size_is_refused(tmp_path_factory, delta):
    prefix = str(tmp_path_factory.mktemp("size") / "d")
    build(prefix, [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]])
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(24 + delta)  # grows with zeros or cuts
    refused(prefix, prefix + ".bin")


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_damaged_index_is_refused_or_reads_in_bounds(tmp_path_factory, data):
    """Whatever bytes of the .idx change, the reader refuses with IndexFormatError or
    every sequence it then serves lies inside the .bin."""
    prefix = str(tmp_path_factory.mktemp("fuzz") / "d")
    build(prefix, [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]])
    size = HEADER + 68
    offset = data.draw(st.integers(0, size - 1))
    raw = data.draw(st.binary(min_size=1, max_size=8))
    patch(prefix + ".idx", offset, raw[: size - offset])
    try:
        ds = IndexedDataset(prefix)
    except IndexFormatError:
        return
    assert sum(int(n) for n in ds.sequence_lengths) * ds.dtype.itemsize == 24
    for i in range(len(ds)):
        assert ds[i].size == int(ds.sequence_lengths[i])


# -- token ids outside the vocabulary -----------------------------------------------------


def test_token_id_at_vocab_size_is_refused(three):
    ds = IndexedDataset(three)
    check_token_ids(ds, 13, "data.tokenizer=null:13")  # max id 12 fits 13
    with pytest.raises(DataError) as info:
        check_token_ids(ds, 12, "data.tokenizer=null:12")
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    # token 12 is the 12th token (position 11): sequence 2, document 2
    for needle in (three + ".bin", "max token id 12", "data.tokenizer=null:12",
                   "vocabulary of 12", "first id 12 at token 11", "sequence 2, document 2"):
        assert needle in msg, (needle, msg)


def test_negative_ids_are_refused(tmp_path):
    prefix = str(tmp_path / "neg")
    build(prefix, [[3, 4], [5, -2, 6]], dtype=np.int32)
    with pytest.raises(DataError, match=r"token ids from -2 to 6.*first id -2 at token 3 "
                                        r"\(sequence 1, document 1\)"):
        check_token_ids(IndexedDataset(prefix), 100, "the tokenizer")


def test_first_bad_id_located_across_empty_documents(tmp_path):
    prefix = str(tmp_path / "empties")
    build(prefix, [[1, 2], [], [], [3, 900, 4]])
    with pytest.raises(DataError, match=r"first id 900 at token 3 \(sequence 3, document 3\)"):
        check_token_ids(IndexedDataset(prefix), 512, "t")


def test_scan_is_chunked_and_matches_numpy(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 60000, size=int(rng.integers(1, 50))) for _ in range(40)]
    prefix = str(tmp_path / "chunks")
    build(prefix, docs)
    flat = np.concatenate(docs)
    monkeypatch.setattr(checks, "_SCAN_CHUNK", 7)  # many chunks, maxima on their borders
    assert checks.scan_token_range(IndexedDataset(prefix)) == (0, int(flat.max()))
    signed = str(tmp_path / "signed")
    build(signed, [d.astype(np.int32) - 30000 for d in docs], dtype=np.int32)
    assert checks.scan_token_range(IndexedDataset(signed)) == (
        int(flat.min()) - 30000, int(flat.max()) - 30000)


def test_range_is_cached_until_the_bin_changes(three, tmp_path, monkeypatch):
    calls = []
    real = checks.scan_token_range
    monkeypatch.setattr(checks, "scan_token_range",
                        lambda ds, progress=False: calls.append(ds.prefix) or real(ds, progress))
    assert token_range(IndexedDataset(three)) == (0, 12)
    assert token_range(IndexedDataset(three)) == (0, 12)
    assert len(calls) == 1
    (cache,) = glob.glob(os.path.join(os.path.dirname(three), "*_token_range.json"))
    record = json.load(open(cache))
    assert record["max"] == 12 and record["key"]["bin_size"] == 24
    # same size, new content and mtime: scanned again, and the new maximum is seen
    patch(three + ".bin", 0, struct.pack("<H", 700))
    st_ = os.stat(three + ".bin")
    os.utime(three + ".bin", ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
    assert token_range(IndexedDataset(three)) == (0, 700)
    assert len(calls) == 2
    # a garbage cache is scanned again, not trusted
    with open(cache, "w") as f:
        f.write("{not json")
    assert token_range(IndexedDataset(three)) == (0, 700)
    assert len(calls) == 3
    # with data.cache_dir a new record goes there, not beside the data
    os.remove(cache)
    assert token_range(IndexedDataset(three), cache_dir=str(tmp_path / "c")) == (0, 700)
    assert len(glob.glob(str(tmp_path / "c" / "*_token_range.json"))) == 1
    assert not glob.glob(os.path.join(os.path.dirname(three), "*_token_range.json"))
    assert len(calls) == 4


def test_dtype_too_narrow_for_a_bad_id_is_not_scanned(three, monkeypatch):
    monkeypatch.setattr(checks, "scan_token_range", None)  # would fail if called
    check_token_ids(IndexedDataset(three), 65536, "t")  # uint16 ids are all < 65536


def test_build_checks_every_prefix_of_a_blend(tmp_path):
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    build(good, [list(range(i, i + 40)) for i in range(0, 400, 40)])
    build(bad, [list(range(i, i + 40)) for i in range(0, 400, 40)] + [[50, 600, 2] * 10])
    build_gpt_datasets([0.5, good, 0.5, good], "1,0,0", 8, 1, (20, 0, 0), vocab_size=512)
    with pytest.raises(DataError) as info:
        build_gpt_datasets([0.5, good, 0.5, bad], "1,0,0", 8, 1, (20, 0, 0),
                           vocab_size=512, vocab_source="data.tokenizer=tok.model")
    assert bad + ".bin" in str(info.value) and good + ".bin" not in str(info.value)
    assert "max token id 600" in str(info.value) and "first id 600 at token 401" in str(info.value)


# -- a corpus too small for its samples ---------------------------------------------------


def test_split_shorter_than_one_sample_is_refused(tmp_path):
    prefix = str(tmp_path / "tiny")
    build(prefix, [[1] * 12, [2] * 8])  # 20 tokens; seq_length 32 needs 33
    with pytest.raises(DataError) as info:
        build_gpt_datasets([prefix], "1,0,0", 32, 1, (10, 0, 0))
    msg = str(info.value)
    for needle in (prefix, "train split (2 documents, 20 tokens)", "needs 33 tokens"):
        assert needle in msg, (needle, msg)


def test_exactly_one_sample_is_enough(tmp_path):
    prefix = str(tmp_path / "one")
    build(prefix, [list(range(33))])
    (train, _, _) = build_gpt_datasets([prefix], "1,0,0", 32, 1, (1, 0, 0))
    assert train[0]["tokens"].tolist() == list(range(33))


def test_blend_component_shorter_than_one_sample_is_named(tmp_path):
    big, small = str(tmp_path / "big"), str(tmp_path / "small")
    build(big, [list(range(100))] * 4)
    build(small, [[5] * 10])
    with pytest.raises(DataError, match=f"{small}: the train split .* 10 tokens"):
        build_gpt_datasets([0.9, big, 0.1, small], "1,0,0", 16, 1, (10, 0, 0))


@pytest.mark.parametrize("num_samples, epochs", [(124, 10), (125, 11), (200, 17)])
def test_many_epochs_warn_once(tmp_path, num_samples, epochs):
    # 100 tokens, samples of 8 + 1: N samples need ceil((8N + 1) / 100) epochs
    prefix = str(tmp_path / "c")
    build(prefix, [list(range(50)), list(range(50, 100))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_gpt_datasets([prefix], "1,0,0", 8, 1, (num_samples, 0, 0))
    mine = [w for w in caught if "repeat it" in str(w.message)]
    if epochs <= gpt_dataset.MANY_EPOCHS:
        assert mine == []
    else:
        assert len(mine) == 1
        assert f"{prefix}: the train split" in str(mine[0].message)
        assert f"{num_samples} samples asked for repeat it {epochs} times" in str(mine[0].message)


# -- a damaged index cache ----------------------------------------------------------------


def _one_document(tmp_path):
    """One document 0..199: sample k of seq_length 8 must be tokens [8k, 8k + 8]."""
    prefix = str(tmp_path / "seq")
    build(prefix, [list(range(200))])
    return prefix


def _expected_windows(n):
    return sorted([list(range(8 * k, 8 * k + 9)) for k in range(n)])


def _damage(path, how):
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 16)
    elif how == "garbage":
        with open(path, "wb") as f:
            f.write(os.urandom(300))
    elif how == "empty":
        open(path, "wb").close()
    elif how == "wrong_shape":
        np.save(path, np.zeros((3, 3), dtype=np.int64))
    elif how == "wrong_dtype":
        arr = np.load(path)
        np.save(path, arr.astype(np.float32))
    elif how == "out_of_range":
        arr = np.load(path)
        arr[-1] = 10**6  # same shape, a value no lookup may use
        np.save(path, arr)


@pytest.mark.parametrize("kind", ["document_index", "sample_index", "shuffle_index"])
@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "wrong_shape",
                                 "wrong_dtype", "out_of_range"])
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, kind, how):
    prefix = _one_document(tmp_path)
    indexed = IndexedDataset(prefix)
    args = (indexed, prefix, "train", np.arange(1), 20, 8, 4)
    GPTDataset(*args)
    (path,) = glob.glob(os.path.join(os.path.dirname(prefix), f"*_{kind}.npy"))
    _damage(path, how)
    with pytest.warns(RuntimeWarning, match="index cache .* rebuilding it") as rec:
        ds = GPTDataset(*args)
    assert any(path in str(w.message) for w in rec)
    n = (200 - 1) // 8
    assert len(ds) == n
    assert sorted(ds[i]["tokens"].tolist() for i in range(n)) == _expected_windows(n)
    # the rebuilt cache is good again: no warning, no rebuild
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = GPTDataset(*args)
    assert sorted(again[i]["tokens"].tolist() for i in range(n)) == _expected_windows(n)


def test_sample_index_offset_past_its_document_is_rebuilt(tmp_path):
    prefix = _one_document(tmp_path)
    args = (IndexedDataset(prefix), prefix, "train", np.arange(1), 20, 8, 4)
    GPTDataset(*args)
    (path,) = glob.glob(os.path.join(os.path.dirname(prefix), "*_sample_index.npy"))
    arr = np.load(path)
    arr[5, 1] = 500  # a position that exists, an offset past the document's 200 tokens
    np.save(path, arr)
    with pytest.warns(RuntimeWarning, match="outside their documents"):
        GPTDataset(*args)
