"""GPT sample construction against references that walk the token stream directly."""

import glob
import math
import os
import tempfile

import numpy as np
import pytest

from megatron_paci.data import gpt_dataset
from megatron_paci.data.blended import BlendedDataset
from megatron_paci.data.gpt_dataset import (
    GPTDataset,
    build_document_index,
    build_gpt_datasets,
    build_sample_index,
    build_shuffle_index,
    get_num_epochs,
    parse_split,
    split_document_ranges,
    use_separate_last_epoch,
)
from megatron_paci.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def write_dataset(path, doc_lengths, base=0, split_docs=True):
    """Documents of distinct tokens base, base+1, ...; longer ones split into 2 sequences."""
    b = IndexedDatasetBuilder(path + ".bin", np.int32)
    docs, nxt = [], base
    for n in doc_lengths:
        toks = np.arange(nxt, nxt + n)
        nxt += n
        lengths = [n // 2, n - n // 2] if split_docs and n >= 4 else None
        b.add_document(toks, lengths=lengths)
        docs.append(toks)
    b.finalize(path + ".idx")
    return docs


def reference_samples(docs, documents, num_samples, seq_length, seed):
    """Megatron's recipe written out directly on a token stream."""
    L = seq_length
    T = sum(len(docs[d]) for d in documents)
    E = 1
    while (E * T - 1) // L < num_samples:
        E += 1
    per_epoch = (T - 1) // L
    earlier = ((E - 1) * T - 1) // L
    separate = E > 1 and (num_samples - earlier) < int(0.8 * per_epoch)
    rng = np.random.RandomState(seed)
    if separate:
        first = np.tile(np.array(documents, dtype=np.int64), E - 1)
        rng.shuffle(first)
        last = np.array(documents, dtype=np.int64)
        rng.shuffle(last)
        order = np.concatenate([first, last])
    else:
        order = np.tile(np.array(documents, dtype=np.int64), E)
        rng.shuffle(order)
    stream = np.concatenate([docs[d] for d in order])
    total = (E * T - 1) // L
    windows = [stream[k * L : k * L + L + 1] for k in range(total)]
    if separate:
        p1, p2 = np.arange(earlier), np.arange(earlier, total)
        rng.shuffle(p1)
        rng.shuffle(p2)
        perm = np.concatenate([p1, p2])
    else:
        perm = np.arange(total)
        rng.shuffle(perm)
    return [windows[p] for p in perm]


def walk_sample_index(sizes, document_index, seq_length, num_samples):
    """Locate stream token k*L (k >= 1) by walking every token."""
    where = []
    for pos, d in enumerate(document_index):
        where += [(pos, off) for off in range(sizes[d])]
    return [(0, 0)] + [where[k * seq_length] for k in range(1, num_samples + 1)]


# -- split parsing -----------------------------------------------------------------------


def test_parse_split():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("98,2") == pytest.approx([0.98, 0.02, 0.0])
    assert parse_split("1/1/2") == pytest.approx([0.25, 0.25, 0.5])
    assert parse_split(" 1, 0, 0 ") == [1.0, 0.0, 0.0]
    for bad in ["", "a,b,c", "1,2,3,4", "-1,2,1", "0,0,0", "1,,2", "nan,1,1"]:
        with pytest.raises(ValueError, match="split"):
            parse_split(bad)


@pytest.mark.parametrize(
    "n, split, expected",
    [
        (1000, "969,30,1", [(0, 969), (969, 999), (999, 1000)]),
        # 3.33 -> 3 each, 9 total; the missing one goes to train
        (10, "1,1,1", [(0, 4), (4, 7), (7, 10)]),
        # round(2.5) == 2 (half to even) twice; train absorbs the shortfall
        (5, "50,50,0", [(0, 3), (3, 5), (5, 5)]),
        # round(1.5) == 2 twice overshoots by one; train gives it back
        (3, "1,1", [(0, 1), (1, 3), (3, 3)]),
        (20, "8,1,1", [(0, 16), (16, 18), (18, 20)]),
        (7, "1,0,0", [(0, 7), (7, 7), (7, 7)]),
    ],
)
def test_split_document_ranges(n, split, expected):
    assert split_document_ranges(n, split) == expected


# -- index pieces ----------------------------------------------------------------------


def test_num_epochs_matches_megatron_loop():
    for T in (1, 7, 100, 1001):
        for L in (1, 4, 64):
            for N in (1, 5, 50, 333):
                e = 0
                while True:
                    e += 1
                    if (e * T - 1) // L >= N:
                        break
                assert get_num_epochs(T, L, N) == e, (T, L, N)


def test_separate_last_epoch_rule():
    # T=100, L=8: 12 samples per epoch, 24 from two epochs, 80% threshold int(9.6) = 9
    assert not use_separate_last_epoch(1, 100, 8, 5)
    assert use_separate_last_epoch(3, 100, 8, 26)  # 2 samples of the third epoch
    assert use_separate_last_epoch(3, 100, 8, 32)  # 8 < 9
    assert not use_separate_last_epoch(3, 100, 8, 33)  # 9 is not < 9


def test_sample_index_hand_worked():
    # stream: doc0 = t0..t2, doc1 = t3..t7, doc2 = t8..t9; (10-1)//4 = 2 samples
    # sample 0 = t0..t4 ends at doc1 offset 1; sample 1 = t4..t8 ends at doc2 offset 0
    got = build_sample_index(np.array([3, 5, 2]), np.array([0, 1, 2]), 4, 1, 10)
    assert got.dtype == np.int64
    assert got.tolist() == [[0, 0], [1, 1], [2, 0]]


@pytest.mark.parametrize("seed", range(6))
def test_sample_index_matches_token_walk(seed):
    rng = np.random.RandomState(seed)
    sizes = rng.randint(0, 9, size=12)
    sizes[0] = max(sizes[0], 1)
    documents = np.arange(12)
    T = int(sizes.sum())
    for L in (1, 3, 5, 16):
        for epochs in (1, 2, 3):
            doc_index = np.tile(documents, epochs)
            rng.shuffle(doc_index)
            got = build_sample_index(sizes, doc_index, L, epochs, T)
            n = (epochs * T - 1) // L
            assert got.shape == (n + 1, 2)
            assert [tuple(r) for r in got.tolist()] == walk_sample_index(sizes, doc_index, L, n)


def test_sample_index_ten_million_tokens_is_fast():
    import time

    rng = np.random.RandomState(0)
    sizes = rng.randint(1, 2000, size=10_000)
    T = int(sizes.sum())
    start = time.perf_counter()
    got = build_sample_index(sizes, np.arange(10_000), 16, 1, T)
    assert time.perf_counter() - start < 5
    assert got.shape[0] == (T - 1) // 16 + 1
    k = got.shape[0] // 2  # spot-check one row against cumulative sums
    ends = np.cumsum(sizes)
    pos = int(np.searchsorted(ends, k * 16, side="right"))
    assert got[k].tolist() == [pos, k * 16 - (ends[pos] - sizes[pos])]


def test_document_index_and_shuffle_index_are_permutations():
    docs = np.array([3, 5, 7, 9])
    idx = build_document_index(docs, 3, np.random.RandomState(1), False)
    assert sorted(idx.tolist()) == sorted(docs.tolist() * 3)
    idx = build_document_index(docs, 3, np.random.RandomState(1), True)
    assert sorted(idx[:8].tolist()) == sorted(docs.tolist() * 2)
    assert sorted(idx[8:].tolist()) == docs.tolist()
    sh = build_shuffle_index(10, 14, np.random.RandomState(2))
    assert sorted(sh[:10].tolist()) == list(range(10))
    assert sorted(sh[10:].tolist()) == list(range(10, 14))
    assert sh[:10].tolist() != list(range(10))


# -- GPTDataset --------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path):
    # 100 tokens over 8 documents, one of them empty
    lengths = [7, 13, 20, 1, 0, 9, 30, 20]
    prefix = str(tmp_path / "small")
    docs = write_dataset(prefix, lengths)
    return prefix, docs


@pytest.mark.parametrize("num_samples", [5, 12, 20, 26, 35])
def test_gpt_dataset_matches_token_stream(small, num_samples):
    prefix, docs = small
    documents = np.arange(len(docs))
    ds = GPTDataset(IndexedDataset(prefix), prefix, "train", documents, num_samples, 8, 1234)
    ref = reference_samples(docs, documents, num_samples, 8, 1234)
    assert len(ds) == len(ref) >= num_samples
    for i in range(len(ds)):
        tokens = ds[i]["tokens"]
        assert tokens.dtype == np.int64 and tokens.shape == (9,)
        np.testing.assert_array_equal(tokens, ref[i])


def test_gpt_dataset_subset_of_documents(small):
    prefix, docs = small
    documents = np.arange(2, 7)
    ds = GPTDataset(IndexedDataset(prefix), prefix, "valid", documents, 3, 4, 7)
    ref = reference_samples(docs, documents, 3, 4, 7)
    assert [s["tokens"].tolist() for s in ds] == [r.tolist() for r in ref]
    allowed = set(np.concatenate([docs[d] for d in documents]).tolist())
    assert all(set(s["tokens"].tolist()) <= allowed for s in ds)


def test_seed_controls_order(small):
    prefix, docs = small
    indexed, documents = IndexedDataset(prefix), np.arange(len(docs))

    def order(seed):
        ds = GPTDataset(indexed, prefix, "train", documents, 10, 8, seed)
        return [ds[i]["tokens"].tolist() for i in range(len(ds))]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) != order(1)  # actually shuffled


def test_cache_is_reused(small, monkeypatch):
    prefix, docs = small
    indexed, documents = IndexedDataset(prefix), np.arange(len(docs))
    first = GPTDataset(indexed, prefix, "train", documents, 20, 8, 5)
    data_dir = os.path.dirname(prefix)
    files = sorted(glob.glob(os.path.join(data_dir, "*.npy")))
    assert len(files) == 3
    assert not glob.glob(os.path.join(data_dir, "*.tmp"))
    mtimes = [os.stat(f).st_mtime_ns for f in files]

    def boom(*args, **kwargs):
        raise AssertionError("index rebuilt although cached")

    for fn in ("build_document_index", "build_sample_index", "build_shuffle_index"):
        monkeypatch.setattr(gpt_dataset, fn, boom)
    again = GPTDataset(indexed, prefix, "train", documents, 20, 8, 5)
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes
    for i in range(len(first)):
        np.testing.assert_array_equal(first[i]["tokens"], again[i]["tokens"])
    # any parameter that changes the indices needs a fresh build
    for kwargs in (dict(seed=6), dict(num_samples=21), dict(seq_length=9)):
        args = dict(num_samples=20, seq_length=8, seed=5) | kwargs
        with pytest.raises(AssertionError, match="rebuilt"):
            GPTDataset(indexed, prefix, "train", documents, **args)
    with pytest.raises(AssertionError, match="rebuilt"):
        GPTDataset(indexed, prefix, "train", documents[:-1], 20, 8, 5)


def test_cache_dir_and_fallback(small, tmp_path, monkeypatch):
    prefix, docs = small
    indexed, documents = IndexedDataset(prefix), np.arange(len(docs))
    cache = tmp_path / "cache"
    GPTDataset(indexed, prefix, "train", documents, 10, 8, 1, cache_dir=str(cache))
    assert len(list(cache.glob("*.npy"))) == 3
    assert not glob.glob(os.path.join(os.path.dirname(prefix), "*.npy"))

    # a cache dir that cannot be created (a file is in the way): warn, use a temp dir
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    with pytest.warns(RuntimeWarning, match="cannot write"):
        ds = GPTDataset(indexed, prefix, "train", documents, 10, 8, 2, cache_dir=str(blocker))
    assert len(glob.glob(str(tmp_path / "tmp" / "*" / "*.npy"))) == 3
    ref = reference_samples(docs, documents, 10, 8, 2)
    np.testing.assert_array_equal(ds[0]["tokens"], ref[0])


def test_unwritable_data_dir_falls_back_to_temp(small, tmp_path, monkeypatch):
    """Simulated with a failing writer, so it also runs as root."""
    prefix, docs = small
    data_dir = os.path.dirname(prefix)
    real_save = gpt_dataset._save_atomic

    def save(path, array):
        if os.path.dirname(path) == data_dir:
            raise PermissionError(13, "Permission denied", path)
        real_save(path, array)

    monkeypatch.setattr(gpt_dataset, "_save_atomic", save)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    documents = np.arange(len(docs))
    with pytest.warns(RuntimeWarning, match="cannot write"):
        GPTDataset(IndexedDataset(prefix), prefix, "train", documents, 10, 8, 3)
    assert not glob.glob(os.path.join(data_dir, "*.npy"))
    assert len(glob.glob(str(tmp_path / "tmp" / "*" / "*.npy"))) == 3
    # the second construction finds the temp-dir cache instead of rebuilding
    monkeypatch.setattr(gpt_dataset, "build_sample_index", None)
    ds = GPTDataset(IndexedDataset(prefix), prefix, "train", documents, 10, 8, 3)
    np.testing.assert_array_equal(ds[0]["tokens"], reference_samples(docs, documents, 10, 8, 3)[0])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write a read-only directory")
def test_read_only_data_dir_falls_back(tmp_path, monkeypatch):
    data = tmp_path / "ro"
    data.mkdir()
    docs = write_dataset(str(data / "d"), [10, 10, 10])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    data.chmod(0o555)
    try:
        with pytest.warns(RuntimeWarning, match="cannot write"):
            ds = GPTDataset(
                IndexedDataset(str(data / "d")), str(data / "d"), "t", [0, 1, 2], 2, 4, 0
            )
    finally:
        data.chmod(0o755)
    np.testing.assert_array_equal(ds[0]["tokens"], reference_samples(docs, [0, 1, 2], 2, 4, 0)[0])


# -- build_gpt_datasets ------------------------------------------------------------------


def test_build_single_prefix(tmp_path):
    prefix = str(tmp_path / "one")
    docs = write_dataset(prefix, [10 + i for i in range(20)])
    train, valid, test = build_gpt_datasets([prefix], "8,1,1", 8, 3, (30, 4, 0))
    assert isinstance(train, GPTDataset) and isinstance(valid, GPTDataset)
    assert test is None
    for ds, (lo, hi) in ((train, (0, 16)), (valid, (16, 18))):
        allowed = set(np.concatenate(docs[lo:hi]).tolist())
        tokens = set(np.concatenate([ds[i]["tokens"] for i in range(len(ds))]).tolist())
        assert tokens <= allowed
        assert len(tokens) > 0.9 * len(allowed)
    ref = reference_samples(docs, list(range(16)), 30, 8, 3)
    np.testing.assert_array_equal(train[0]["tokens"], ref[0])
    assert build_gpt_datasets([prefix], "1,0,0", 8, 3, (5, 5, 5))[1:] == (None, None)


def test_build_blended(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_dataset(a, [40] * 10, base=0)
    write_dataset(b, [40] * 10, base=10_000)
    train, valid, test = build_gpt_datasets([0.7, a, 0.3, b], "8,2,0", 8, 1, (50, 10, 5))
    assert isinstance(train, BlendedDataset) and isinstance(valid, BlendedDataset)
    assert test is None  # no test documents in either prefix
    assert len(train) == 50
    assert [c.num_samples for c in train.datasets] == [
        math.ceil(0.7 * 50 * 1.005),
        math.ceil(0.3 * 50 * 1.005),
    ]
    from_a = [bool((train[i]["tokens"] < 10_000).all()) for i in range(50)]
    from_b = [bool((train[i]["tokens"] >= 10_000).all()) for i in range(50)]
    assert all(x != y for x, y in zip(from_a, from_b, strict=True))
    assert sum(from_a) == 35
    for i in range(50):
        d, j = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        np.testing.assert_array_equal(train[i]["tokens"], train.datasets[d][j]["tokens"])

    same = build_gpt_datasets(["0.7", a, "0.3", b], "8,2,0", 8, 1, (50, 10, 5))[0]
    assert [same[i]["tokens"].tolist() for i in range(50)] == [
        train[i]["tokens"].tolist() for i in range(50)
    ]
    equal = build_gpt_datasets([a, b], "8,2,0", 8, 1, (20, 0, 0))
    assert equal[0].weights == [0.5, 0.5] and equal[1] is None


def test_build_rejects_bad_forms(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_dataset(a, [20] * 5)
    write_dataset(b, [20] * 5)
    args = ("1,0,0", 8, 1, (10, 0, 0))
    with pytest.raises(ValueError, match="odd length"):
        build_gpt_datasets([0.5, a, 0.5], *args)
    with pytest.raises(ValueError, match="'-0.5'"):
        build_gpt_datasets(["-0.5", a, 1, b], *args)
    with pytest.raises(ValueError, match="0.5"):
        build_gpt_datasets([a, 0.5], *args)
    with pytest.raises(ValueError, match="prefix"):
        build_gpt_datasets([0.5, a, 0.5, 0.5], *args)
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        build_gpt_datasets([0.5, a, 0.5, missing], *args)
    with pytest.raises(ValueError, match="split"):
        build_gpt_datasets([a], "x", 8, 1, (10, 0, 0))
