"""docs/operations.md's fault table names, for every fault class, the test that holds
it: each named test exists, and the table keeps at least 60 classes."""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_test_the_fault_table_names_exists():
    with open(os.path.join(ROOT, "docs", "operations.md")) as f:
        table = f.read().split("## Fault table", 1)[1]
    rows = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 60
    sources = {}
    for path in glob.glob(os.path.join(ROOT, "tests", "**", "test_*.py"), recursive=True):
        with open(path) as f:
            sources[os.path.basename(path)] = f.read()
    for row in rows:
        # "file.py::test_a, ::test_b": a bare ::name belongs to the last file named.
        current = None
        for file, name in re.findall(r"(?:([\w/]*test_\w+\.py))?::(test_\w+)", row):
            current = os.path.basename(file) if file else current
            assert current in sources, row
            assert f"def {name}(" in sources[current], (current, name)
        assert current is not None, f"no test named in: {row}"
