"""One checkpoint format for every layout: ``torch.distributed.checkpoint`` + JSON sidecars.

Layout under ``run.dir/checkpoints/``::

    iter_0000100/            one complete checkpoint
        .metadata            DCP index (read with a restricted unpickler)
        __<rank>_0.distcp    tensors, written by each rank
        meta.json            iteration, consumed samples, LR schedule, layout, schedule
        config.yaml          the resolved config of the run that wrote it
        manifest.json        size and CRC-32 of every file above, written last
    latest_checkpointed_iteration.txt

Tensors are keyed by parameter name, so any rank layout can load what any other
wrote (DCP reshards). A checkpoint is written under ``iter_N.partial`` and renamed
only when complete, so a crash mid-save never hides or corrupts the newest good
one; at load the manifest is checked first, so a damaged file is an error that
names it, and ``resolve_loadable`` falls back to the previous checkpoint, with a
warning, instead of training on wrong weights. Nothing is unpickled that could
run code: tensor state only travels through DCP, everything else through JSON,
and DCP's own metadata is read with an allow-list unpickler.

Collectives: with a process group, ``save_checkpoint``, ``wait_for_pending_save``,
``verify_checkpoint``, ``resolve_loadable``, ``load_checkpoint`` and ``load_latest``
must be called by every rank at the same point (as ``dcp.save``/``dcp.load`` must).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import errno
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.tensor import DTensor

from megatron_paci.checkpoint.flat_shards import lookup, put_back, set_aside
from megatron_paci.checkpoint.integrity import (
    DCP_METADATA_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    META_FILE,
    CheckpointError,
    MetadataUnpickler,
    checksum_problems,
    digests,
    rank_shard_files,
    read_meta_file,
    structural_problems,
    write_manifest,
)

__all__ = [
    "FORMAT_VERSION", "LATEST_FILE", "META_FILE", "CheckpointError", "checkpoint_dir",
    "latest_checkpoint", "list_checkpoints", "load_checkpoint", "load_latest", "read_meta",
    "resolve_loadable", "save_checkpoint", "verify_checkpoint", "wait_for_pending_save",
]

LATEST_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "config.yaml"
_DIR_RE = re.compile(r"^iter_(\d{7,})$")

Warn = Callable[[str], None]


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _iteration_dirs(root: str) -> list[tuple[int, str]]:
    """Every ``iter_N`` directory (complete or damaged), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _DIR_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE)) and os.path.isfile(
        os.path.join(path, DCP_METADATA_FILE)
    )


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``root``, oldest first (files present; not verified)."""
    return [(it, path) for it, path in _iteration_dirs(root) if _is_complete(path)]


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint, unverified; ``resolve_loadable`` verifies."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# --- safe reading of DCP metadata -------------------------------------------


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read with an allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SavePlanner(DefaultSavePlanner):
    """Finds a ZeRO-1 ``FlatShard``'s blocks (DCP's lookup knows tensors only)."""

    def lookup_object(self, index: Any) -> Any:
        found = lookup(self.state_dict, index)
        return super().lookup_object(index) if found is None else found


class _HostCopy:
    """Stages an asynchronous save: each tensor copied to host memory on its own, and a
    ZeRO-1 ``FlatShard`` as its blocks alone. DCP's own stagers deep-copy a DTensor
    through its storage, which fails for a view (a ZeRO-1 parameter is a view of the
    flat buffer)."""

    should_synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return _host_copy(state_dict)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _host_copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _host_copy(v) for k, v in x.items()}
    if isinstance(x, DTensor):
        return DTensor.from_local(x.to_local().detach().to("cpu", copy=True), x.device_mesh,
                                  x.placements, run_check=False, shape=x.shape,
                                  stride=x.stride())
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    return copy.deepcopy(x)  # a FlatShard copies its blocks alone


class _TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """Refuses non-tensor entries: DCP would ``torch.load`` them with full unpickling.
    Fills a ZeRO-1 ``FlatShard``'s blocks in place."""

    def set_up_planner(self, state_dict: Any, metadata: Any = None,
                       is_coordinator: bool = False) -> None:
        aside = set_aside(state_dict)
        super().set_up_planner(state_dict, metadata, is_coordinator)
        self.state_dict.update(put_back(state_dict, aside))

    def lookup_tensor(self, index: Any) -> Any:
        found = lookup(self.state_dict, index)
        return super().lookup_tensor(index) if found is None else found

    def load_bytes(self, read_item, value) -> None:  # noqa: ANN001
        raise CheckpointError(
            f"checkpoint entry '{read_item.dest_index.fqn}' is not a tensor; this format "
            "keeps non-tensor state in meta.json"
        )


# --- process group ---------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (small Python values only)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _stderr_warning(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _warn(on_warning: Warn | None, msg: str) -> None:
    if _rank() == 0:
        (on_warning or _stderr_warning)(msg)


_ASYNC_GROUP: Any = None


def _async_group() -> Any:
    """A gloo group of its own for DCP's background thread: its collectives must not
    interleave with the training loop's on the default group."""
    global _ASYNC_GROUP
    if _distributed() and _ASYNC_GROUP is None:
        _ASYNC_GROUP = dist.new_group(backend="gloo")
    return _ASYNC_GROUP


# --- save --------------------------------------------------------------------------


@dataclass
class _PendingSave:
    root: str
    iteration: int
    partial: str
    final: str
    meta: dict[str, Any]
    config_yaml: str
    keep_last: int
    shard_digests: Future  # this rank's {file: {size, crc32}}, once DCP has written them
    distributed: bool


_PENDING: _PendingSave | None = None
_HASHER: ThreadPoolExecutor | None = None


def save_checkpoint(
    root: str,
    iteration: int,
    tensors: dict[str, Any],
    meta: dict[str, Any],
    config_yaml: str,
    keep_last: int = 0,
    *,
    async_save: bool = False,
) -> str:
    """Write ``tensors`` (nested dicts of tensors) and ``meta`` (JSON) atomically.

    With ``async_save`` the call returns once the tensors are copied to host
    memory; DCP writes them in a background thread, and the manifest, rename and
    ``keep_last`` rotation happen in ``wait_for_pending_save`` (called by the next
    save, or by the caller before exit). Returns the final path either way.
    """
    wait_for_pending_save()
    final = checkpoint_dir(root, iteration)
    partial = final + ".partial"
    if _rank() == 0:
        if os.path.exists(partial):
            shutil.rmtree(partial)
        os.makedirs(partial)
    _barrier()
    writer = _Writer(partial, sync_files=True)
    rank = _rank()
    if not async_save:
        try:
            with _quiet_single_process():
                dcp.save(tensors, storage_writer=writer, planner=_SavePlanner())
        except (Exception, CheckpointException) as e:
            # DCP gathers every rank's failure: each rank raises here alike.
            raise _save_failed(root, final, partial, e) from e
        # Each rank hashes the shards it just wrote (likely still in page cache),
        # in parallel; rank 0 gathers the digests into the manifest.
        own = _own_digests(partial, rank)
        _finalize(root, iteration, partial, final, meta, config_yaml, keep_last, own)
        return final
    if not _distributed():
        # DCP's background thread repeats the single-process warning on every save.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single")
    upload = dcp.async_save(tensors, storage_writer=writer, planner=_SavePlanner(),
                            async_stager=_HostCopy(), process_group=_async_group(),
                            no_dist=not _distributed())
    upload = getattr(upload, "upload_completion", upload)

    def written_then_hashed() -> dict[str, dict[str, Any]] | str:
        upload.result()
        return _own_digests(partial, rank)

    global _PENDING, _HASHER
    if _HASHER is None:
        _HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-hash")
    _PENDING = _PendingSave(root, iteration, partial, final, dict(meta), config_yaml, keep_last,
                            _HASHER.submit(written_then_hashed), _distributed())
    return final


def wait_for_pending_save() -> str | None:
    """Block until the asynchronous save in flight (if any) is written, then finish it:
    manifest, rename into place, ``keep_last``. Returns its path, or None if none was
    in flight. A failed background write is a ``CheckpointError`` on every rank; its
    ``.partial`` directory stays behind and is never loaded."""
    global _PENDING
    p, _PENDING = _PENDING, None
    if p is None:
        return None
    try:
        own = p.shard_digests.result()
    except (Exception, CheckpointException) as e:
        own = _failure_text(e, p.partial)
    _finalize(p.root, p.iteration, p.partial, p.final, p.meta, p.config_yaml, p.keep_last, own,
              how="asynchronous save")
    return p.final


@atexit.register
def _finish_single_process_save() -> None:
    """One process that forgot to wait still gets its last checkpoint into place."""
    if _PENDING is not None and not _PENDING.distributed and not _distributed():
        wait_for_pending_save()


def _finalize(root: str, iteration: int, partial: str, final: str, meta: dict[str, Any],
              config_yaml: str, keep_last: int, own: dict[str, dict[str, Any]] | str,
              how: str = "save") -> None:
    """Sidecars, then the manifest over every file, then the rename (rank 0).

    ``own`` is this rank's shard digests, or the text of its failure; a failure on any
    rank (rank 0's writes here included) is a ``CheckpointError`` on every rank."""
    gathered = _all_gather(own)
    failed = [(r, why) for r, why in enumerate(gathered) if isinstance(why, str)]
    renamed, error = False, None
    if _rank() == 0 and not failed:
        try:
            files = {name: d for per_rank in gathered for name, d in per_rank.items()}
            meta = {"format_version": FORMAT_VERSION, "iteration": iteration, **meta}
            _write_text(os.path.join(partial, META_FILE), json.dumps(meta, indent=1))
            _write_text(os.path.join(partial, CONFIG_FILE), config_yaml)
            files.update(digests(partial, [DCP_METADATA_FILE, META_FILE, CONFIG_FILE]))
            write_manifest(partial, files)
            if os.path.exists(final):
                _remove(final)
            os.replace(partial, final)
            renamed = True
            _write_text(os.path.join(root, LATEST_FILE), f"{iteration}\n")
            if keep_last > 0:
                for _, old in list_checkpoints(root)[:-keep_last]:
                    _remove(old)
        except OSError as e:
            error = _failure_text(e, partial)
            if renamed:
                error += f" (after {final} was complete and in place)"
    if not failed:
        failed = [(0, why) for why in _all_gather(error)[:1] if why]  # also the barrier
    if failed:
        rank, why = failed[0]
        on = f" on rank {rank}" if _world() > 1 else ""
        raise CheckpointError(_failure_message(root, final, partial, f"{how}{on}", why,
                                               remove=not renamed))


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer, raising an OS error of a write as itself. Inside torch.save's
    zip writer a full disk becomes "unexpected pos N vs M", with the OSError only as
    its context, and DCP pickles errors between ranks, which drops that context."""

    def write_data(self, plan: Any, planner: Any) -> Any:
        with _os_error_surfaced(self.path):
            return super().write_data(plan, planner)

    def finish(self, metadata: Any, results: Any) -> None:
        with _os_error_surfaced(self.path):
            super().finish(metadata, results)


@contextlib.contextmanager
def _os_error_surfaced(where: Any) -> Iterator[None]:
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        cause = _os_error_in(e)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, cause.filename or str(where)) from e


def _os_error_in(e: BaseException) -> OSError | None:
    """The first OSError with an errno in ``e``, its causes and contexts, and the
    per-rank failures of a DCP ``CheckpointException``."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno:
            return x
        todo += [x.__cause__, x.__context__]
        if isinstance(x, CheckpointException):
            todo += [exc for exc, _ in x.failures.values()]
    return None


_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}


def _failure_text(e: BaseException, partial: str) -> str:
    """One line for a rank's failed write; a full disk says so, with the file."""
    cause = _os_error_in(e)
    if cause is not None and cause.errno in _FULL:
        return (f"{_FULL[cause.errno]} ({os.strerror(cause.errno)} writing "
                f"{cause.filename or partial})")
    if isinstance(e, CheckpointException) and e.failures:
        _, (exc, _tb) = min(e.failures.items())
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return f"{type(e).__name__}: {_first_line(e)}"


def _save_failed(root: str, final: str, partial: str, e: BaseException) -> CheckpointError:
    rank = ""
    if isinstance(e, CheckpointException) and e.failures and _world() > 1:
        rank = f" on rank {min(e.failures)}"
    return CheckpointError(_failure_message(root, final, partial, f"save{rank}",
                                            _failure_text(e, partial), remove=True))


def _failure_message(root: str, final: str, partial: str, how: str, why: str,
                     remove: bool) -> str:
    """The one line a failed save stops every rank with. Rank 0 removes the partial
    directory (it is never loaded, and on a full disk its space is what is missing)."""
    if remove and _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    free = ""
    with contextlib.suppress(OSError):
        free = f"; {_size(shutil.disk_usage(root).free)} free on {root}"
    kept = list_checkpoints(root)
    kept_text = (f"{kept[-1][1]} is still the newest complete checkpoint and the one a "
                 "relaunch resumes from" if kept else "no earlier checkpoint exists")
    removed = f"; the incomplete {partial} was removed" if remove else ""
    return f"{how} of checkpoint {final} failed: {why}{free}; {kept_text}{removed}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _own_digests(partial: str, rank: int) -> dict[str, dict[str, Any]] | str:
    """This rank's shard digests, or the text of the error that kept it from them."""
    try:
        return digests(partial, rank_shard_files(partial, rank))
    except OSError as e:
        return _failure_text(e, partial)


def _remove(path: str) -> None:
    """Rename away first: a deletion cut short never leaves a half-empty ``iter_N``."""
    doomed = path + ".deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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


# --- verify / resolve / load -----------------------------------------------------


def read_meta(path: str) -> dict[str, Any]:
    """``meta.json`` of a checkpoint; a missing, garbled or incomplete one names the file."""
    return read_meta_file(path)


def _problems(path: str, on_warning: Warn | None) -> list[str]:
    """Everything wrong with the checkpoint at ``path``, the same list on every rank.

    Every rank checks the (cheap) structure and the checksums of its share of the
    files; the lists are gathered, so the verdict is one collective result that
    cannot differ between ranks, even where their views of the filesystem would.
    """
    local, manifest = structural_problems(path)
    if manifest is not None:
        local += checksum_problems(path, manifest, _rank(), _world())
    gathered = _all_gather((local, manifest is None))
    problems = list(dict.fromkeys(p for per_rank, _ in gathered for p in per_rank))
    if not problems and gathered[0][1]:
        _warn(on_warning, f"{path} has no {MANIFEST_FILE} (written before checksums were "
                          "recorded): loading it with structural checks only")
    return problems


def verify_checkpoint(path: str, on_warning: Warn | None = None) -> None:
    """Raise ``CheckpointError`` naming the first damaged file of the checkpoint at ``path``."""
    problems = _problems(path, on_warning)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)


_VERIFIED: set[str] = set()  # resolved by resolve_loadable, not yet loaded


def resolve_loadable(root: str, on_warning: Warn | None = None) -> str | None:
    """The newest checkpoint under ``root`` that passes verification, or None if there
    is none at all. Each newer one that fails is named in a warning together with the
    one used instead; if every one fails, ``CheckpointError`` lists them."""
    skipped: list[tuple[str, str]] = []
    for _, path in reversed(_iteration_dirs(root)):
        problems = _problems(path, on_warning)
        if not problems:
            _warn_fallback(skipped, path, on_warning)
            _VERIFIED.add(os.path.abspath(path))
            return path
        skipped.append((path, problems[0]))
    _raise_if_none_usable(root, skipped)
    return None


def load_latest(root: str, tensors: dict[str, Any],
                on_warning: Warn | None = None) -> tuple[str, dict[str, Any]] | None:
    """Like ``resolve_loadable`` + ``load_checkpoint``, also falling back when a verified
    checkpoint fails to load. Returns (path, meta), or None when ``root`` holds none."""
    skipped: list[tuple[str, str]] = []
    for _, path in reversed(_iteration_dirs(root)):
        problems = _problems(path, on_warning)
        if not problems:
            try:
                meta = load_checkpoint(path, tensors, verify=False)
            except CheckpointError as e:  # raised on every rank: DCP gathers load errors
                problems = [str(e)]
        if problems:
            skipped.append((path, problems[0]))
            continue
        _warn_fallback(skipped, path, on_warning)
        return path, meta
    _raise_if_none_usable(root, skipped)
    return None


def _warn_fallback(skipped: list[tuple[str, str]], used: str, on_warning: Warn | None) -> None:
    for bad, why in skipped:
        _warn(on_warning, f"checkpoint {bad} is unusable ({why}); falling back to the "
                          f"previous checkpoint {used}")


def _raise_if_none_usable(root: str, skipped: list[tuple[str, str]]) -> None:
    if skipped:
        raise CheckpointError(f"no usable checkpoint under {root}: "
                              + "; ".join(f"{p}: {why}" for p, why in skipped))


def load_checkpoint(path: str, tensors: dict[str, Any], *, verify: bool = True,
                    on_warning: Warn | None = None) -> dict[str, Any]:
    """Fill ``tensors`` in place from the checkpoint at ``path``; return its meta.

    Verifies sizes and checksums first (skipped for a path ``resolve_loadable`` has
    just verified, or with ``verify=False``).
    """
    key = os.path.abspath(path)
    if verify and key not in _VERIFIED:
        verify_checkpoint(path, on_warning)
    _VERIFIED.discard(key)
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
