"""YAML loading with inheritance, ``section.key=value`` overrides, and type checks.

All errors are raised before any work starts and name the file or key at fault;
an unknown key lists the closest valid ones, since a typo in a launch script is
the most common way a long job goes wrong.
"""

from __future__ import annotations

import difflib
import math
import os
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml

from megatron_paci.config.schema import SECTIONS, Config

INHERIT_KEY = "inherit"


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message says which and why."""


def _section_types(section: str) -> dict[str, Any]:
    cls = type(getattr(Config(), section))
    return typing.get_type_hints(cls)


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _section_types(s)]


def _suggest(key: str) -> str:
    # The same field name in another section is a common slip (train.lr for optim.lr).
    leaf = key.rsplit(".", 1)[-1]
    close = [k for k in all_keys() if k.endswith("." + leaf)]
    close += [k for k in difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.5)
              if k not in close]
    close = close[:3]
    return f"; did you mean {', '.join(close)}?" if close else ""


def _unknown_key(key: str, where: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}{where}{_suggest(key)}")


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _words(tp: Any) -> tuple[tuple[str, ...], Any]:
    """A ``T | Literal["a", ...] | None`` field's words and the type without them (None
    for a plain ``Literal``). Words are matched before the null spellings: ``none`` can
    be one."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp), None
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return (), tp
    args = typing.get_args(tp)
    words = tuple(w for a in args if typing.get_origin(a) is typing.Literal
                  for w in typing.get_args(a))
    rest = [a for a in args if typing.get_origin(a) is not typing.Literal]
    union = rest[0]
    for a in rest[1:]:
        union = union | a
    return words, union


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to field type ``tp``."""
    words, tp = _words(tp)
    if words:
        if isinstance(value, str) and value.strip().lower() in words:
            return value.strip().lower()
        if tp is None:
            raise ConfigError(f"config key '{key}': expected one of {', '.join(words)}, got "
                              f"{value!r}")
        try:
            return coerce(key, value, tp)
        except ConfigError:
            if isinstance(value, str) and not value.strip().startswith("["):
                shown = str(_is_optional(tp)[1]).replace("typing.", "")  # list[int]
                raise ConfigError(f"config key '{key}': expected {shown} (e.g. [3, 1]) or "
                                  f"{' or '.join(words)}, got {value!r}") from None
            raise
    optional, inner = _is_optional(tp)
    if isinstance(value, str) and value.strip().lower() in ("null", "none", "~"):
        if optional:
            return None
        raise ConfigError(f"config key '{key}' cannot be null (expected {_type_name(inner)})")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' cannot be null (expected {_type_name(inner)})")
    bad = ConfigError(f"config key '{key}': expected {_type_name(inner)}, got {value!r}")
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if inner is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:  # int first: through float, digits past the 16th would be lost
                return int(value.strip())
            except ValueError:
                pass
            try:
                f = float(value)
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
        raise bad
    if inner is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if typing.get_origin(inner) is list:
        (elem,) = typing.get_args(inner) or (Any,)
        if isinstance(value, str):
            text = value.strip()
            try:
                value = yaml.safe_load(text) if text.startswith("[") else [text]
            except (yaml.YAMLError, RecursionError):
                raise ConfigError(f"config key '{key}': cannot read the list {text!r}; write "
                                  "it as [a,b,c]") from None
        if not isinstance(value, list):
            value = [value]
        if elem is Any:
            for i, v in enumerate(value):
                if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                    raise ConfigError(f"config key '{key}[{i}]': expected a string or a "
                                      f"number, got {v!r}")
            return list(value)
        return [coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")  # pragma: no cover


def _shown(path: str) -> str:
    """A path as printed: quoted when it holds characters that would break the line."""
    return path if path.isprintable() else repr(path)


def _read_yaml(path: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read one YAML file and merge it over the file named by its ``inherit`` key."""
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f"config inheritance cycle: {' -> '.join(map(_shown, chain + (path,)))}")
    raw = _parse_yaml_file(path)
    parent = raw.pop(INHERIT_KEY, None)
    merged: dict[str, Any] = {}
    if parent:
        parents = parent if isinstance(parent, list) else [parent]
        if not all(isinstance(p, str) and p for p in parents):
            raise ConfigError(f"config file {_shown(path)}: '{INHERIT_KEY}' must be a file "
                              f"name or a list of file names, got {parent!r}")
        for p in parents:
            p = p if os.path.isabs(p) else os.path.join(os.path.dirname(path), p)
            _deep_merge(merged, _read_yaml(p, chain + (path,)))
    errors: list[str] = []
    for section, values in list(raw.items()):
        if section not in SECTIONS:
            errors.append(str(_unknown_key(str(section), f" in {_shown(path)}")))
            del raw[section]
        elif not isinstance(values, dict):
            errors.append(f"config file {_shown(path)}: section '{section}' must be a mapping")
            del raw[section]
        else:
            errors += [str(_unknown_key(f"{section}.{k}", f" in {_shown(path)}"))
                       for k in values if k not in _section_types(section)]
    if errors:
        raise ConfigError("\n".join(errors))
    _deep_merge(merged, raw)
    return merged


def _yaml_where(e: yaml.MarkedYAMLError) -> str:
    """PyYAML's several-line report as one line: where, what, and inside what."""
    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""

    problem = " ".join(str(e.problem or "").split())
    context = " ".join(str(e.context or "").split())
    out = f" at {at(e.problem_mark)}" if e.problem_mark else ""
    out += f": {problem}" if problem else ""
    if context:
        out += f" ({context}{' that starts at ' + at(e.context_mark) if e.context_mark else ''})"
    return out


def _parse_yaml_file(path: str) -> dict[str, Any]:
    """The file's top-level mapping; every way it can fail is one line naming the file."""
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {_shown(path)}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {_shown(path)} is not a file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"config file {_shown(path)} cannot be read: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"config file {_shown(path)}: line {line} is not valid UTF-8 (byte "
                          f"{data[e.start]:#04x}); expected UTF-8 text") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        raise ConfigError(f"config file {_shown(path)} is not valid YAML{_yaml_where(e)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {_shown(path)} is not valid YAML: "
                          f"{' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"config file {_shown(path)}: YAML nested too deeply to read") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {_shown(path)}: expected a mapping of sections at top "
                          f"level, got {type(raw).__name__}")
    return raw


def _deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    key = key.strip().removeprefix("--")
    if key.count(".") != 1:
        raise ConfigError(f"override {text!r}: key must be section.key, e.g. optim.lr=3e-4")
    return key, value


def set_value(cfg: Config, key: str, value: Any, where: str = "") -> None:
    section, name = key.split(".", 1)
    if section not in SECTIONS or name not in _section_types(section):
        raise _unknown_key(key, where)
    setattr(getattr(cfg, section), name, coerce(key, value, _section_types(section)[name]))


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file (with its ``inherit`` chain) <- ``section.key=value`` overrides."""
    cfg = Config()
    # Every bad key and value of one launch is reported at once: a relaunch per typo
    # costs a queue wait on a cluster. Checks between fields run once each field is good.
    errors: list[str] = []

    def collect(fn, *args) -> None:
        try:
            fn(*args)
        except ConfigError as e:
            errors.append(str(e))

    if path:
        for section, values in _read_yaml(path).items():
            for k, v in values.items():
                collect(set_value, cfg, f"{section}.{k}", v, f" in {_shown(path)}")
    for text in overrides:
        collect(lambda t: set_value(cfg, *parse_override(t), " on the command line"), text)
    if errors:
        raise ConfigError("\n".join(errors))
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, dict[str, Any]]) -> Config:
    cfg = Config()
    for section, values in data.items():
        for k, v in values.items():
            set_value(cfg, f"{section}.{k}", v)
    return cfg


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"config key '{key}': '{value}' is not one of {', '.join(choices)}")


def validate(cfg: Config) -> None:
    """Checks between fields that a single type cannot express."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    for key, low in (("model.rotary_base", 1.0), ("model.layernorm_epsilon", 0.0),
                     ("optim.adam_eps", 0.0), ("optim.grad_bucket_mb", 0.0),
                     ("parallel.timeout_s", 0.0)):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= low:
            raise ConfigError(f"config key '{key}' must be > {low:g}, got "
                              f"{getattr(getattr(cfg, section), name)}")
    for key in ("optim.adam_beta1", "optim.adam_beta2"):
        v = getattr(o, key.split(".")[1])
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"config key '{key}' must be in [0, 1), got {v}")
    for key in ("model.init_std", "train.exit_duration_mins", "data.num_workers",
                "data.prefetch"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got "
                              f"{getattr(getattr(cfg, section), name)}")
    for key, low in (("model.ffn_hidden_size", 1), ("model.max_position_embeddings", 1),
                     ("model.vocab_size", 1), ("optim.lr_decay_iters", 0)):
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if v is not None and v < low:
            raise ConfigError(f"config key '{key}' must be >= {low} or null, got {v}")
    for key in ("model.num_layers", "model.hidden_size", "model.num_attention_heads",
                "model.seq_length", "train.micro_batch_size", "train.global_batch_size",
                "parallel.tensor", "parallel.pipeline", "parallel.virtual_pipeline",
                "logging.interval"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"config key '{key}' must be >= 1")
    for key in ("train.iters", "checkpoint.interval", "train.eval_interval", "train.eval_iters",
                "train.exit_interval", "train.exit_check_interval", "train.sample_tokens",
                "checkpoint.keep_last", "train.max_consecutive_skips"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by "
            f"model.num_attention_heads={m.num_attention_heads}"
        )
    if m.max_position_embeddings is not None and m.seq_length > m.max_position_embeddings:
        raise ConfigError(
            f"model.seq_length={m.seq_length} exceeds model.max_position_embeddings="
            f"{m.max_position_embeddings}"
        )
    if m.position_embedding == "rope" and (m.hidden_size // m.num_attention_heads) % 2:
        raise ConfigError("model.position_embedding=rope needs an even head dimension")
    for key in ("model.dropout", "model.attention_dropout"):
        v = getattr(m, key.split(".")[1])
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"config key '{key}' must be in [0, 1), got {v}")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    _choice("model.position_embedding", m.position_embedding, ("learned", "rope"))
    _choice("optim.lr_decay_style", o.lr_decay_style, ("cosine", "linear", "constant"))
    _choice("train.precision", t.precision, ("auto", "fp32", "bf16"))
    _choice("train.device", t.device, ("auto", "cpu", "cuda"))
    _choice("kernels.backend", cfg.kernels.backend, ("auto", "triton", "torch", "apex"))
    _choice("checkpoint.untied_head", cfg.checkpoint.untied_head,
            ("refuse", "use_embedding", "use_head"))
    if not math.isfinite(o.lr) or o.lr <= 0:
        raise ConfigError(f"config key 'optim.lr' must be a finite number > 0, got {o.lr}")
    for key in ("optim.min_lr", "optim.weight_decay", "optim.clip_grad"):
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name, 0.0)
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"config key '{key}' must be a finite number >= 0, got {v}")
    f = t.loss_spike_factor
    if not math.isfinite(f) or (f != 0 and f <= 1):
        raise ConfigError("config key 'train.loss_spike_factor' must be 0 (off) or a finite "
                          f"number > 1, got {f}")
    if m.make_vocab_size_divisible_by < 1:
        raise ConfigError("config key 'model.make_vocab_size_divisible_by' must be >= 1, got "
                          f"{m.make_vocab_size_divisible_by}")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}")
    if o.lr_warmup_iters < 0 or o.clip_grad < 0:
        raise ConfigError("optim.lr_warmup_iters and optim.clip_grad must be >= 0")
    for key in all_keys():  # nan and inf pass the range checks above unnoticed
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config key '{key}' must be a finite number, got {v}")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)


def format_config(cfg: Config) -> str:
    """Megatron-style aligned listing, one ``section.key ..... value`` per line."""
    rows = [(f"{s}.{k}", v) for s, d in cfg.to_dict().items() for k, v in d.items()]
    width = max(len(k) for k, _ in rows) + 2
    lines = ["------------------------ arguments ------------------------"]
    lines += [f"  {k} {'.' * (width - len(k))} {v}" for k, v in rows]
    lines.append("-------------------- end of arguments ---------------------")
    return "\n".join(lines)


