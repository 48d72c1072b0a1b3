"""Run torchrun, minus its own report of a failed worker:
``python3 scripts/torchrun_quiet.py torchrun --standalone ... pretrain_gpt.py ARGS``.

When a worker exits non-zero, torchrun prints ~25 lines (its ChildFailedError
traceback and a table of failures) below the worker's own ``error:`` lines, and
exits 1 whatever the worker's code was. This forwards every other stderr line as
it comes, drops that report, and exits with the first failed worker's code, so a
config error reads as its ``error:`` lines and exit 75 (requeue) survives.
A worker that failed with a code other than 2 (bad input, already reported as
``error:`` lines) gets one summary line naming its rank.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys

BAD_INPUT = 2  # megatron_paci/training/exit_codes.py EXIT_BAD_INPUT
# The agent's log lines about the failure: which worker failed, and stopping the others.
AGENT_LOG = re.compile(r"torch/distributed/elastic/.*\] (failed \(exitcode: -?\d+\)"
                       r"|Sending process \d+ closing signal)")
FIELD = re.compile(r"^\s*(rank|exitcode)\s*:\s*(-?\d+)")
LOCAL_RANK = re.compile(r"local_rank:\s*(\d+)")


class ReportFilter:
    """Line by line: a traceback is held back until its last line shows whose it is."""

    def __init__(self, out) -> None:
        self.out = out
        self.held: list[str] = []  # a traceback not yet known to be torchrun's
        self.in_report = False
        self.root_cause = False
        self.root: dict[str, str] = {}

    def feed(self, line: str) -> None:
        if self.in_report:
            self._report_line(line)
        elif self.held:
            self.held.append(line)
            if line.startswith("torch.distributed.elastic.multiprocessing.errors."
                               "ChildFailedError"):
                self.held, self.in_report = [], True
            elif line[:1] not in (" ", "\t", "") and not line.startswith("Traceback"):
                self.flush()  # a worker's traceback ended: the worker's, show it
        elif line.startswith("Traceback (most recent call last):"):
            self.held = [line]
        elif not AGENT_LOG.search(line):
            self.write(line)

    def _report_line(self, line: str) -> None:
        if line.startswith("Root Cause"):
            self.root_cause = True
        elif self.root_cause:
            m = FIELD.match(line)
            if m:
                self.root.setdefault(m.group(1), m.group(2))
                lr = LOCAL_RANK.search(line)
                if lr:
                    self.root.setdefault("local_rank", lr.group(1))
            elif re.fullmatch(r"=+\s*", line):
                self.in_report = self.root_cause = False

    def write(self, line: str) -> None:
        self.out.write(line)
        self.out.flush()

    def flush(self) -> None:
        for line in self.held:
            self.write(line)
        self.held = []

    def exit_code(self) -> int:
        """The first failed worker's exit code (a signal as 128 + its number), or 0."""
        code = int(self.root.get("exitcode", 0))
        return 128 - code if code < 0 else code

    def summary(self) -> str | None:
        code = self.exit_code()
        if not code or code == BAD_INPUT:
            return None
        how = f"signal {128 - code}" if code > 128 else f"exit code {code}"
        return (f"error: rank {self.root.get('rank', '?')} (local rank "
                f"{self.root.get('local_rank', '?')}) failed first, with {how}")


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: torchrun_quiet.py torchrun [torchrun args]", file=sys.stderr)
        return 2
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, bufsize=1)
    # Ctrl-C reaches torchrun through the process group already; SIGTERM and SIGUSR1
    # sent to this process (a scheduler, `timeout`) are passed on, as exec would.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    filt = ReportFilter(sys.stderr)
    assert proc.stderr is not None
    for line in proc.stderr:
        filt.feed(line)
    filt.flush()
    rc = proc.wait()
    if rc == 0:
        return 0
    line = filt.summary()
    if line:
        print(line, file=sys.stderr, flush=True)
    return filt.exit_code() or rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
