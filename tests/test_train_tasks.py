"""The trainer beyond causal LM on ZeRO-0: sequence classification (BERT, RoBERTa), bf16, the
real deepspeed launcher, and the embedded demo config."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.train_helpers import (DEMO_DATA, ROOT, free_port, losses, read_summary, run_train,
                                 tiny_config)

ZERO2 = os.path.join(ROOT, "ds_configs", "zero2.json")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def boolq_csv(tmp_path_factory):
    """The demo's BoolQ questions as a CSV classification set (text, label true/false)."""
    with open(os.path.join(DEMO_DATA, "train.json")) as f:
        recs = json.load(f)
    rows = [{"text": r["instruction"].split("question:")[-1].split("\n")[0].strip(),
             "label": r["answer"]} for r in recs if r["answer"] in ("true", "false")]
    path = tmp_path_factory.mktemp("cls") / "boolq.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return str(path)


def _cls_config(path, out, csv_path, preset="tiny-bert", **train):
    cfg = {"model": {"preset": preset, "task": "seq_cls", "vocab_size": 256},
           "data": {"train_file": csv_path, "format": "classification", "max_length": 64,
                    "eval_fraction": 0.2},
           "goat": {"r": 8, "lora_alpha": 16, "num_experts": 4, "top_k": 2, "lora_dropout": 0.0},
           "optim": {"lr": 5.0e-3, "warmup_steps": 1},
           "train": {"output_dir": out, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
                     "max_steps": 4, "seed": 0, "log_every": 1, "bf16": False, **train}}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def test_classification_two_ranks_match_one_process_and_head_is_exported(tmp_path, boolq_csv):
    one = _cls_config(tmp_path / "one.yaml", str(tmp_path / "one"), boolq_csv,
                      gradient_accumulation_steps=4)
    two = _cls_config(tmp_path / "two.yaml", str(tmp_path / "two"), boolq_csv)
    assert run_train(["--config", one]) == 0
    assert run_train(["--config", two, "--ds_config", ZERO2], world=2) == 0
    assert losses(str(tmp_path / "two")) == pytest.approx(losses(str(tmp_path / "one")), abs=1e-4)
    s = read_summary(str(tmp_path / "two"))
    assert 0.0 <= s["final_metrics"]["eval/accuracy"] <= 1.0

    # the adapter carries the trained head and reproduces eval accuracy/loss in one process
    from goat_dist.adapter_io import load_adapter
    from goat_dist.train.config import load_run_config
    from goat_dist.train.data import collate, prepare_data
    from goat_dist.train.modeling import build_preset
    from goat_dist.train.tokenizer import load_tokenizer
    out = str(tmp_path / "two")
    run = load_run_config(two)
    tok = load_tokenizer(os.path.join(out, "tokenizer"))
    data = prepare_data(run.data, tok, "seq_cls", 0)
    model = build_preset("tiny-bert", len(tok), num_labels=data.num_labels, seed=0,
                         pad_token_id=tok.pad_token_id)
    head_before = model.classifier.weight.detach().clone()
    goat = load_adapter(model, os.path.join(out, "adapter")).eval()
    assert not torch.equal(goat.model.classifier.weight, head_before)
    b = collate([data.eval[i] for i in range(len(data.eval))], tok.pad_token_id)
    with torch.no_grad():
        logits = goat(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    acc = (logits.argmax(-1) == b["labels"]).float().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, b["labels"]).item()
    assert acc == pytest.approx(s["final_metrics"]["eval/accuracy"], abs=1e-6)
    assert loss == pytest.approx(s["final_metrics"]["eval/loss"], rel=1e-5)


def test_roberta_classification_trains(tmp_path, boolq_csv):
    cfg = _cls_config(tmp_path / "r.yaml", str(tmp_path / "r"), boolq_csv, preset="tiny-roberta")
    assert run_train(["--config", cfg]) == 0
    s = read_summary(str(tmp_path / "r"))
    assert s["finished"] and all(torch.isfinite(torch.tensor(h["loss"])) for h in s["history"])


def test_bf16_trains_close_to_fp32(tmp_path):
    """bf16 (DeepSpeed casts the model, fp32 masters in the optimizer) on 2 ranks, ZeRO-2."""
    fp32 = tiny_config(str(tmp_path / "a.yaml"), str(tmp_path / "fp32"))
    bf16 = tiny_config(str(tmp_path / "b.yaml"), str(tmp_path / "bf16"), train={"bf16": True})
    assert run_train(["--config", fp32, "--ds_config", ZERO2], world=2) == 0
    assert run_train(["--config", bf16, "--ds_config", ZERO2], world=2) == 0
    assert read_summary(str(tmp_path / "bf16"))["bf16"] is True
    assert losses(str(tmp_path / "bf16")) == pytest.approx(losses(str(tmp_path / "fp32")), abs=2e-2)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def test_deepspeed_launcher_runs_two_ranks(tmp_path):
    """The real `deepspeed --num_accelerators 2` CLI with ZeRO-3, as users launch it."""
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "run.yaml"), out, train={"max_steps": 2})
    ds = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    res = subprocess.run([ds, "--num_accelerators", "2", "--master_port", str(free_port()),
                          os.path.join(ROOT, "launch", "train.py"), "--config", cfg,
                          "--ds_config", os.path.join(ROOT, "ds_configs", "zero3.json")],
                         env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    s = read_summary(out)
    assert s["world_size"] == 2 and s["zero_stage"] == 3 and s["finished"]


def test_demo_config_runs(tmp_path):
    """`python launch/train.py` with no config runs the embedded demo (shortened here)."""
    out = str(tmp_path / "demo")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"),
                          "--output_dir", out, "train.max_steps=2", "train.eval_every=0",
                          "train.save_every=0", "data.max_eval_samples=8"],
                         env=_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "finished at step 2/2" in res.stdout
    for sub in ("adapter/adapter_model.safetensors", "checkpoints/latest.json", "summary.json",
                "tokenizer/tokenizer.model"):
        assert os.path.exists(os.path.join(out, sub)), sub
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tensorboard")))
