"""Every command-line tool, given one bad input, exits non-zero with one ``error:`` line.

The data and config tools run as ``python -m TOOL``, all at once. The five that import
torch (seconds each) run as ``__main__`` one after another in one more process, through
runpy as ``python -m`` does, so the import is paid once. pretrain_gpt.py's bad launches
are in test_bad_input.py.
"""

import json
import os
import subprocess
import sys

from conftest import ROOT

TORCH_TOOLS = ("megatron_paci.training.generate", "megatron_paci.pipeline.simulate",
               "megatron_paci.checkpoint.inspect", "megatron_paci.checkpoint.export_hf",
               "megatron_paci.checkpoint.import_hf")

# Runs each tool as __main__ with its argv; prints {tool: [exit code, stderr]} as JSON.
RUN_AS_MAIN = """
import contextlib, io, json, runpy, sys, traceback
report = {}
for tool, args in json.loads(sys.argv[1]).items():
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        sys.argv = [tool, *args]
        try:
            runpy.run_module(tool, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    report[tool] = [code, err.getvalue()]
print(json.dumps(report))
"""


def test_each_tool_reports_one_error_line_and_no_traceback(tmp_path):
    bad_utf8 = tmp_path / "bad.jsonl"
    bad_utf8.write_bytes(b'{"text": "1 2"}\n{"text": "3 \xff"}\n')
    no_key = tmp_path / "nokey.jsonl"
    no_key.write_text('{"body": "some text"}\n')
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("inherit: [1]\n")
    missing = str(tmp_path / "missing")
    cases = {  # tool: (arguments, what the error line must name)
        "data_prep.preprocess": (["--input", str(bad_utf8), "--tokenizer", "null:10",
                                  "--output-prefix", str(tmp_path / "out")],
                                 f"{bad_utf8}:2: not valid UTF-8"),
        "data_prep.train_tokenizer": (["--input", str(no_key), "--vocab-size", "300",
                                       "--output", str(tmp_path / "tok")],
                                      f"{no_key}:1: no 'text' key"),
        "data_prep.build_corpus": (["--output", str(tmp_path / "c"), "--max-mb", "nan"],
                                   "--max-mb"),
        "megatron_paci.config": (["--config", str(bad_yaml)], f"{bad_yaml}: 'inherit'"),
        "megatron_paci.training.generate": (["--run-dir", missing], missing),
        "megatron_paci.pipeline.simulate": (["--stages", "0", "--no-plot"], "--stages"),
        "megatron_paci.checkpoint.inspect": ([missing], missing),
        "megatron_paci.checkpoint.export_hf": (["--checkpoint", missing, "--output",
                                                str(tmp_path / "hf")], missing),
        "megatron_paci.checkpoint.import_hf": (["--model", missing, "--output",
                                                str(tmp_path / "run")], missing),
    }
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=ROOT,
               TOKENIZERS_PARALLELISM="false")
    popen = dict(cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = {tool: subprocess.Popen([sys.executable, "-m", tool, *args], **popen)
             for tool, (args, _) in cases.items() if tool not in TORCH_TOOLS}
    together = subprocess.Popen(
        [sys.executable, "-W", "ignore::RuntimeWarning", "-c", RUN_AS_MAIN,
         json.dumps({t: cases[t][0] for t in TORCH_TOOLS})], **popen)
    results = {}
    for tool, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        results[tool] = (proc.returncode, err)
    out, err = together.communicate(timeout=300)
    assert together.returncode == 0, err
    results.update({t: tuple(r) for t, r in json.loads(out.strip().splitlines()[-1]).items()})
    assert sorted(results) == sorted(cases)
    failures = []
    for tool, (code, err) in results.items():
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        needle = cases[tool][1]
        if code == 0 or "Traceback" in err or len(errors) != 1 or needle not in errors[0]:
            failures.append(f"{tool}: exit {code}, stderr:\n{err}")
    assert not failures, "\n".join(failures)
    # Nothing written that looks like output.
    assert not [n for n in os.listdir(tmp_path) if n.startswith(("out.", "tok."))]
    assert not os.path.exists(tmp_path / "hf") and not os.path.exists(tmp_path / "run")
