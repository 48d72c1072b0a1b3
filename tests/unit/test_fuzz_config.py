"""Random YAML files and overrides: the loader succeeds or raises one ConfigError per fault.

Hypothesis draws keys (real, misspelt, random), values of every YAML type, bracket lists,
nesting and raw YAML oddities; whatever it draws, load_config either returns a Config or
raises ConfigError whose every line names the key, file or override at fault. Any other
exception is a bug in the loader, not in the input.
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_paci.config import ConfigError, load_config, parse_args
from megatron_paci.config.loader import all_keys

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# YAML parsing is the slow part: fewer files than override lists.
FUZZ_FILES = settings(FUZZ, max_examples=120)

KEYS = all_keys()
SECTION_NAMES = sorted({k.split(".")[0] for k in KEYS})

# What a line of an error must name: the key, the file, the override or the config.
NAMES = ("config key", "config file", "override", "unknown config key", "config inheritance")


def check_error(e: ConfigError) -> None:
    lines = str(e).splitlines()
    assert lines, "an empty error message"
    for line in lines:
        assert any(n in line for n in NAMES) or any(k in line for k in KEYS), (
            f"an error line that names neither key, file nor override: {line!r}")


def load_or_error(path: str | None, overrides: list[str]):
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        check_error(e)
        return None


# --------------------------------------------------------------------------- strategies

odd_texts = st.sampled_from([
    "", " ", "null", "None", "~", "true", "no", "on", "1", "0", "-1", "1e3", "1e400", "-1e400",
    "nan", "inf", "-inf", ".inf", "0x10", "1_000", "1__0", "3.5", "-0", "[]", "[", "]", "[1,2",
    "[1, [2, 3]]", "[a: b]", "[{a: 1}]", "[*x]", "[&a 1, *a]", "{}", "{a: 1}", "'quoted'",
    '"dq', "a=b", "=", "a\nb", "\t", "\x00", "é", "😀", "[" * 1200 + "]" * 1200, "9" * 400,
    "12345678901234567890123", "!!binary aGk=", "2020-01-01", "[0.7, a, 0.3, b]",
    "[null]", "[true, 1.5]", "!!python/object:os.system ls",
])
values_text = st.one_of(odd_texts, st.text(max_size=20), st.integers().map(str),
                        st.floats(allow_nan=True).map(repr))
real_keys = st.sampled_from(KEYS)
keys = st.one_of(
    real_keys,
    real_keys.map(lambda k: k.upper()),
    real_keys.map(lambda k: k + "x"),
    real_keys.map(lambda k: "--" + k),
    real_keys.map(lambda k: k.replace(".", "..")),
    st.sampled_from(["", ".", "a.b.c", "model.", ".lr", "model . num_layers", "inherit.x"]),
    st.text(max_size=12),
)
overrides = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", keys, values_text),
    st.text(max_size=20),
)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True), st.text(max_size=10), odd_texts,
)
nested = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def section_mapping(draw) -> dict:
    """A top-level mapping of mostly real sections and keys with values of any type."""
    out: dict = {}
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.one_of(st.sampled_from(SECTION_NAMES), st.text(max_size=6),
                                 st.integers(), st.none()))
        if draw(st.booleans()):
            body = {}
            for _ in range(draw(st.integers(0, 4))):
                key = draw(real_keys).split(".")[1] if draw(st.booleans()) else draw(
                    st.one_of(st.text(max_size=8), st.integers(), st.booleans()))
                body[key] = draw(nested)
            out[section] = body
        else:
            out[section] = draw(nested)
    if draw(st.integers(0, 4)) == 0:
        out["inherit"] = draw(st.one_of(nested, st.just("self.yaml"), st.just("missing.yaml"),
                                        st.just(["parent.yaml", "parent.yaml"]),
                                        st.just("."), st.just("")))
    return out


raw_yaml = st.sampled_from([
    b"", b"\n", b"---\n", b"--- \n...\n", b"- a\n- b\n", b"just a string\n", b"42\n", b"null\n",
    b"model:\n\tnum_layers: 2\n", b"model: {num_layers: 2\n", b"model:\n  num_layers: 2\n"
    b"  num_layers: 3\n", b"model: &m {num_layers: 2}\ntrain: *m\n", b"model: *undefined\n",
    b"? [a, b]\n: 1\n", b"\xff\xfe\x00m\x00o", b"model:\n  num_layers: \xff\n",
    b"\xef\xbb\xbfmodel: {num_layers: 2}\n", b"model: {num_layers: !!float 2}\n",
    b"model: !!python/object:os.system {}\n", b"[" * 1200 + b"]" * 1200,
    b"model:\n" + b"  " * 10 + b"x: 1\n", b"a: " + b"[" * 1200 + b"\n", b"model: []\n",
    b"inherit: [1, 2]\n", b"inherit: {a: b}\n", b"inherit: null\n", b"inherit: ''\n",
    b"run: {dir: 2020-01-01}\n", b"run: {name: !!binary aGk=}\n", b"data: {path: {a: 1}}\n",
    b"data: {path: [[a, b], 1]}\n", b"kernels: {overrides: [a, [b]]}\n",
    b"model: {dropout: .nan}\n", b"optim: {lr: .inf}\n", b"model:\n  ? num_layers\n",
])


def _files(draw_bytes: bytes, parent: dict | None) -> tuple[tempfile.TemporaryDirectory, str]:
    tmp = tempfile.TemporaryDirectory()
    d = tmp.name
    path = os.path.join(d, "self.yaml")
    with open(path, "wb") as f:
        f.write(draw_bytes)
    with open(os.path.join(d, "parent.yaml"), "w") as f:
        f.write(yaml.safe_dump(parent if parent is not None else {}))
    return tmp, path


def _dump(obj) -> bytes:
    try:
        return yaml.safe_dump(obj, allow_unicode=True).encode("utf-8", "surrogatepass")
    except (yaml.YAMLError, RecursionError):  # pragma: no cover - hypothesis made no YAML
        return b"{}"


# --------------------------------------------------------------------------- properties


@FUZZ
@given(st.lists(overrides, max_size=5))
def test_random_overrides_succeed_or_name_the_key(texts):
    cfg = load_or_error(None, texts)
    if cfg is not None:
        for t in texts:  # a good override really set its key
            key, value = t.split("=", 1)
            section, name = key.strip().removeprefix("--").split(".")
            assert hasattr(getattr(cfg, section), name)


@FUZZ_FILES
@given(st.one_of(section_mapping().map(_dump), raw_yaml), st.none() | section_mapping(),
       st.lists(overrides, max_size=2))
def test_random_yaml_files_succeed_or_name_the_file_or_key(data, parent, texts):
    tmp, path = _files(data, parent)
    with tmp:
        load_or_error(path, texts)


@FUZZ
@given(st.lists(st.one_of(overrides, st.sampled_from(["--config", "--print", "--", "-x",
                                                       "--config=", "--help=1"])), max_size=4))
def test_command_line_fails_as_argparse_or_config_error(argv):
    # argparse reports its own errors (usage + exit 2); everything past it is a ConfigError.
    try:
        parse_args(argv)
    except SystemExit as e:
        assert e.code in (0, 2)
    except ConfigError as e:
        check_error(e)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
@pytest.mark.parametrize("key", [k for k in KEYS if k.split(".")[1] in (
    "rotary_base", "layernorm_epsilon", "init_std", "adam_eps", "grad_bucket_mb", "timeout_s",
    "exit_duration_mins", "adam_beta1", "adam_beta2")])
def test_float_keys_refuse_values_that_are_not_finite(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])


def test_int_override_keeps_every_digit():
    # Through float, 23 digits would round to ...741440.
    cfg = load_config(None, ["train.seed=12345678901234567890123"])
    assert cfg.train.seed == 12345678901234567890123
    assert not math.isnan(cfg.optim.lr)


@pytest.mark.parametrize("text,needle", [
    (b"inherit: [1, 2]\n", "inherit"), (b"inherit: {a: b}\n", "inherit"),
    (b"model:\n  num_layers: \xff\n", "UTF-8"), (b"[" * 1200 + b"]" * 1200, "nested"),
    (b"model: {num_layers: 2\n", "starts at line 1, column 8"),
], ids=["inherit-list-of-ints", "inherit-mapping", "invalid-utf8", "deep-nesting", "unclosed"])
def test_yaml_oddities_name_the_file(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_bytes(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert str(p) in str(e.value) and needle in str(e.value)
    assert len(str(e.value).splitlines()) == 1, str(e.value)
