"""The action vocabulary of a schedule: what one rank does next, on which model chunk.

A rank's schedule is a list of actions. ``F(j)`` and ``B(j)`` run micro-batch ``j``
(1-based, in the order the first stage forwards them) forward or backward through one
model chunk; ``STEP(k)`` applies the ``k``-th optimizer update: to the rank's whole
model under a globally stepping schedule (the flush), to its ``chunk`` alone otherwise
(each model chunk of an asynchronous schedule steps after its own window). Sends and
receives are implied: a forward receives from the previous virtual stage and sends to
the next, a backward the other way round.

Kinds are declared in ``KINDS`` with the direction their input comes from, so that a
new kind (the input/weight-gradient split of zero-bubble schedules, say) is one entry
here plus its handler in the executor, not a rewrite of every reader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ActionKind:
    """What the executor, simulator and validators need to know about one kind."""

    name: str
    # Where the data this action consumes comes from: "prev" (the previous virtual stage,
    # a forward's activations), "next" (the next one, a backward's gradients) or None.
    receives_from: str | None
    # Whether it runs a micro-batch (F, B, ...) rather than an update of the weights.
    per_microbatch: bool
    # Draws and reports group actions by this letter.
    letter: str


KINDS: dict[str, ActionKind] = {
    "F": ActionKind("F", "prev", True, "F"),
    "B": ActionKind("B", "next", True, "B"),
    "STEP": ActionKind("STEP", None, False, "S"),
}

_TEXT = re.compile(r"^(F|B|STEP|S)(\d+)(?:c(\d+))?$")


@dataclass(frozen=True)
class Action:
    """One action of a rank's schedule.

    ``index`` is the micro-batch ``j`` for F/B and the update number ``k`` for STEP (both
    1-based); ``chunk`` is the model chunk (virtual stage on this rank) it runs on, 0
    unless the rank holds several. A global STEP updates every chunk of the rank (its
    chunk is 0); a local one updates its own chunk.
    """

    kind: str
    index: int
    chunk: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; expected one of "
                             f"{', '.join(KINDS)}")
        if self.index < 1:
            raise ValueError(f"action index must be >= 1, got {self.index}")
        if self.chunk < 0:
            raise ValueError(f"action chunk must be >= 0, got {self.chunk}")

    @property
    def spec(self) -> ActionKind:
        return KINDS[self.kind]

    def __str__(self) -> str:
        text = f"{KINDS[self.kind].letter}{self.index}"
        return f"{text}c{self.chunk}" if self.chunk else text


def F(j: int, chunk: int = 0) -> Action:
    """Forward of micro-batch ``j`` on model chunk ``chunk``."""
    return Action("F", j, chunk)


def B(j: int, chunk: int = 0) -> Action:
    """Backward of micro-batch ``j`` on model chunk ``chunk``."""
    return Action("B", j, chunk)


def STEP(k: int, chunk: int = 0) -> Action:
    """The ``k``-th optimizer update (of ``chunk`` alone under a local-step schedule)."""
    return Action("STEP", k, chunk)


def parse_action(text: str) -> Action:
    """``"F3"``, ``"B3c1"``, ``"S2"`` or ``"STEP2"`` -> an Action (the form ``str`` writes)."""
    m = _TEXT.match(text.strip())
    if m is None:
        raise ValueError(f"cannot read action {text!r}: expected F<j>, B<j> or STEP<k>, "
                         "optionally followed by c<chunk> (e.g. F3, B3c1, STEP1)")
    kind = "STEP" if m.group(1) in ("S", "STEP") else m.group(1)
    return Action(kind, int(m.group(2)), int(m.group(3) or 0))


def format_actions(actions: list[Action]) -> str:
    return " ".join(map(str, actions))
