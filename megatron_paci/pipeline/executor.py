"""One executor for every schedule: it runs a stage's action list on a real rank.

The list (schedules.py) says what to do and in which order; the weight-version
policy (versions.py) says which weights each forward and backward sees. The
executor moves activations forward and gradients backward between
neighbouring stages with isend/irecv, accumulates gradients, applies
STEPs, and records for every micro-batch the versions it saw and when each
action ran. Nothing here knows a schedule's name: it asks the spec (registry.py)
whether a STEP is global or local.

A rank may hold several model chunks (virtual stages u = chunk * P + rank, as in
Megatron's interleaved schedule): a forward on chunk c receives from virtual stage
u-1 and sends to u+1, a backward the other way, so rank P-1 sends to rank 0 between
chunks. Messages carry no tags: the schedule validator (validate.py) checks before
the run that between every pair of ranks they are received in the order sent.

Each send and receive is posted alone, a send as soon as its action has produced
it, a receive ahead of the action that needs it (receives.py), each on the group of
its direction (``ParallelState.p2p_group``): NCCL blocks a stream on each op until
the peer's matching op runs, and with one stream per directed edge nothing queues
behind an op going the other way (pipeline/nccl_model.py replays the calls under
those rules). Sends complete asynchronously; their tensors are kept until they do,
at most 2P of them.

Nothing is read back to the host per micro-batch: losses stay on the device
until the STEP, and action times are marks (clock.py) read as they complete.
On a GPU a read per micro-batch would make the host wait for the device before
it could queue the next micro-batch's kernels.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_paci.parallel import comm, liveness
from megatron_paci.parallel.state import ParallelState
from megatron_paci.pipeline.actions import Action
from megatron_paci.pipeline.clock import clock_for
from megatron_paci.pipeline.receives import receive_plan
from megatron_paci.pipeline.registry import ScheduleSpec

# (iteration, the window's mean loss as a 0-d tensor on the device or None off the last
# stage, grad norm, skipped)
StepCallback = Callable[[int, torch.Tensor | None, float, bool], None]


class PipelineError(RuntimeError):
    """A stage could not complete an action: names the stage, the action and the peer."""


@dataclass
class Telemetry:
    """What one stage saw: versions per micro-batch, in-flight peak, action times.

    ``versions`` keeps a row per micro-batch only while it is in flight, unless the
    executor is asked to keep them all (``keep_versions``: the CSV dump and the tests);
    the most updates crossed is kept as a running maximum, so a run of millions of
    micro-batches holds no per-micro-batch history."""

    stage: int
    # (chunk, j) -> [v_F, v_B]
    versions: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    drift: int = 0  # most updates any finished micro-batch crossed
    # (chunk, j) -> [weights' checksum at F, at B]
    checksums: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    peak_in_flight: int = 0
    peak_unfinished_sends: int = 0  # sends posted and not yet complete (memory held)
    peak_versions: int = 1
    events: list[tuple[str, int, float, float, int]] = field(default_factory=list)
    busy_s: float = 0.0
    wall_s: float = 0.0
    kind_s: dict[str, float] = field(default_factory=lambda: {"F": 0.0, "B": 0.0, "S": 0.0})
    kind_n: dict[str, int] = field(default_factory=lambda: {"F": 0, "B": 0, "S": 0})

    def mean_ms(self, kind: str) -> float:
        return 1000.0 * self.kind_s[kind] / max(1, self.kind_n[kind])

    def max_drift(self) -> int:
        """Most updates any micro-batch crossed between its forward and backward."""
        return self.drift

    def rows(self) -> list[tuple[int, int, int, int, int]]:
        """(stage, chunk, j, v_F, v_B) in micro-batch order."""
        return [(self.stage, c, j, vf, vb) for (c, j), (vf, vb)
                in sorted(self.versions.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


@dataclass
class _InFlight:
    inputs: torch.Tensor | None  # received activations (requires grad), None on stage 0
    output: torch.Tensor  # activations sent on, or the scaled loss on the last stage


class PipelineExecutor:
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: Any,
        lr_schedule: Any,
        policy: Any,
        pstate: ParallelState,
        schedule: ScheduleSpec,
        window: int,
        activation_shape: tuple[int, int, int],
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        chunks: int = 1,
        record_events: bool = False,
        verify_versions: bool = False,
        keep_versions: bool = True,
        loss_factor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.policy = policy
        self.pstate = pstate
        self.schedule = schedule
        self.window = window
        self.shape = activation_shape
        self.device = device
        self.autocast = autocast
        self.global_step = schedule.global_step
        self.chunks = chunks
        # Chunks that step on their own (PACI, 2BW interleaved): ``optimizer`` is a
        # ChunkedOptimizer and ``policy`` a ChunkPolicies, one per chunk.
        self.per_chunk = schedule.optimizer_per_chunk(chunks)
        self._chunk_steps: dict[int, list] = {}  # k -> [chunks stepped, norm^2, skipped]
        self.record_events = record_events
        self.verify_versions = verify_versions
        self.keep_versions = keep_versions or verify_versions
        # Last stage: a device-side factor on each micro-batch loss before its backward
        # (the trainer's loss-spike guard: NaN for a spike, so every stage skips).
        self.loss_factor = loss_factor
        self.stage = pstate.pipeline_rank
        self.stages = pstate.pipeline_size
        self.ranks = pstate.pipeline_ranks
        self.telemetry = Telemetry(stage=self.stage)
        self._pending_sends: list[tuple[Any, torch.Tensor, int]] = []  # (work, tensor, peer)
        # Receives posted ahead (receives.py): list position -> (buffer, work).
        self._posted: dict[int, tuple[torch.Tensor, Any]] = {}
        self._pos: int | None = None  # the running action's position in its list
        self.clock = clock_for(device)
        self._t0 = self.clock.mark()
        self._segment_start: Any = None
        self._last_end: Any = None
        self._marks: list[tuple[str, int, Any, Any]] = []  # actions not yet read back

    def _optimizer(self, chunk: int) -> Any:
        return self.optimizer.of(chunk) if self.per_chunk else self.optimizer

    def _policy(self, chunk: int) -> Any:
        return self.policy.of(chunk) if self.per_chunk else self.policy

    # --- point-to-point ------------------------------------------------------

    def _send(self, tensor: torch.Tensor, peer: int) -> None:
        # The wire format is fp32 (the agreed buffer dtype); the converted tensor is
        # what must stay alive until the send completes.
        tensor = tensor.detach().float().contiguous()
        if tensor.shape != self.shape:
            raise PipelineError(f"stage {self.stage}: sending shape {tuple(tensor.shape)}, "
                                f"expected the agreed {self.shape}")
        me = self.pstate.rank
        try:
            work = comm.send(tensor, peer, self.pstate.p2p_group(me, peer), "pp")
        except Exception as e:  # gloo refuses at once when the peer's connection is gone
            raise self._send_failed(e, peer) from e
        self._keep_until_sent(work, tensor, peer)

    # --- virtual stages ------------------------------------------------------

    def _virtual(self, chunk: int) -> int:
        return chunk * self.stages + self.stage

    def _rank_of(self, virtual: int) -> int | None:
        """The rank running virtual stage ``virtual``; None past either end."""
        if not 0 <= virtual < self.stages * self.chunks:
            return None
        return self.ranks[virtual % self.stages]

    def _is_first(self, chunk: int) -> bool:
        return self._virtual(chunk) == 0

    def _is_last(self, chunk: int) -> bool:
        return self._virtual(chunk) == self.stages * self.chunks - 1

    def _recv_peer(self, action: Action) -> int | None:
        """The rank ``action`` receives from, if any."""
        side = action.spec.receives_from
        if side is None:
            return None
        return self._rank_of(self._virtual(action.chunk) + (-1 if side == "prev" else 1))

    def _send_peer(self, action: Action) -> int | None:
        """The rank ``action``'s output goes to, if any."""
        step = {"F": 1, "B": -1}.get(action.kind)
        return None if step is None else self._rank_of(self._virtual(action.chunk) + step)

    def _post_recv(self, peer: int, action: Action) -> tuple[torch.Tensor, Any]:
        buf = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        try:
            work = comm.recv(buf, peer, self.pstate.p2p_group(peer, self.pstate.rank), "pp")
        except Exception as e:  # gloo refuses at once when the peer's connection is gone
            raise self._peer_error(e, peer, f"{self._me()} was posting the receive for "
                                            f"{action} from {self._name(peer)}") from e
        return buf, work

    def _me(self) -> str:
        return f"stage {self.stage} (rank {self.pstate.rank})"

    def _name(self, peer: int) -> str:
        return f"stage {self.ranks.index(peer)} (rank {peer})"

    def _peer_error(self, error: Exception, peer: int, what: str) -> PipelineError:
        """A failed send or receive: ``what`` (naming the peer), gloo's first line, and what
        the liveness records say of that peer."""
        peers = liveness.explain([peer])
        return PipelineError(f"{what}: {comm.short_error(error)}"
                             + (f"; {peers}" if peers else ""))

    def _send_failed(self, error: Exception, peer: int) -> PipelineError:
        """Posted or waited for, a failed send reads the same."""
        return self._peer_error(error, peer, f"{self._me()}: a send to {self._name(peer)} "
                                             "failed")

    def _recv(self, peer: int, what: str, action: Action) -> torch.Tensor:
        posted = self._posted.pop(self._pos, None) if self._pos is not None else None
        buf, work = posted if posted is not None else self._post_recv(peer, action)
        try:
            comm.wait_recv(work, peer)
        except Exception as e:  # gloo: peer closed or timed out
            raise self._peer_error(e, peer, f"{self._me()} was running {action} and waiting "
                                            f"for {what} from {self._name(peer)}") from e
        return buf

    def _keep_until_sent(self, work: Any, tensor: torch.Tensor, peer: int) -> None:
        """Hold the sent tensors until their sends complete, and no more than 2P of them.

        Under PACI and 2BW a segment can run thousands of actions before its drain;
        holding every sent tensor until then would grow without bound. gloo reports a
        send complete only once waited for, so beyond 2P the oldest is waited for: safe,
        since the peer takes messages in order and needs nothing newer from this stage
        before that one. On NCCL a wait only orders streams.
        """
        unfinished = []
        for pending in self._pending_sends:
            if pending[0].is_completed():
                self._wait_send(pending[0], pending[2])  # at once; raises if it failed
            else:
                unfinished.append(pending)
        unfinished.append((work, tensor, peer))
        while len(unfinished) > 2 * self.stages:
            oldest, _, to = unfinished.pop(0)
            self._wait_send(oldest, to)
        self._pending_sends = unfinished
        self.telemetry.peak_unfinished_sends = max(self.telemetry.peak_unfinished_sends,
                                                   len(self._pending_sends))

    def _wait_send(self, work: Any, peer: int) -> None:
        try:
            work.wait()
        except Exception as e:  # gloo: peer closed or timed out
            raise self._send_failed(e, peer) from e

    def _drain_sends(self) -> None:
        for work, _, peer in self._pending_sends:
            self._wait_send(work, peer)
        self._pending_sends.clear()

    # --- actions -----------------------------------------------------------

    def _event(self, kind: str, action: Action, start: Any) -> None:
        self._marks.append((kind, action.index, action.chunk, start, self.clock.mark()))

    def _read_marks(self) -> None:
        """Fold the completed actions' times into the telemetry, in order, never waiting:
        marks complete in order, so at a drain waiting for one last mark completes all."""
        clock, tel = self.clock, self.telemetry
        done = 0
        for kind, index, chunk, start, end in self._marks:
            if not clock.done(end):
                break
            dt = clock.seconds(start, end)
            tel.busy_s += dt
            tel.kind_s[kind] += dt
            tel.kind_n[kind] += 1
            if self.record_events:
                tel.events.append((kind, index, clock.seconds(self._t0, start),
                                   clock.seconds(self._t0, end), chunk))
            self._last_end = end
            done += 1
        del self._marks[:done]

    def _inputs(self, action: Action, batches: Iterator | None, what: str) -> dict:
        """The forward arguments for micro-batch ``action.index`` on its chunk: tokens on the
        first virtual stage, labels on the last, the previous one's activations elsewhere."""
        tokens = labels = hidden = None
        first, last = self._is_first(action.chunk), self._is_last(action.chunk)
        if first or last:
            batch = next(batches)["tokens"].to(self.device, non_blocking=True)
            tokens, labels = batch[:, :-1], batch[:, 1:]
        if not first:
            hidden = self._recv(self._recv_peer(action),
                                f"{what} of micro-batch {action.index}", action)
        inputs = {"tokens": tokens if first else None, "hidden": hidden,
                  "labels": labels if last else None}
        if self.chunks > 1:
            inputs["chunk"] = action.chunk
        return inputs

    def _forward(self, action: Action, batches: Iterator | None, in_flight: dict,
                 losses: dict[int, torch.Tensor], scale: float) -> None:
        j, key = action.index, (action.chunk, action.index)
        inputs = self._inputs(action, batches, "activations")
        hidden = inputs["hidden"]
        if hidden is not None:
            hidden.requires_grad_(True)
        start = self.clock.mark()
        policy = self._policy(action.chunk)
        self.telemetry.versions[key] = [policy.forward_version(j), -1]
        if self.verify_versions:
            self.telemetry.checksums[key] = [policy.checksum(j)]
        with self.autocast():
            out = policy.forward(j, **inputs)
        last = self._is_last(action.chunk)
        if last:
            loss = out.float().mean()
            losses[j] = loss.detach()
            out = loss * scale
            if self.loss_factor is not None:
                out = out * self.loss_factor(loss)
        in_flight[key] = _InFlight(hidden, out)
        self.telemetry.peak_in_flight = max(self.telemetry.peak_in_flight, len(in_flight))
        self._event("F", action, start)
        if not last:
            self._send(out, self._send_peer(action))

    def _backward(self, action: Action, in_flight: dict) -> None:
        j, key = action.index, (action.chunk, action.index)
        item = in_flight.pop(key)
        grad = None
        if not self._is_last(action.chunk):
            grad = self._recv(self._recv_peer(action), f"gradients of micro-batch {j}", action)
        start = self.clock.mark()
        tel = self.telemetry
        policy = self._policy(action.chunk)
        tel.versions[key][1] = policy.backward_version(j)
        tel.drift = max(tel.drift, tel.versions[key][1] - tel.versions[key][0])
        if not self.keep_versions:
            del tel.versions[key]
        if self.verify_versions:
            tel.checksums[key].append(policy.checksum(j))
        # Only each chunk's last backward of the window marks gradients ready for the
        # data-parallel reduction (backwards of a chunk run in micro-batch order).
        self._optimizer(action.chunk).grad_buffer.sync_enabled = j % self.window == 0
        torch.autograd.backward(item.output, grad_tensors=grad)
        self._event("B", action, start)
        if not self._is_first(action.chunk):
            self._send(item.inputs.grad, self._send_peer(action))

    def _step(self, action: Action) -> tuple[float, bool] | None:
        """Apply the update; returns (grad norm, skipped) once the rank's update k is
        complete (for chunks stepping on their own: after the last of them), else None."""
        if self.global_step:
            # The flush is a global barrier: every stage's sends of this window land
            # first, and the wait for the slowest stage is idle time, not step time.
            self._drain_sends()
            comm.barrier(self.pstate.pipeline_group, "pp")
        start = self.clock.mark()
        k, chunk = action.index, action.chunk
        optimizer, policy = self._optimizer(chunk), self._policy(chunk)
        # Update k uses the LR of the k-th step whichever chunk applies it.
        lr = self.lr_schedule.lr_at(k - 1) if self.per_chunk else self.lr_schedule.lr
        policy.before_step()
        norm, skipped = optimizer.step(lr)
        policy.after_step()
        self.telemetry.peak_versions = max(self.telemetry.peak_versions,
                                           self.policy.live_versions())
        optimizer.zero_grad()
        self._event("S", action, start)
        if self.per_chunk:
            done = self._chunk_steps.setdefault(k, [0, 0.0, False])
            done[0] += 1
            done[1] += norm * norm
            done[2] = done[2] or skipped
            if done[0] < self.chunks:
                return None
            del self._chunk_steps[k]
            norm, skipped = math.sqrt(done[1]), done[2]
        # A skipped (non-finite) update still advances the LR schedule: under the
        # asynchronous schedules each stage skips on its own, and the stages' LR
        # schedules must stay aligned.
        self.lr_schedule.step()
        return norm, skipped

    # --- public --------------------------------------------------------------

    def measured_bubble(self) -> float:
        """1 - compute time / training wall time on this stage (idle = waiting on peers)."""
        tel = self.telemetry
        wall = tel.wall_s
        if self._segment_start is not None:
            self._read_marks()
            now = self.clock.mark()
            if not self.clock.done(now):  # a GPU still busy: up to the last action read
                now = self._last_end
            wall += self.clock.seconds(self._segment_start, now)
        return max(0.0, 1.0 - tel.busy_s / wall) if wall > 0 else 0.0

    def train_segment(self, batches: Iterator | None, first_window: int, num_windows: int,
                      on_step: StepCallback) -> None:
        """Run ``num_windows`` windows from ``first_window`` and drain: on return no
        micro-batch is in flight and every send has landed."""
        actions = self.schedule.actions(self.stages, self.stage, self.window, num_windows,
                                        first_window, self.chunks)
        in_flight: dict[int, _InFlight] = {}
        losses: dict[int, torch.Tensor] = {}
        scale = 1.0 / self.window
        self.optimizer.zero_grad()
        self._segment_start = self._last_end = self.clock.mark()
        peers = [self._recv_peer(a) for a in actions]
        plan = receive_plan(peers)
        for pos, action in enumerate(actions):
            liveness.set_operation(action)
            for i in plan[pos]:
                self._posted[i] = self._post_recv(peers[i], actions[i])
            self._pos = pos
            if action.kind == "F":
                self._forward(action, batches, in_flight, losses, scale)
            elif action.kind == "B":
                self._backward(action, in_flight)
            elif action.kind == "STEP":
                stepped = self._step(action)
                if stepped is None:
                    continue  # other chunks of this rank have update k still to apply
                norm, skipped = stepped
                k = action.index
                window_losses = [losses.pop(j) for j in range((k - 1) * self.window + 1,
                                                               k * self.window + 1)
                                 if j in losses]
                # Averaged in float64, as the log always has.
                loss = (torch.stack(window_losses).double().mean() if window_losses
                        else None)
                on_step(k, loss, norm, skipped)
            else:
                raise PipelineError(f"stage {self.stage}: no handler for action {action}")
        self._pos = None
        assert not self._posted, f"stage {self.stage}: receives left posted {self._posted}"
        self._drain_sends()
        end = self.clock.mark()
        self.clock.wait(end)
        self._read_marks()
        assert not self._marks, f"stage {self.stage}: action times left unread"
        self.telemetry.wall_s += self.clock.seconds(self._segment_start, end)
        self._segment_start = None
        assert not in_flight, f"stage {self.stage}: micro-batches left in flight {in_flight}"

    @torch.no_grad()
    def forward_only(self, batches: Iterator | None,
                     num_microbatches: int) -> torch.Tensor | None:
        """Evaluation pass through the pipeline; the mean loss on the last stage, as a
        0-d tensor on the device (None elsewhere)."""
        total, count = None, 0
        for j in range(1, num_microbatches + 1):
            for chunk in range(self.chunks):
                action = Action("F", j, chunk)
                inputs = self._inputs(action, batches, "eval activations")
                with self.autocast():
                    out = self.model(**inputs)
                if self._is_last(chunk):
                    loss = out.float().mean().double()
                    total = loss if total is None else total + loss
                    count += 1
                else:
                    self._send(out, self._send_peer(action))
        self._drain_sends()
        return total / count if count else None
