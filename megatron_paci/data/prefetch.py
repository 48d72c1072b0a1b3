"""Read the next micro-batches on a background thread, off the pipeline's critical path.

A stage reads each micro-batch when its forward starts; in between, it spends much of
its time blocked in a receive from a neighbour (gloo and NCCL waits release the GIL).
A thread that keeps ``depth`` micro-batches ready turns that idle time into reading
time, in the same order, so a run is bit-identical with or without it. With
``data.num_workers > 0`` the DataLoader's worker processes already read ahead.

``data.prefetch`` is 0 (off) by default: on the 2-core CPU machine the benchmarks run
on, the thread competes with compute for the stage's one core and the A/B in
docs/benchmarks.md showed no gain; it is kept for hosts with idle cores (a GPU run).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any


def _put(q: queue.Queue, stop: threading.Event, item: Any) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _fill(source: Iterator, q: queue.Queue, stop: threading.Event) -> None:
    # A function, not a method: the thread holds no reference to its Prefetcher, so an
    # iterator dropped by its consumer is collected, and its __del__ stops the thread.
    try:
        for item in source:
            if not _put(q, stop, ("item", item)):
                return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
        _put(q, stop, ("error", e))
        return
    _put(q, stop, ("end", None))


class Prefetcher:
    """An iterator over ``source``'s items, read up to ``depth`` ahead by a daemon thread.

    An exception raised by ``source`` is raised here, at the item where it happened.
    ``close()`` (or dropping the iterator) stops the thread; items read ahead are
    dropped, which is harmless because the sampler's position comes from
    ``consumed_samples``, never from how far an iterator got.
    """

    def __init__(self, source: Iterator, depth: int) -> None:
        self._stop = threading.Event()  # first: __del__ reads it even if this raises
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=_fill, args=(source, self._queue, self._stop),
                                        name="data-prefetch", daemon=True)
        self._done = False
        self._thread.start()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        kind, item = self._queue.get()
        if kind == "item":
            return item
        self._done = True
        self._thread.join()
        if kind == "error":
            raise item
        raise StopIteration

    def close(self) -> None:
        self._stop.set()
        self._done = True
        self._thread.join(timeout=5)

    def __del__(self) -> None:
        self._stop.set()


def prefetched(source: Iterator, depth: int) -> Iterator:
    """``source`` itself for ``depth`` 0, else a Prefetcher over it."""
    return source if depth == 0 else Prefetcher(source, depth)
