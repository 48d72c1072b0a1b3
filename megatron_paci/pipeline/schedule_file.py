"""Schedules from a file: ``pipeline.schedule=file:PATH``.

A file gives every rank's actions for ONE window (micro-batches 1..M, ``STEP1``);
a run repeats that window, renumbered (window k runs micro-batches (k-1)M+1..kM
and ends in STEPk). Two forms, the same actions as ``str(Action)`` writes them:

YAML::

    title: hand-written 1F1B-flush
    stages: 2
    microbatches: 2          # M, per window on one data-parallel rank
    chunks: 1                # model chunks per rank (optional, default 1)
    steps: global            # global (flush, dp all-reduce, global clip) | local
    weights: live            # live | two_versions (PipeDream-2BW's stash)
    ranks:
      0: [F1, F2, B1, B2, STEP1]
      1: [F1, B1, F2, B2, STEP1]

CSV (``rank,action`` rows; the same settings as ``# key: value`` comment lines,
``stages`` and ``microbatches`` inferred when absent)::

    # steps: global
    rank,action
    0,F1
    ...

The lists are checked when the file is loaded (validate.py), before any process
group starts: a malformed row names its line, a bad list its rank and action.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import yaml

from megatron_paci.pipeline.actions import STEP, Action, parse_action
from megatron_paci.pipeline.registry import FILE_PREFIX, ScheduleSpec
from megatron_paci.pipeline.versions import LIVE, TWO_VERSIONS

_KEYS = {"title", "stages", "microbatches", "chunks", "steps", "weights", "ranks"}
_WEIGHTS = {"live": LIVE, "two_versions": TWO_VERSIONS}
_cache: dict[tuple[str, float], ScheduleSpec] = {}


class ScheduleFileError(ValueError):
    """A schedule file that cannot be read or run; the message names the file."""


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ScheduleFileError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ScheduleFileError(f"{path}: expected a mapping with 'ranks', got "
                                f"{type(data).__name__}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ScheduleFileError(f"{path}: unknown key(s) {', '.join(unknown)}; expected "
                                f"{', '.join(sorted(_KEYS))}")
    ranks = data.get("ranks")
    if not isinstance(ranks, dict) or not ranks:
        raise ScheduleFileError(f"{path}: 'ranks' must map each rank to its list of actions")
    lists: dict[int, list[Action]] = {}
    for rank, items in ranks.items():
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise ScheduleFileError(f"{path}: rank {rank!r} is not an integer")
        if isinstance(items, str):
            items = items.split()
        if not isinstance(items, list):
            raise ScheduleFileError(f"{path}: rank {rank}: expected a list of actions")
        try:
            lists[rank] = [parse_action(str(x)) for x in items]
        except ValueError as e:
            raise ScheduleFileError(f"{path}: rank {rank}: {e}") from None
    data["ranks"] = lists
    return data


def _read_csv(path: str) -> dict[str, Any]:
    data: dict[str, Any] = {}
    lists: dict[int, list[Action]] = {}
    header_seen = False
    with open(path, newline="") as f:
        for line_no, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            if text.startswith("#"):
                key, sep, value = text[1:].partition(":")
                if sep and key.strip() in _KEYS - {"ranks"}:
                    data[key.strip()] = yaml.safe_load(value.strip())
                continue
            row = next(csv.reader([text]))
            if not header_seen and [c.strip() for c in row[:2]] == ["rank", "action"]:
                header_seen = True
                continue
            if len(row) != 2:
                raise ScheduleFileError(f"{path}:{line_no}: expected 'rank,action', got "
                                        f"{text!r}")
            try:
                rank = int(row[0])
                lists.setdefault(rank, []).append(parse_action(row[1]))
            except ValueError as e:
                raise ScheduleFileError(f"{path}:{line_no}: {e}") from None
    if not lists:
        raise ScheduleFileError(f"{path}: no 'rank,action' rows")
    data["ranks"] = lists
    return data


def _spec_from(path: str, data: dict[str, Any]) -> ScheduleSpec:
    lists = data["ranks"]
    stages = data.get("stages", len(lists))
    if sorted(lists) != list(range(stages)):
        raise ScheduleFileError(f"{path}: ranks {sorted(lists)} given, expected 0..{stages - 1} "
                                f"(stages: {stages})")
    chunks = data.get("chunks", 1)
    microbatches = data.get("microbatches")
    if microbatches is None:
        microbatches = len({a.index for a in lists[0] if a.kind == "F"})
    for key, value in (("stages", stages), ("microbatches", microbatches), ("chunks", chunks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ScheduleFileError(f"{path}: '{key}' must be an integer >= 1, got {value!r}")
    steps = data.get("steps", "global")
    if steps not in ("global", "local"):
        raise ScheduleFileError(f"{path}: 'steps' must be global or local, got {steps!r}")
    weights = data.get("weights", "live")
    if weights not in _WEIGHTS:
        raise ScheduleFileError(f"{path}: 'weights' must be one of {', '.join(_WEIGHTS)}, got "
                                f"{weights!r}")
    window_lists = [lists[s] for s in range(stages)]

    def requires(p: int, window: int, v: int) -> str | None:
        if (p, window, v) != (stages, microbatches, chunks):
            return (f"schedule file {path} is written for {stages} stages, {microbatches} "
                    f"micro-batches per window and {chunks} chunk(s) per rank; the run has "
                    f"parallel.pipeline={p}, {window} micro-batches per window and "
                    f"parallel.virtual_pipeline={v}")
        return None

    def build(p: int, stage: int, window: int, num_windows: int, first_window: int,
              v: int) -> list[Action]:
        out: list[Action] = []
        for k in range(first_window, first_window + num_windows):
            shift = (k - 1) * window
            for a in window_lists[stage]:
                out.append(STEP(k, a.chunk) if a.kind == "STEP"
                           else Action(a.kind, a.index + shift, a.chunk))
        return out

    spec = ScheduleSpec(
        name=f"{FILE_PREFIX}{path}", title=str(data.get("title") or os.path.basename(path)),
        build=build, global_step=steps == "global",
        tied_embeddings_across_stages=steps == "global", weights=_WEIGHTS[weights],
        max_chunks=chunks, requires=requires, summary=f"per-rank action lists from {path}")
    from megatron_paci.pipeline.validate import check_lists

    try:
        # The window as written, then two of them: the repetition must run too.
        for windows in (1, 2):
            check_lists(spec, [build(stages, s, microbatches, windows, 1, chunks)
                               for s in range(stages)], microbatches, windows, 1, chunks)
    except ValueError as e:
        raise ScheduleFileError(f"schedule file {path}: {e}") from None
    return spec


def load_schedule_file(path: str) -> ScheduleSpec:
    """The spec for a schedule file (YAML by default, CSV for ``.csv``), checked."""
    if not os.path.isfile(path):
        raise ScheduleFileError(f"schedule file {path} not found (pipeline.schedule="
                                f"{FILE_PREFIX}{path})")
    key = (os.path.abspath(path), os.path.getmtime(path))
    if key not in _cache:
        data = _read_csv(path) if path.endswith(".csv") else _read_yaml(path)
        _cache[key] = _spec_from(path, data)
    return _cache[key]
