"""What a checkpoint holds, without loading it: ``python -m megatron_paci.checkpoint.inspect DIR``.

Reads meta.json, config.yaml, manifest.json and the DCP index only, so it answers
in a second for a checkpoint of any size (and works where the shard files are
not even present); ``--verify`` additionally checks every file's size and CRC-32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from megatron_paci.checkpoint.format import (
    CONFIG_FILE,
    _is_complete,
    _iteration_dirs,
    latest_checkpoint,
    verify_checkpoint,
)
from megatron_paci.checkpoint.integrity import (
    MANIFEST_FILE,
    CheckpointError,
    read_dcp_metadata,
    read_manifest,
    read_meta_file,
)


def find_checkpoint(directory: str) -> tuple[str, list[str]]:
    """The checkpoint ``directory`` names (an ``iter_N`` dir, a checkpoints/ dir or a run
    dir: the newest complete one) and notes on newer ``iter_N`` dirs that were skipped."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such directory")
    if os.path.basename(os.path.normpath(directory)).startswith("iter_") or any(
        os.path.exists(os.path.join(directory, f)) for f in ("meta.json", ".metadata")
    ):
        return directory, []
    root = os.path.join(directory, "checkpoints")
    root = root if os.path.isdir(root) else directory
    path = latest_checkpoint(root)
    if path is None:
        raise CheckpointError(f"{root}: no complete checkpoint (expected iter_NNNNNNN/ "
                              "holding meta.json and .metadata)")
    dirs = _iteration_dirs(root)
    newest = next(it for it, p in dirs if p == path)
    notes = [f"skipped {p}: incomplete (no meta.json or .metadata)"
             for it, p in dirs if it > newest and not _is_complete(p)]
    return path, notes


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """``key: saved -> given`` for every key whose value differs (absent keys included)."""
    a, b = _flatten(saved), _flatten(given)
    rows = []
    for key in sorted(a.keys() | b.keys()):
        va, vb = a.get(key, "(absent)"), b.get(key, "(absent)")
        if va != vb:
            rows.append(f"{key}: {_show(va)} -> {_show(vb)}")
    return rows


def _show(v: Any) -> str:
    return v if v == "(absent)" else json.dumps(v, default=str)


def tensor_rows(path: str) -> list[tuple[str, str, str]]:
    """(name, shape, dtype) of every entry in the DCP index, sorted by name."""
    rows = []
    for name, md in read_dcp_metadata(path).state_dict_metadata.items():
        if hasattr(md, "size"):
            rows.append((name, str(list(md.size)),
                         str(md.properties.dtype).removeprefix("torch.")))
        else:
            rows.append((name, "-", "bytes"))
    return sorted(rows)


def _saved_config(path: str) -> dict[str, Any] | None:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise CheckpointError(f"{file}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a mapping of config sections")
    return data


def describe(path: str, given: dict[str, Any] | None = None, given_name: str = "") -> list[str]:
    """The report's lines; reads no tensor data."""
    meta = read_meta_file(path)
    rows = tensor_rows(path)
    manifest = read_manifest(path)
    layout = meta.get("layout")
    lines = [
        f"checkpoint: {path}",
        f"iteration: {meta['iteration']}",
        f"consumed samples: {meta.get('consumed_samples', 'unknown')}",
        "layout: " + (", ".join(f"{k} {v}" for k, v in layout.items())
                      if isinstance(layout, dict) else "unknown"),
        f"schedule: {meta.get('schedule', 'unknown')}"
        + (" (with a stashed older weight version)" if meta.get("pipeline_stash") else ""),
        f"manifest: {len(manifest)} files with size and crc32" if manifest is not None
        else f"manifest: none ({MANIFEST_FILE} absent: written before checksums were recorded)",
    ]
    if given is not None:
        saved = _saved_config(path)
        if saved is None:
            lines.append(f"config diff: {os.path.join(path, CONFIG_FILE)} is missing")
        else:
            diff = config_diff(saved, given)
            lines.append(f"config diff against {given_name} (key: saved -> given): "
                         + (f"{len(diff)} keys" if diff else "none"))
            lines += [f"  {row}" for row in diff]
    width = max((len(n) for n, _, _ in rows), default=0)
    swidth = max((len(s) for _, s, _ in rows), default=0)
    lines.append(f"tensors: {len(rows)}")
    lines += [f"  {n.ljust(width)}  {s.ljust(swidth)}  {d}" for n, s, d in rows]
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_paci.checkpoint.inspect",
        description="Print what a checkpoint holds (iteration, samples, layout, schedule, "
                    "config diff, tensor names/shapes/dtypes) without reading tensor data.")
    p.add_argument("dir", metavar="DIR",
                   help="a run directory or its checkpoints/ directory (the newest complete "
                        "checkpoint is shown), or one iter_NNNNNNN directory")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="overrides applied to --config before the diff")
    p.add_argument("--config", metavar="CONFIG",
                   help="YAML config to compare the saved config.yaml with "
                        "(printed as key: saved -> given)")
    p.add_argument("--verify", action="store_true",
                   help="also check every file's size and crc32 against manifest.json "
                        "(reads all tensor data)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        given = None
        if args.config or args.overrides:
            from megatron_paci.config.loader import ConfigError, load_config

            try:
                given = load_config(args.config, args.overrides).to_dict()
            except ConfigError as e:
                raise CheckpointError(str(e)) from None
            # Compare as the trainer saved it: through YAML.
            given = yaml.safe_load(yaml.safe_dump(given))
        path, notes = find_checkpoint(args.dir)
        lines = describe(path, given, args.config or "defaults + overrides")
        if args.verify:
            verify_checkpoint(path, on_warning=lambda m: notes.append(m))
            lines.append("verify: every file matches manifest.json"
                         if read_manifest(path) is not None else
                         "verify: no manifest; structure checked (files present, long enough)")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
