"""Strict input: numbers in every form people type them (overrides and YAML alike), refused
non-finite / out-of-range / mistyped values, and record fields of the wrong type."""

from __future__ import annotations

import json
import math

import pytest

from goat_dist.train.config import ConfigError, RunConfig, load_run_config
from goat_dist.train.data import DataError, load_splits

BASE = ["model.preset=tiny-llama", "data.train_file=x.json"]


@pytest.mark.parametrize("text, value", [
    ("1e-4", 1e-4), ("1E-4", 1e-4), ("2.5e3", 2500.0), ("1.0e12", 1.0e12), (".5", 0.5),
    ("+3", 3.0), ("2", 2.0), ("1.5E+2", 150.0)])
def test_numbers_as_typed_are_accepted_in_overrides_and_yaml(tmp_path, text, value):
    assert load_run_config(None, BASE + [f"optim.lr={text}"]).optim.lr == value
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{preset: tiny-llama}}\ndata: {{train_file: x.json}}\n"
                    f"optim: {{lr: {text}}}\n")
    cfg = load_run_config(str(path))
    assert cfg.optim.lr == value and isinstance(cfg.optim.lr, float)


def test_whole_numbers_for_int_fields_and_text_for_string_fields():
    cfg = load_run_config(None, BASE + ["train.max_steps=1e3", "train.output_dir=2024",
                                        "goat.lora_alpha=3.2e1", "optim.betas=[0.9, 9.5e-1]"])
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.output_dir == "2024"
    assert cfg.goat.lora_alpha == 32.0
    assert cfg.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=.nan", "optim.lr=nan must be a finite number"),
    ("optim.lr=.inf", "must be a finite number"),
    ("optim.lr=-.inf", "must be a finite number"),
    ("optim.lr=nan", "must be a number"),
    ("optim.lr=1e400", "must be a finite number"),
    ("optim.lr=0", "optim.lr=0.0 is out of range: it must be > 0.0"),
    ("optim.lr=fast", "must be a number"),
    ("optim.eps=-1e-8", "optim.eps"),
    ("optim.betas=[0.9, 1.0]", "optim.betas"),
    ("optim.betas=[0.9]", "list of 2 values"),
    ("optim.warmup_ratio=1", "optim.warmup_ratio"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
    ("train.max_steps=2.5", "must be a whole number"),
    ("train.max_steps=true", "must be a number"),
    ("train.max_steps=-1", "train.max_steps"),
    ("train.seed=-3", "train.seed"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.max_skipped_steps=0", "train.max_skipped_steps"),
    ("train.dist_timeout_s=0", "train.dist_timeout_s"),
    ("train.dist_timeout_s=.nan", "train.dist_timeout_s"),
    ("train.overwrite_output_dir=2", "must be true or false"),
    ("data.eval_fraction=1", "data.eval_fraction"),
    ("data.max_length=[unclosed", "cannot be parsed"),
    ("model.vocab_size=8", "model.vocab_size"),
    ("goat.init_cof=.inf", "goat.init_cof"),
])
def test_bad_numbers_are_refused_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, BASE + [override])
    assert needle in str(e.value), str(e.value)
    assert override.split("=")[0] in str(e.value)


def test_yaml_types_are_checked(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: tiny-llama}\ndata: {train_file: x.json}\n"
                    "train: {output_dir: 12, max_steps: .nan}\n")
    with pytest.raises(ConfigError, match="train.output_dir=12 must be a string"):
        load_run_config(str(path))


def test_every_numeric_field_has_a_range_or_is_checked_finite():
    """A numeric field added later is still checked finite; this lists the ones without a range
    so adding one is a conscious decision."""
    import dataclasses
    import typing
    from goat_dist.train.config import _RANGES, _SECTIONS
    unranged = []
    for name, cls in _SECTIONS.items():
        if name == "goat":
            continue        # GoatConfig validates its own fields
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            numeric = any(h in (int, float) for h in typing.get_args(hint) or (hint,))
            if numeric and f"{name}.{f.name}" not in _RANGES:
                unranged.append(f"{name}.{f.name}")
    assert unranged == [], unranged
    assert math.isfinite(RunConfig().train.dist_timeout_s)


# ----------------------------------------------------------------------------- records
def _data_cfg(path, **kw):
    from goat_dist.train.config import DataConfig
    return DataConfig(train_file=str(path), eval_fraction=0.0, **kw)


@pytest.mark.parametrize("bad, needle", [
    ({"instruction": 5, "output": "x"}, "record 1 has field 'instruction' = '5' of type int"),
    ({"instruction": "i", "output": ["x"]}, "record 1 has field 'output'"),
    ({"instruction": "i", "output": None}, "record 1 has no value for field 'output'"),
    ({"instruction": "i", "input": 3, "output": "x"}, "record 1 has field 'input'"),
    ({"instruction": "i", "output": "x", "answer": ["a"]}, "record 1 has field 'answer'"),
    ({"instruction": True, "output": "x"}, "record 1 has field 'instruction'"),
])
def test_mistyped_record_fields_name_file_record_and_field(tmp_path, bad, needle):
    good = {"instruction": "i", "input": "", "output": "o", "answer": "o"}
    for suffix, write in ((".json", lambda rs: json.dumps(rs)),
                          (".jsonl", lambda rs: "\n".join(json.dumps(r) for r in rs))):
        path = tmp_path / f"data{suffix}"
        path.write_text(write([good, bad, good]))
        with pytest.raises(DataError) as e:
            load_splits(_data_cfg(path), "causal_lm", 0)
        assert str(path) in str(e.value) and needle in str(e.value), str(e.value)
        assert "data.skip_bad_records=true" in str(e.value)


def test_skip_bad_records_skips_and_counts(tmp_path):
    path = tmp_path / "data.json"
    rows = [{"instruction": "a", "output": "b"}, {"instruction": 1, "output": "b"},
            {"instruction": "c", "output": ["d"]}, {"instruction": "e", "output": "f"},
            {"instruction": "g", "input": None, "output": "h"}]   # null input = no input
    path.write_text(json.dumps(rows))
    splits = load_splits(_data_cfg(path, skip_bad_records=True), "causal_lm", 0)
    assert splits.skipped_bad_records == 2
    assert [r["instruction"] for r in splits.train] == ["a", "e", "g"]


def test_classification_text_must_be_text(tmp_path):
    path = tmp_path / "cls.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "a", "label": 0},
                                                        {"text": {"k": 1}, "label": 1}]))
    from goat_dist.train.config import DataConfig
    cfg = DataConfig(train_file=str(path), eval_fraction=0.0, format="classification")
    with pytest.raises(DataError, match="record 1 has field 'text'"):
        load_splits(cfg, "seq_cls", 0)
