"""Which rank failed: heartbeats in the rendezvous store, read when an operation fails.

gloo reports a dead peer as "Connection reset by peer" and a frozen one as a timeout,
naming neither the rank nor the operation. Every rank therefore keeps a heartbeat in
the store the process group was rendezvoused on (torchrun's agent store, or the
TCPStore rank 0 hosts without torchrun): a daemon thread writes the time, host, pid and
the operation this rank is in every few seconds, through its own store client. A rank
whose operation fails reads its peers' heartbeats, waits a moment for them to move,
and names the ones that stopped (dead or frozen) and those that reported an error of
their own (``record_failure``), so every rank's last line says who to look at.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time

import torch.distributed as dist

_PREFIX = "megatron_paci/liveness/"
ALL_ALIVE = "every peer is alive"


def _interval(timeout_s: float) -> float:
    return max(0.5, min(2.0, timeout_s / 8))


class Liveness:
    """This rank's heartbeat thread and the reading of everyone else's."""

    def __init__(self, rank: int, world: int, timeout_s: float) -> None:
        self.rank, self.world = rank, world
        self.interval = _interval(timeout_s)
        self.operation: object = "starting"  # formatted only when a beat is written
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"{_PREFIX}{restart}/"
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        connect = datetime.timedelta(seconds=max(5.0, min(30.0, timeout_s)))
        # Clients of their own: the thread's writes never interleave with the main
        # thread's, and a read after a failure does not wait behind a stuck one.
        self._writer = dist.TCPStore(host, port, is_master=False, timeout=connect,
                                     wait_for_workers=False)
        self._reader = dist.TCPStore(host, port, is_master=False, timeout=connect,
                                     wait_for_workers=False)
        self._host = socket.gethostname()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one writer client, two threads
        self._beat()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self._writer.set(f"{self.prefix}beat/{self.rank}",
                         f"{time.time():.3f}|{self._host}|{os.getpid()}|{self._doing()}")

    def _doing(self) -> str:
        op = self.operation
        return op if isinstance(op, str) else f"pipeline action {op}"

    def _beat_now(self) -> None:
        with self._lock:
            self._beat()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat_now()
            except Exception:  # noqa: BLE001 - the store is gone: nothing to report to
                return

    def stop(self) -> None:
        self._stop.set()

    def record_failure(self, message: str) -> None:
        """Tell the peers this rank is stopping on an error of its own."""
        try:
            self._reader.set(f"{self.prefix}failed/{self.rank}", message[:500])
        except Exception:  # noqa: BLE001 - best effort: the store may be gone
            pass

    def _read(self, key: str) -> str | None:
        full = f"{self.prefix}{key}"
        if not self._reader.check([full]):
            return None
        return self._reader.get(full).decode(errors="replace")

    def report(self, ranks: list[int] | None = None) -> str:
        """Who among ``ranks`` (default: everyone else) stopped, froze or failed."""
        peers = [r for r in (ranks if ranks is not None else range(self.world))
                 if r != self.rank]
        try:
            failed = {r: self._read(f"failed/{r}") for r in peers}
            beats = {r: self._read(f"beat/{r}") for r in peers}
            # A rank whose heartbeat is recent may have died a moment ago: wait until a
            # live one would have beaten again, then read once more.
            ages = [time.time() - _stamp(beats[r]) for r in peers
                    if beats[r] is not None and not failed[r]]
            quiet = 2.5 * self.interval
            if ages and min(ages) < quiet:
                time.sleep(quiet - min(ages))
                failed = {r: self._read(f"failed/{r}") for r in peers}
                beats = {r: self._read(f"beat/{r}") for r in peers}
        except Exception:  # noqa: BLE001
            where = "torchrun's agent" if "TORCHELASTIC_RUN_ID" in os.environ else "rank 0"
            return (f"the rendezvous store (hosted by {where}) is unreachable: "
                    + ("rank 0 has most likely died" if where == "rank 0"
                       else "the job is being torn down"))
        notes = []
        for r in peers:
            if failed[r]:
                notes.append(f"rank {r} stopped on an error: {failed[r]}")
            elif beats[r] is None:
                notes.append(f"rank {r} never reported")
            else:
                stamp, host, pid, op = (beats[r].split("|", 3) + ["", "", ""])[:4]
                age = time.time() - float(stamp)
                if age >= 2.5 * self.interval:
                    notes.append(f"rank {r} (host {host}, pid {pid}) has not been heard from "
                                 f"for {age:.0f} s: dead or frozen (last in: {op})")
        return "; ".join(notes) if notes else ALL_ALIVE


def _stamp(beat: str) -> float:
    return float(beat.split("|", 1)[0])


_CURRENT: Liveness | None = None


def start(rank: int, world: int, timeout_s: float) -> Liveness | None:
    """Start this process's heartbeat (once; multi-process runs only)."""
    global _CURRENT
    if _CURRENT is None and world > 1 and "MASTER_ADDR" in os.environ:
        try:
            _CURRENT = Liveness(rank, world, timeout_s)
        except Exception:  # noqa: BLE001 - diagnostics must never stop a run
            _CURRENT = None
    return _CURRENT


def current() -> Liveness | None:
    return _CURRENT


def stop() -> None:
    global _CURRENT
    if _CURRENT is not None:
        _CURRENT.stop()
        _CURRENT = None


def set_operation(op: object, beat: bool = False) -> None:
    """What this rank is doing now: one attribute write (a pipeline action), plus a beat
    at once for a long operation that is rare (a save), so the peers read it."""
    if _CURRENT is not None:
        _CURRENT.operation = op
        if beat:
            try:
                _CURRENT._beat_now()
            except Exception:  # noqa: BLE001 - diagnostics never stop a run
                pass


def explain(ranks: list[int] | None = None) -> str:
    """The liveness report, or an empty string when there is none."""
    return _CURRENT.report(ranks) if _CURRENT is not None else ""


def record_failure(message: str) -> None:
    if _CURRENT is not None:
        _CURRENT.record_failure(message)
