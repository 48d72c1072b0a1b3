"""Every shell command that README.md and docs/ show runs and exits 0 (or fails the way
the page says), in document order, in a scratch copy of the repository.

Commands come from fenced ``bash``/``sh``/``shell``/``console`` blocks (``\\``
continuations joined, ``# comments`` dropped, ``NAME=value`` prefixes and
``export NAME=value`` lines kept as the command's environment) and from ``$ `` lines of
unlabeled blocks, whose following lines are the documented output and must appear in
the real one.

Each command needs a rule in RULES (first matching prefix wins); a command with none
fails ``test_every_documented_command_has_a_rule``, so a newly documented command is
never silently untested. Adding one is a line: ``("python -m x.y", run()),``. How a
rule runs its command:

- ``run(*args)``: as written, ``args`` appended (small sizes, stand-in inputs).
- ``train(*args)``: a pretraining run, shortened to a few iterations; its run
  directory is removed first, so it trains instead of resuming an earlier command's
  run.
- ``dry(reason)``: needs GPUs, a cluster or data that is not here: runs through its
  scripts with stand-ins for torchrun/srun/sbatch/scontrol that resolve the config
  and print it (``pretrain_gpt.py --print``) instead of training.
- ``fails(code)``: a documented error; must exit with ``code``.
- ``skip(reason)``: not run at all (the reason says who runs it instead).

Commands depend on earlier ones (the quickstart chain build_corpus -> train_tokenizer
-> preprocess -> pretrain -> generate), so all run in order in one prepared working
directory; a command identical to an earlier one is not run twice.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from conftest import ROOT, run_shell

from megatron_paci.config import parse_args

# --- how a command is run -------------------------------------------------------------

TRAIN_SMALL = ("train.iters=2", "train.eval_interval=2", "train.eval_iters=1",
               "logging.interval=1", "train.sample_tokens=8")
TRAINED = " iteration        2/       2 |"  # the last log line: it trained, not resumed
CORPUS_SMALL = ("--max-mb", "0.3", "--sources", "pydoc")  # no wheel download
QUICKSTART_SMALL = {"QUICKSTART_INSTALL": "0", "QUICKSTART_MB": "0.3",
                    "QUICKSTART_SOURCES": "pydoc"}


@dataclass(frozen=True)
class Rule:
    mode: str  # run | train | dry | fails | skip
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    code: int = 0
    prepare: Callable[[str], None] | None = None  # called with the working directory
    timeout: float = 180.0
    expect: str = ""  # printed on stdout when the command did its work


def run(*args: str, env: dict[str, str] | None = None, prepare=None, timeout=180.0,
        expect: str = "") -> Rule:
    return Rule("run", args, env or {}, prepare=prepare, timeout=timeout, expect=expect)


def train(*args: str, prepare=None) -> Rule:
    return Rule("train", TRAIN_SMALL + args, prepare=prepare, expect=TRAINED)


def dry(reason: str, expect: str = "") -> Rule:
    return Rule("dry", reason=reason, expect=expect)


def fails(code: int) -> Rule:
    return Rule("fails", code=code)


def skip(reason: str) -> Rule:
    return Rule("skip", reason=reason)


def link_datasets(*names: str) -> Callable[[str], None]:
    """data/NAME.bin/.idx as links to the quickstart's tokenized corpus."""
    def prepare(workdir: str) -> None:
        src = os.path.join(workdir, "data", "quickstart", "corpus_text_document")
        for name in names:
            for ext in (".bin", ".idx"):
                dst = os.path.join(workdir, "data", name + ext)
                if not os.path.exists(dst):
                    os.symlink(src + ext, dst)
    return prepare


# One line per documented command (prefix of the command without its env prefix).
RULES: list[tuple[str, Rule]] = [
    # README.md
    ("bash scripts/quickstart.sh", run(*TRAIN_SMALL, env=QUICKSTART_SMALL, timeout=300,
                                       expect="----- sample from runs/quickstart/")),
    ("bash scripts/test.sh", skip("the whole suite, this test included; CI runs it (.ci/run)")),
    ("pip install -e .", skip("installs this checkout, which the test already runs from")),
    ("python -m data_prep.build_corpus", run(*CORPUS_SMALL)),
    ("python -m data_prep.train_tokenizer", run()),
    ("python -m data_prep.preprocess", run()),
    ("python -m megatron_paci.training.generate", run("--tokens", "8", expect="----- sample")),
    ("python pretrain_gpt.py --config configs/tiny.yaml train.lr=", fails(2)),
    ("python pretrain_gpt.py --config configs/tiny.yaml optim.lr=1e-3 train.iters=500",
     train(prepare=link_datasets("wiki_text_document", "code_text_document"))),
    ("python -m megatron_paci.config", run()),
    ("bash scripts/pretrain_gpt.sh", dry("GPT-3 1.3B on 8 GPUs", expect="layout: 8 processes")),
    ("bash scripts/pretrain_gpt2_medium.sh", dry("GPT-2 Medium on 8 GPUs, /data inputs",
                                                 expect="layout: 8 processes")),
    ("python -m megatron_paci.pipeline.simulate", run()),
    # README.md, docs/checkpoint.md: the checkpoints of the runs above (runs/tiny: 2 iterations)
    ("python -m megatron_paci.checkpoint.inspect runs/tiny/checkpoints/iter_0000600",
     skip("names the 600-iteration checkpoint of the full tiny run; the test's has 2")),
    ("python -m megatron_paci.checkpoint.inspect", run()),
    ("python -m megatron_paci.checkpoint.export_hf", run()),
    ("python -m megatron_paci.checkpoint.import_hf", run()),
    # trains on from the imported checkpoint: its run directory must stay (no fresh dir)
    ("python pretrain_gpt.py --config runs/from_hf/", run("train.iters=2",
                                                          "train.eval_interval=0",
                                                          expect=TRAINED)),
    # README.md, docs/parallelism.md, docs/pipeline.md, docs/schedules/*.md
    ("torchrun --standalone --nproc_per_node 8", dry("8 processes; tests start 2-4 ranks",
                                                     expect="layout: 8 processes")),
    ("torchrun --standalone --nproc_per_node", train()),
    ("python pretrain_gpt.py --config configs/gpt3_13b.yaml --dry-run",
     run(expect="fits: yes")),
    ("python pretrain_gpt.py", train()),
    # README.md, docs/operations.md, docs/parallelism.md
    ("sbatch ", dry("a slurm cluster with GPUs", expect="end of arguments")),
    # docs/benchmarks.md
    ("python3 scripts/bench_ckpt_save.py", skip("minutes of save benchmarking on an idle "
                                                "machine; its numbers are in "
                                                "docs/benchmarks.md")),
    ("python3 scripts/trace_stages.py", run("--iters", "6", expect="| 1 |", timeout=240)),
    ("bash scripts/bench_schedules.sh", skip("minutes of wall-clock benchmarking on an idle "
                                             "machine; its numbers are in docs/benchmarks.md")),
    ("python3 -m pytest -m soak", skip("long soak: run by hand, result recorded in "
                                       "docs/benchmarks.md")),
    # docs/results.md
    ("python3 scripts/sweep_2bw_delay.py", skip("minutes of training; its numbers are in "
                                                "docs/results.md, and tests/distributed/"
                                                "test_2bw_delay.py runs its update rule")),
    ("bash scripts/compare_schedules.sh", skip("about 20 minutes of training (--quick still 3 "
                                               "minutes: 4 torchrun runs); its numbers are in "
                                               "docs/results.md and tests/unit/"
                                               "test_compare_schedules.py tests its rules")),
    # The whole comparison takes minutes and --quick still two torchrun launches per side
    # (about a minute): the documented commands run with --dry-run (every launch line
    # printed, nothing trained); tests/unit/test_bench_peer.py runs the pieces.
    # --ab-only starts no training process: its dry run names the in-process timings
    ("bash scripts/bench_peer.sh --profile --ab-only",
     run("--dry-run", expect="direct one-process A/B timings")),
    ("bash scripts/bench_peer.sh", run("--dry-run", expect="pretrain_gpt.py")),
]


def rule_for(text: str) -> Rule | None:
    return next((r for prefix, r in RULES if text.startswith(prefix)), None)


# --- reading the docs -----------------------------------------------------------------

SHELL_LANGS = {"bash", "sh", "shell", "console"}
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Command:
    where: str  # file:line
    env: dict[str, str]
    argv: list[str]
    output: list[str]  # documented output lines (console transcripts)

    @property
    def text(self) -> str:
        return " ".join(self.argv)


def documents() -> list[str]:
    """README first, then docs/ in path order (the order a reader meets the commands)."""
    docs = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    return [os.path.join(ROOT, "README.md"), *docs]


def _logical_lines(lines: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """Join backslash continuations; yields (first line number, joined text)."""
    buf, start = "", None
    for n, line in lines:
        if start is None:
            start = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield start, buf + line
        buf, start = "", None
    if start is not None:
        yield start, buf


def parse_commands(markdown: str, name: str) -> list[Command]:
    commands: list[Command] = []
    exported: dict[str, str] = {}
    for m in _FENCE.finditer(markdown):
        lang, body = m.group(1), m.group(2)
        first = markdown[:m.start(2)].count("\n") + 1
        lines = list(enumerate(body.splitlines(), start=first))
        if lang in ("", "console") and any(x.startswith("$ ") for _, x in lines):
            commands += _transcript(lines, name, exported)
        elif lang in SHELL_LANGS:
            for n, text in _logical_lines(lines):
                cmd = _command(text, f"{name}:{n}", exported)
                if cmd is not None:
                    commands.append(cmd)
    return commands


def _transcript(lines, name, exported) -> list[Command]:
    """``$ `` lines are commands (continued with ``\\``); the rest is their output."""
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        n, line = lines[i]
        if not line.startswith("$ "):
            if commands:
                commands[-1].output.append(line)
            i += 1
            continue
        text = line[2:]
        while text.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text.rstrip()[:-1] + " " + lines[i][1]
        cmd = _command(text, f"{name}:{n}", exported)
        if cmd is not None:
            commands.append(cmd)
        i += 1
    return commands


def _command(text: str, where: str, exported: dict[str, str]) -> Command | None:
    words = shlex.split(text, comments=True)
    if not words:
        return None
    if words[0] == "export":  # environment for the page's later commands
        exported.update(w.split("=", 1) for w in words[1:] if "=" in w)
        return None
    env = dict(exported)
    while words and _ASSIGN.match(words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return Command(where, env, words, []) if words else None


def all_commands() -> list[Command]:
    out = []
    for path in documents():
        with open(path) as f:
            out += parse_commands(f.read(), os.path.relpath(path, ROOT))
    return out


# --- the scratch working directory ----------------------------------------------------

_CHECK_LAYOUT = """
import sys
from megatron_paci.config import format_config, parse_args
from megatron_paci.training.layout import validate_layout
cfg, _ = parse_args(sys.argv[2:])
print(format_config(cfg))
dp = validate_layout(cfg, int(sys.argv[1]))
print(f"layout: {sys.argv[1]} processes, data-parallel size {dp}")
"""
DRY_STANDINS = {
    # torchrun [launcher options] pretrain_gpt.py ARGS: the config it resolves, and the
    # layout checked against --nproc_per_node (what a launch checks before training).
    "torchrun": "n=1\n"
                'while [ $# -gt 0 ] && [[ "$1" != *.py ]]; do\n'
                '  case "$1" in\n'
                '    --nproc_per_node|--nproc-per-node) n=$2; shift 2 ;;\n'
                '    --nproc_per_node=*|--nproc-per-node=*) n=${1#*=}; shift ;;\n'
                "    *) shift ;;\n"
                "  esac\n"
                "done\n"
                f"shift\nexec python -c '{_CHECK_LAYOUT}' \"$n\" \"$@\"\n",
    "srun": 'exec "$@" --print\n',
    "scontrol": "echo localhost\n",
    # sbatch [options] SCRIPT ARGS -> bash SCRIPT ARGS, as one slurm task would
    "sbatch": 'while [[ "$1" == -* ]]; do [[ "$1" == *=* ]] && shift || shift 2; done\n'
              "export SLURM_JOB_ID=4242 SLURM_JOB_NODELIST=localhost SLURM_JOB_NAME=doc_test\n"
              'exec bash "$@"\n',
}


def _write_exe(path: str, body: str) -> None:
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\nset -euo pipefail\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def prepare_workdir(workdir: str) -> None:
    """The repository's runnable top level (scripts copied, so ``cd "$(dirname
    "$0")/.."`` lands here), the packages via PYTHONPATH, and this interpreter as
    python/python3/torchrun."""
    shutil.copytree(os.path.join(ROOT, "scripts"), os.path.join(workdir, "scripts"))
    shutil.copy(os.path.join(ROOT, "pretrain_gpt.py"), workdir)
    os.symlink(os.path.join(ROOT, "configs"), os.path.join(workdir, "configs"))
    os.makedirs(os.path.join(workdir, "data"))
    bin_dir, dry_dir = os.path.join(workdir, ".bin"), os.path.join(workdir, ".bin-dry")
    os.makedirs(bin_dir)
    os.makedirs(dry_dir)
    for name in ("python", "python3"):
        os.symlink(sys.executable, os.path.join(bin_dir, name))
    _write_exe(os.path.join(bin_dir, "torchrun"), 'exec python -m torch.distributed.run "$@"\n')
    for name, body in DRY_STANDINS.items():
        _write_exe(os.path.join(dry_dir, name), body)


def _fresh_run_dir(cmd: Command, rule: Rule, workdir: str) -> None:
    """Remove the run directory a pretrain_gpt.py command would resume from."""
    if "pretrain_gpt.py" not in cmd.argv:
        return
    args = cmd.argv[cmd.argv.index("pretrain_gpt.py") + 1:]
    cwd = os.getcwd()
    os.chdir(workdir)  # config paths (inherit:, --config) are relative to it
    try:
        cfg, _ = parse_args([*args, *rule.args])
    finally:
        os.chdir(cwd)
    shutil.rmtree(os.path.join(workdir, cfg.run.dir), ignore_errors=True)


def run_documented(cmd: Command, rule: Rule, workdir: str):
    if rule.prepare is not None:
        rule.prepare(workdir)
    if rule.mode == "train":
        _fresh_run_dir(cmd, rule, workdir)
    argv = list(cmd.argv) + list(rule.args)
    path = [os.path.join(workdir, ".bin"), os.environ["PATH"]]
    if rule.mode == "dry":
        path.insert(0, os.path.join(workdir, ".bin-dry"))
        if argv[:2] in (["python", "pretrain_gpt.py"], ["python3", "pretrain_gpt.py"]):
            argv.append("--print")
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           **cmd.env, **rule.env, "PATH": os.pathsep.join(path)}
    return run_shell(shlex.join(argv), cwd=workdir, timeout=rule.timeout, env=env)


# --- the tests ------------------------------------------------------------------------


def test_parser_reads_continuations_comments_prompts_and_env():
    page = "\n".join([
        "```bash",
        "export OMP_NUM_THREADS=1          # on a CPU",
        "# a comment line",
        "NPROC=8 DATA=/d \\",
        '    bash scripts/x.sh a=1 --prompt "The history of"   # trailing comment',
        "```",
        "",
        "```",
        "$ python -m tool --flag \\",
        "    value",
        "result line 1",
        "$ echo two",
        "two",
        "```",
        "```",
        "plain output, no prompt: not a command",
        "```",
        "```console",
        "$ ls",
        "```",
    ])
    got = parse_commands(page, "page.md")
    assert [(c.where, c.env, c.argv, c.output) for c in got] == [
        ("page.md:4", {"OMP_NUM_THREADS": "1", "NPROC": "8", "DATA": "/d"},
         ["bash", "scripts/x.sh", "a=1", "--prompt", "The history of"], []),
        ("page.md:9", {"OMP_NUM_THREADS": "1"}, ["python", "-m", "tool", "--flag", "value"],
         ["result line 1"]),
        ("page.md:12", {"OMP_NUM_THREADS": "1"}, ["echo", "two"], ["two"]),
        ("page.md:19", {"OMP_NUM_THREADS": "1"}, ["ls"], []),
    ]


def test_every_documented_command_has_a_rule():
    commands = all_commands()
    assert len(commands) > 20  # the README alone shows more; a parser regression shows here
    missing = [f"{c.where}: {c.text}" for c in commands if rule_for(c.text) is None]
    assert not missing, ("documented commands without a rule in RULES of "
                         f"{os.path.relpath(__file__, ROOT)}:\n" + "\n".join(missing))


@pytest.mark.slow
def test_documented_commands_run(tmp_path):
    workdir = str(tmp_path / "repo")
    os.makedirs(workdir)
    prepare_workdir(workdir)
    seen: dict[tuple, str] = {}
    report, failures = [], []
    start = time.monotonic()
    for cmd in all_commands():
        rule = rule_for(cmd.text)
        assert rule is not None, f"{cmd.where}: no rule for {cmd.text}"
        key = (tuple(cmd.argv), tuple(sorted((k, v) for k, v in cmd.env.items()
                                             if k != "OMP_NUM_THREADS")))
        if rule.mode == "skip" or key in seen:
            report.append(f"{cmd.where:32} {'skip' if rule.mode == 'skip' else 'same':5} "
                          f"{rule.reason or 'as ' + seen[key]}: {cmd.text[:60]}")
            continue
        seen[key] = cmd.where
        t0 = time.monotonic()
        r = run_documented(cmd, rule, workdir)
        took = time.monotonic() - t0
        report.append(f"{cmd.where:32} {rule.mode:5} {took:5.1f} s  {cmd.text[:70]}")
        tail = f"\n--- stdout\n{r.stdout[-1500:]}\n--- stderr\n{r.stderr[-2500:]}"
        if r.returncode != rule.code:
            failures.append(f"{cmd.where}: {cmd.text}\n exit {r.returncode}, expected "
                            f"{rule.code}{tail}")
            continue
        if rule.expect not in r.stdout:
            failures.append(f"{cmd.where}: {cmd.text}\n exit 0 but {rule.expect!r} not "
                            f"printed{tail}")
            continue
        lines = {line.rstrip() for line in (r.stdout + r.stderr).splitlines()}
        absent = [x for x in cmd.output if x.strip() and x.rstrip() not in lines]
        if absent:
            failures.append(f"{cmd.where}: {cmd.text}\n documented output not printed: "
                            f"{absent}{tail}")
    report.append(f"total {time.monotonic() - start:.1f} s")
    print("\n".join(report))
    assert not failures, "\n\n".join(failures)
