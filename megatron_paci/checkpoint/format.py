"""One checkpoint format for every layout: ``torch.distributed.checkpoint`` + a JSON sidecar.

Layout under ``run.dir/checkpoints/``::

    iter_0000100/            one complete checkpoint
        .metadata            DCP index (read with a restricted unpickler)
        __<rank>_0.distcp    tensors, written by each rank
        meta.json            iteration, consumed samples, LR schedule, RNG scalars
        config.yaml          the resolved config of the run that wrote it
    latest_checkpointed_iteration.txt

Tensors are keyed by parameter name, so any rank layout can load what any other
wrote (DCP reshards). A checkpoint is written under ``iter_N.partial`` and renamed
only when complete, so a crash mid-save never hides or corrupts the newest good
one. Nothing is unpickled that could run code: tensor state only travels through
DCP, everything else through JSON, and DCP's own metadata is read with an
allow-list unpickler.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

FORMAT_VERSION = 1
META_FILE = "meta.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"
_DIR_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model being loaded."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE)) and os.path.isfile(
        os.path.join(path, ".metadata")
    )


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _DIR_RE.match(name)
        path = os.path.join(root, name)
        if m and _is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# --- safe reading of DCP metadata -------------------------------------------

_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib._local", "PosixPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name)
        if (module, name) in _ALLOWED_GLOBALS or isinstance(obj, (torch.dtype, torch.layout,
                                                                   torch.memory_format)):
            return obj
        # DCP's own metadata records: classes (dataclasses, enums) of its package.
        if module.startswith("torch.distributed.checkpoint") and isinstance(obj, type):
            return obj
        raise CheckpointError(
            f"refusing to unpickle {module}.{name} from checkpoint metadata "
            "(only DCP metadata types are allowed)"
        )


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read with an allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """Refuses non-tensor entries: DCP would ``torch.load`` them with full unpickling."""

    def load_bytes(self, read_item, value) -> None:  # noqa: ANN001
        raise CheckpointError(
            f"checkpoint entry '{read_item.dest_index.fqn}' is not a tensor; this format "
            "keeps non-tensor state in meta.json"
        )


# --- save / load ---------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    root: str,
    iteration: int,
    tensors: dict[str, Any],
    meta: dict[str, Any],
    config_yaml: str,
    keep_last: int = 0,
) -> str:
    """Write ``tensors`` (nested dicts of tensors) and ``meta`` (JSON) atomically."""
    final = checkpoint_dir(root, iteration)
    partial = final + ".partial"
    if _rank() == 0:
        if os.path.exists(partial):
            shutil.rmtree(partial)
        os.makedirs(partial)
    _barrier()
    with _quiet_single_process():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(partial, sync_files=True))
    _barrier()
    if _rank() == 0:
        meta = {"format_version": FORMAT_VERSION, "iteration": iteration, **meta}
        _write_text(os.path.join(partial, META_FILE), json.dumps(meta, indent=1))
        _write_text(os.path.join(partial, "config.yaml"), config_yaml)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_text(os.path.join(root, LATEST_FILE), f"{iteration}\n")
        if keep_last > 0:
            for _, old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every call without a process group; one process is a valid layout."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_meta(path: str) -> dict[str, Any]:
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META_FILE})")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format_version {meta.get('format_version')}, expected {FORMAT_VERSION}"
        )
    return meta


def load_checkpoint(path: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """Fill ``tensors`` in place from the checkpoint at ``path``; return its meta."""
    meta = read_meta(path)
    try:
        with _quiet_single_process():
            dcp.load(
                tensors,
                storage_reader=SafeFileSystemReader(path),
                planner=_TensorOnlyLoadPlanner(),
            )
    except (Exception, CheckpointException) as e:
        # DCP wraps per-rank failures (CheckpointException is a BaseException);
        # keep the cause readable.
        raise CheckpointError(f"could not load checkpoint {path}: {_first_line(e)}") from e
    return meta


def _first_line(e: BaseException) -> str:
    """The innermost error line of a (possibly multi-rank) DCP failure."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln.split(":")[0] or "refusing" in ln]
    return errors[-1] if errors else (lines[-1] if lines else type(e).__name__)
