import textwrap

import pytest

from megatron_paci.config import ConfigError, load_config
from megatron_paci.config.__main__ import main as config_main
from megatron_paci.config.loader import all_keys, coerce

REQUIRED_KEYS = [
    "model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.seq_length",
    "model.dropout", "data.path", "data.tokenizer", "train.iters", "train.micro_batch_size",
    "train.global_batch_size", "train.seed", "optim.lr", "parallel.tensor",
    "parallel.pipeline", "pipeline.schedule", "checkpoint.interval", "run.dir",
]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_required_keys_exist():
    keys = set(all_keys())
    assert [k for k in REQUIRED_KEYS if k not in keys] == []


def test_inheritance_and_override_order(tmp_path):
    write(tmp_path, "base.yaml", """
        model: {num_layers: 6, hidden_size: 64, num_attention_heads: 4}
        optim: {lr: 0.1}
    """)
    child = write(tmp_path, "child.yaml", """
        inherit: base.yaml
        model: {num_layers: 2}
    """)
    cfg = load_config(child, ["optim.lr=3e-4", "model.hidden_size=32"])
    assert cfg.model.num_layers == 2  # child over base
    assert cfg.model.num_attention_heads == 4  # kept from base
    assert cfg.optim.lr == pytest.approx(3e-4)  # command line over both
    assert cfg.model.hidden_size == 32


@pytest.mark.parametrize(
    "text,tp,expected",
    [
        ("true", bool, True), ("False", bool, False), ("0", bool, False),
        ("12", int, 12), ("1e3", int, 1000), ("2.5", float, 2.5), ("7", float, 7.0),
        ("[1,2,3]", list[int], [1, 2, 3]), ("null", int | None, None),
        ("[0.7, a, 0.3, b]", list, [0.7, "a", 0.3, "b"]), ("x/y", list, ["x/y"]),
    ],
)
def test_values_parsed_by_field_type(text, tp, expected):
    from typing import Any

    tp = list[Any] if tp is list else tp
    assert coerce("k", text, tp) == expected


def test_weighted_data_path_override():
    cfg = load_config(None, ["data.path=[0.7,/d/a,0.3,/d/b]"])
    assert cfg.data.path == [0.7, "/d/a", 0.3, "/d/b"]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optim.lrr=1", "did you mean optim.lr"),
        ("train.lr=1", "optim.lr"),
        ("modle.num_layers=2", "model.num_layers"),
    ],
)
def test_unknown_key_names_closest(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert override.split("=")[0] in str(e.value) and needle in str(e.value)


def test_unknown_key_in_file_names_file(tmp_path):
    path = write(tmp_path, "bad.yaml", "train: {itres: 3}\n")
    with pytest.raises(ConfigError, match=r"train\.itres.*bad\.yaml.*train\.iters"):
        load_config(path)


def test_every_bad_key_and_value_of_one_load_is_reported_together(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lr=1", "optim.lr=fast", "notakey", "train.iters=5",
                           "modle.num_layers=2"])
    lines = str(e.value).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("unknown config key 'train.lr' on the command line")
    assert lines[1] == "config key 'optim.lr': expected float, got 'fast'"
    assert lines[2] == "override 'notakey' must look like section.key=value"
    assert lines[3].startswith("unknown config key 'modle.num_layers'")
    path = write(tmp_path, "bad.yaml", "train: {itres: 3, iters: x}\nmodle: {a: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    lines = str(e.value).splitlines()
    assert [x.split("'")[1] for x in lines] == ["train.itres", "modle"]  # keys before values


def test_value_checks_between_fields_wait_for_good_fields():
    # a bad type is reported alone, not also as the divisibility it breaks
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.hidden_size=abc"])
    assert str(e.value) == "config key 'model.hidden_size': expected int, got 'abc'"


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optim.lr=fast", "optim.lr"),
        ("train.iters=1.5", "train.iters"),
        ("model.tie_embeddings=maybe", "model.tie_embeddings"),
        ("model.hidden_size=100", "num_attention_heads"),
        ("train.global_batch_size=10", "micro_batch_size"),
        ("model.max_position_embeddings=64", "seq_length"),
        ("notakey", "section.key=value"),
    ],
)
def test_bad_values_fail_with_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    a = write(tmp_path, "a.yaml", "inherit: b.yaml\n")
    write(tmp_path, "b.yaml", "inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)


def test_print_command(capsys):
    assert config_main(["--config", "configs/tiny.yaml", "model.num_layers=3", "--print"]) == 0
    out = capsys.readouterr().out
    import yaml

    printed = yaml.safe_load(out)
    assert printed["model"]["num_layers"] == 3
    assert printed["logging"]["interval"] == 10  # inherited from base.yaml
    assert config_main(["optim.nope=1"]) == 2


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=inf", "'optim.lr' must be a finite number > 0, got inf"),
    ("optim.lr=nan", "'optim.lr' must be a finite number > 0, got nan"),
    ("optim.lr=0", "'optim.lr' must be a finite number > 0"),
    ("optim.lr=-1e-3", "'optim.lr' must be a finite number > 0"),
    ("optim.clip_grad=nan", "'optim.clip_grad' must be a finite number >= 0"),
    ("optim.weight_decay=-0.1", "'optim.weight_decay' must be a finite number >= 0"),
    ("model.make_vocab_size_divisible_by=0", "'model.make_vocab_size_divisible_by' must be"),
    ("data.path=[x", "'data.path': cannot read the list '[x'"),
    ("train.loss_spike_factor=1", "'train.loss_spike_factor' must be 0 (off) or a finite"),
    ("train.loss_spike_factor=inf", "'train.loss_spike_factor' must be"),
    ("train.max_consecutive_skips=-1", "'train.max_consecutive_skips' must be >= 0"),
    ("model.recompute=ful", "'model.recompute': expected one of none, full, selective, got"),
    ("pipeline.layers_per_stage=even", "expected list[int] (e.g. [3, 1]) or auto, got 'even'"),
])
def test_numbers_and_lists_that_cannot_train_are_refused_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
