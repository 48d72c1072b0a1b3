"""A failed send names the stage and rank it went to, gloo's first line without its
source location, and the liveness report on that peer, like a failed receive does."""

from types import SimpleNamespace

import pytest

from megatron_paci.parallel import liveness
from megatron_paci.pipeline.executor import PipelineError, PipelineExecutor


class FailedSend:
    def wait(self):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection "
                           "closed by peer [127.0.0.1]:41234\nException raised from ...")


class Report:
    def report(self, ranks):
        return f"rank {ranks[0]} stopped beating 12 s ago (dead or frozen)"


def test_failed_send_names_peer_and_its_liveness(monkeypatch):
    stage1 = SimpleNamespace(stage=1, pstate=SimpleNamespace(rank=3), ranks=[1, 3, 5])
    with pytest.raises(PipelineError) as e:
        PipelineExecutor._wait_send(stage1, FailedSend(), 5)
    assert str(e.value) == ("stage 1 (rank 3): a send to stage 2 (rank 5) failed: Connection "
                            "closed by peer [127.0.0.1]:41234")
    monkeypatch.setattr(liveness, "_CURRENT", Report())
    with pytest.raises(PipelineError, match=r"failed: Connection closed by peer \S+; rank 5 "
                                            r"stopped beating 12 s ago \(dead or frozen\)$"):
        PipelineExecutor._wait_send(stage1, FailedSend(), 5)
