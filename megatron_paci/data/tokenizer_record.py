"""Which tokenizer made a dataset: a small JSON record beside ``PREFIX.bin``/``PREFIX.idx``.

Token ids mean nothing without the tokenizer that produced them, and a dataset read with
another tokenizer trains silently on garbage. ``data_prep.preprocess`` writes
``PREFIX.tokenizer_info.json`` (kind, files, vocab size, eod id, sha256 of the tokenizer
files); training compares it with ``data.tokenizer`` before it starts. The ``.idx`` itself
is untouched (Megatron's format), and datasets without a record, such as Megatron's own,
load unchecked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from megatron_paci.data.tokenizer import Tokenizer

RECORD_SUFFIX = ".tokenizer_info.json"
RECORD_FORMAT = "megatron_paci tokenizer record v1"
# What must agree for two tokenizers to give the same ids.
COMPARED_KEYS = ("kind", "vocab_size", "eod", "sha256")


def record_path(prefix: str) -> str:
    return prefix + RECORD_SUFFIX


def tokenizer_record(tokenizer: Tokenizer, spec: str) -> dict[str, Any]:
    return {"format": RECORD_FORMAT, "spec": spec, **tokenizer.describe()}


def write_tokenizer_record(path: str, tokenizer: Tokenizer, spec: str) -> None:
    """Write the record to ``path`` (preprocess writes a temporary name, then renames)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_record(tokenizer, spec), f, indent=2)
        f.write("\n")


def read_tokenizer_record(prefix: str) -> dict[str, Any] | None:
    """The record of dataset ``prefix``, or None when it has none."""
    path = record_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read tokenizer record {path}: {e}") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or any(
            k not in record for k in COMPARED_KEYS):
        raise ValueError(f"{path} is not a tokenizer record (expected {RECORD_FORMAT!r} with "
                         f"{', '.join(COMPARED_KEYS)}); remove it or preprocess the data again")
    return record


def describe_record(record: dict[str, Any]) -> str:
    """One line naming a tokenizer: kind, files, vocabulary, eod and fingerprint."""
    files = ", ".join(record.get("files") or [])
    fingerprint = f", sha256 {record['sha256'][:16]}" if record.get("sha256") else ""
    return (f"{record['kind']}{' ' + files if files else ''} (vocab {record['vocab_size']}, "
            f"eod {record['eod']}{fingerprint})")


def check_dataset_tokenizers(data_path: Sequence, tokenizer: Tokenizer, spec: str) -> list[str]:
    """Refuse datasets whose record names another tokenizer than ``spec``.

    ``data_path`` is ``data.path`` (prefixes, optionally weighted). Returns the prefixes
    that have no record and so were not checked.
    """
    # Imported here: preprocess writes records and should not pay for torch.
    from megatron_paci.data.gpt_dataset import parse_prefixes_and_weights

    prefixes, _ = parse_prefixes_and_weights(data_path)
    configured = tokenizer_record(tokenizer, spec)
    unchecked = []
    for prefix in prefixes:
        recorded = read_tokenizer_record(prefix)
        if recorded is None:
            if os.path.isfile(prefix + ".idx"):  # a missing dataset is reported by its loader
                unchecked.append(prefix)
            continue
        differ = [k for k in COMPARED_KEYS if recorded[k] != configured[k]]
        if differ:
            raise ValueError(
                f"dataset {prefix} was tokenized with {describe_record(recorded)} "
                f"(recorded in {record_path(prefix)}), but data.tokenizer={spec} is "
                f"{describe_record(configured)}; they differ in {', '.join(differ)}: set "
                "data.tokenizer to the tokenizer that made the data, or preprocess the data "
                "again with this one")
    return unchecked
