"""Monitor / Throughput: real TensorBoard event files read back with EventAccumulator."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from goat_dist.train.monitor import Monitor, Throughput, _short_names, write_json_atomic

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator").EventAccumulator


def _read_events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_scalars_and_expert_load_round_trip(tmp_path):
    log_dir = str(tmp_path / "tb")
    mon = Monitor(log_dir, enabled=True, total_steps=10)
    mon.log_scalars(1, {"train/loss": 2.5, "train/lr": 1e-4, "train/grad_norm": torch.tensor(0.75)})
    mon.advance()
    mon.log_scalars(2, {"train/loss": 2.0, "train/lr": 2e-4, "eval/accuracy": 0.5,
                        "train/grad_norm": None})  # None is skipped
    mon.advance()
    counts = {"base_model.model.layers.0.self_attn.q_proj": torch.tensor([10, 10, 10, 10]),
              "base_model.model.layers.0.mlp.down_proj": torch.tensor([40, 0, 0, 0]),
              "base_model.model.layers.1.self_attn.q_proj": torch.tensor([0, 0, 0, 0])}
    stats = mon.log_expert_load(2, counts)
    mon.close()

    # balanced row: cv 0; one-hot row: std of (1,0,0,0) = sqrt(3)/4, times E=4 -> sqrt(3);
    # the empty row is excluded.
    assert stats["experts/load_cv"] == pytest.approx(math.sqrt(3) / 2)
    assert stats["experts/max_load"] == pytest.approx(4.0)

    acc = _read_events(log_dir)
    tags = acc.Tags()
    loss = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 2.5), (2, 2.0)]
    assert [e.step for e in acc.Scalars("train/lr")] == [1, 2]
    assert acc.Scalars("train/lr")[1].value == pytest.approx(2e-4)
    assert acc.Scalars("train/grad_norm")[0].value == pytest.approx(0.75)
    assert acc.Scalars("eval/accuracy")[0].value == pytest.approx(0.5)
    assert acc.Scalars("experts/load_cv")[0].value == pytest.approx(math.sqrt(3) / 2, rel=1e-6)
    assert acc.Scalars("experts/max_load")[0].step == 2

    assert "experts/load" in tags["images"]
    (img,) = acc.Images("experts/load")
    assert img.step == 2
    assert 100 <= img.width <= 1000 and 100 <= img.height <= 1200
    assert img.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_size_is_bounded_for_many_layers(tmp_path):
    log_dir = str(tmp_path / "tb")
    g = torch.Generator().manual_seed(0)
    counts = {f"model.layers.{i // 7}.m{i % 7}": torch.randint(0, 50, (8,), generator=g)
              for i in range(210)}
    with Monitor(log_dir, enabled=True, total_steps=1) as mon:
        mon.log_expert_load(5, counts)
    (img,) = _read_events(log_dir).Images("experts/load")
    assert img.height <= 1200 and img.width <= 1000


def test_disabled_monitor_writes_nothing(tmp_path, capsys):
    log_dir = tmp_path / "tb"
    mon = Monitor(str(log_dir), enabled=False, total_steps=10)
    mon.log_scalars(1, {"train/loss": 1.0})
    stats = mon.log_expert_load(1, {"a": torch.tensor([1, 3])})
    mon.advance()
    mon.write_summary(str(tmp_path / "summary.json"), {"x": 1})
    mon.close()
    assert stats["experts/max_load"] == pytest.approx(1.5)  # statistics are still returned
    assert list(tmp_path.iterdir()) == []
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_summary_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "run" / "summary.json"
    mon = Monitor(str(tmp_path / "tb"), enabled=True, total_steps=1)
    mon.write_summary(str(path), {"loss": torch.tensor(1.5), "steps": 3, "name": "x"})
    mon.close()
    assert json.loads(path.read_text()) == {"loss": 1.5, "steps": 3, "name": "x"}

    # A failure while writing leaves the previous file intact and no temp file behind.
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_json_atomic(str(path), {"loss": 9.0})
    assert json.loads(path.read_text())["loss"] == 1.5
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]


def test_throughput_uses_the_window_since_reset():
    now = [100.0]
    tp = Throughput(clock=lambda: now[0])
    assert tp.rate() == 0.0
    tp.update(500)
    tp.update(1500)
    now[0] = 102.0
    assert tp.rate() == pytest.approx(1000.0)
    tp.reset()
    tp.update(300)
    now[0] = 103.0
    assert tp.rate() == pytest.approx(300.0)


def test_short_names_are_unique_and_short():
    names = [f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(3)
             for p in ("q_proj", "v_proj")]
    short = _short_names(names)
    assert short[0] == "0.q_proj" and len(set(short)) == len(short)
    assert _short_names(["a.attn.q_proj", "b.attn.q_proj"]) != ["q_proj", "q_proj"]
