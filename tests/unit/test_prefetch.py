"""The background reader hands over exactly its source's items, in order, and stays
within its depth; errors arrive where they happened; it stops when closed."""

from __future__ import annotations

import threading
import time

import pytest

from megatron_paci.config import ConfigError, parse_args
from megatron_paci.data.prefetch import Prefetcher, prefetched


class Source:
    """Counts how many items were taken from it, and by which thread."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at, self.taken, self.threads = n, fail_at, 0, set()

    def __iter__(self):
        for i in range(self.n):
            if i == self.fail_at:
                raise OSError(f"disk gone at item {i}")
            self.taken += 1
            self.threads.add(threading.current_thread().name)
            yield {"tokens": [i, i + 1]}


def _settle(source: Source, expect: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while source.taken < expect and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # and no further


def test_same_items_in_the_same_order_then_stop():
    src = Source(7)
    got = list(Prefetcher(iter(src), depth=2))
    assert got == [{"tokens": [i, i + 1]} for i in range(7)]
    assert src.threads == {"data-prefetch"}  # read off the consumer's thread


def test_reads_ahead_by_its_depth_and_no_more():
    src = Source(100)
    it = Prefetcher(iter(src), depth=3)
    _settle(src, 4)
    # 3 queued and 1 waiting for room (taken from the source, not yet queued)
    assert src.taken == 4
    assert next(it) == {"tokens": [0, 1]}
    _settle(src, 5)
    assert src.taken == 5
    it.close()
    assert not it._thread.is_alive()


def test_an_error_arrives_after_the_items_before_it():
    it = Prefetcher(iter(Source(10, fail_at=3)), depth=2)
    assert [next(it)["tokens"][0] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="disk gone at item 3"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_depth_zero_is_the_source_itself_and_negative_is_refused():
    src = iter(Source(2))
    assert prefetched(src, 0) is src
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetcher(src, 0)
    with pytest.raises(ConfigError, match="'data.prefetch' must be >= 0, got -1"):
        parse_args(["--config", "configs/tiny.yaml", "data.prefetch=-1"])


def test_a_dropped_iterator_stops_its_thread():
    it = Prefetcher(iter(Source(100)), depth=2)
    next(it)
    thread = it._thread
    del it  # the thread holds no reference to its iterator
    thread.join(timeout=5)
    assert not thread.is_alive()
