"""launch/evaluate.py end to end: bad input, base + adapter after training == the trainer's own
in-process numbers, and two ranks == one."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from goat_dist.eval.cli import main
from tests.eval_helpers import build_tiny_model_folder, demo, run_eval_ranks
from tests.train_helpers import DEMO_DATA, read_summary, run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return build_tiny_model_folder(str(tmp_path_factory.mktemp("tiny_llama")))


def _data_dir(path, records: list[dict], source: str = "ARC-Easy") -> str:
    os.makedirs(os.path.join(path, source), exist_ok=True)
    with open(os.path.join(path, source, "test.json"), "w") as f:
        json.dump(records, f)
    return str(path)


@pytest.fixture()
def kept_output(tmp_path):
    """An output folder holding an earlier result that bad input must leave intact."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval_results.json").write_text('{"earlier": true}\n')
    return out


def _bad(argv, kept_output, capsys, match):
    rc = main(argv + ["--output_dir", str(kept_output)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("goat_dist: error:")]
    assert len(lines) == 1 and match in lines[0], err
    assert (kept_output / "eval_results.json").read_text() == '{"earlier": true}\n'
    assert sorted(os.listdir(kept_output)) == ["eval_results.json"]


def test_bad_input_one_message_exit_2_nothing_written(tmp_path, tiny_folder, kept_output, capsys):
    _bad(["--model", str(tmp_path / "nope"), "--tasks", "cs_arc_easy"], kept_output, capsys,
         "does not exist")
    _bad(["--model", tiny_folder, "--tasks", "arc_easy"], kept_output, capsys, "unknown task 'arc_easy'")
    empty = _data_dir(tmp_path / "empty", [])
    _bad(["--model", tiny_folder, "--tasks", "cs_arc_easy", "--data_dir", empty], kept_output, capsys,
         "holds no records")
    _bad(["--model", tiny_folder, "--tasks", "cs_arc_easy", "--adapter", str(tmp_path / "none")],
         kept_output, capsys, "does not exist")
    _bad(["--model", tiny_folder, "--tasks", "cs_arc_easy", "--dtype", "int8"], kept_output, capsys,
         "--dtype")
    # an adapter trained on another base model (hidden size 48 instead of 32)
    from transformers import AutoModelForCausalLM

    from goat_dist.config import GoatConfig
    from goat_dist.model import get_goat_model
    other = build_tiny_model_folder(str(tmp_path / "other"), hidden=48)
    goat = get_goat_model(AutoModelForCausalLM.from_pretrained(other),
                          GoatConfig(r=4, lora_alpha=8, num_experts=2, top_k=1,
                                     target_modules=["q_proj", "v_proj"]))
    goat.save_adapter(str(tmp_path / "other_adapter"))
    _bad(["--model", tiny_folder, "--tasks", "cs_arc_easy", "--adapter", str(tmp_path / "other_adapter")],
         kept_output, capsys, "load it onto the base model it was trained on")


def test_adapter_through_cli_equals_trainer_numbers(tmp_path, tiny_folder, kept_output, capsys):
    """Train on the tiny folder; the trainer's final accuracy (in-process, through the engine) equals
    launch/evaluate.py on the exported adapter, on the last checkpoint step folder, and the
    in-process evaluator on the loaded adapter."""
    records = [r for r in demo("eval.json") if "Answer1" in r["instruction"]][:10]
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps(records))
    out = str(tmp_path / "run")
    cfg = {"model": {"name_or_path": tiny_folder, "task": "causal_lm"},
           "data": {"train_file": os.path.join(DEMO_DATA, "train.json"), "eval_file": str(eval_file),
                    "format": "instruction", "max_length": 320, "max_train_samples": 32},
           "goat": {"r": 4, "lora_alpha": 8, "num_experts": 2, "top_k": 1, "lora_dropout": 0.0,
                    "target_modules": "all-linear"},
           "optim": {"lr": 1.0e-2, "warmup_steps": 1},
           "train": {"output_dir": out, "micro_batch_size": 4, "max_steps": 3, "bf16": False, "seed": 0,
                     "save_every": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert run_train(["--config", str(tmp_path / "run.yaml")], world=1) == 0
    m = read_summary(out)["final_metrics"]
    assert m["eval/accuracy_n"] == len(records)

    data = _data_dir(tmp_path / "data", records)
    res_dir = tmp_path / "eval"
    assert run_eval_ranks(["--model", tiny_folder, "--adapter", out, "--tasks", "cs_arc_easy",
                           "--data_dir", data, "--dtype", "float32", "--max_length", "320",
                           "--output_dir", str(res_dir)], world=1) == [0]
    got = json.loads((res_dir / "eval_results.json").read_text())
    assert got["adapter"] == os.path.join(out, "adapter") and len(got["adapter_sha256"]) == 64
    assert got["dtype"] == "float32" and got["versions"]["lm_eval"]
    assert got["metrics"]["cs_arc_easy"]["acc"] == pytest.approx(m["eval/accuracy"], abs=1e-9)
    assert "| cs_arc_easy | 10 |" in (res_dir / "results.md").read_text()

    # every checkpoint step folder carries its adapter: the last one is the final export
    ckpt = os.path.join(out, "checkpoints")
    assert sorted(d for d in os.listdir(ckpt) if d.startswith("step_")) == ["step_00000002",
                                                                            "step_00000003"]
    assert run_eval_ranks(["--model", tiny_folder, "--adapter", os.path.join(ckpt, "step_00000003"),
                           "--tasks", "cs_arc_easy", "--data_dir", data, "--dtype", "float32",
                           "--max_length", "320", "--output_dir", str(tmp_path / "eval3")], world=1) == [0]
    step3 = json.loads((tmp_path / "eval3" / "eval_results.json").read_text())
    assert step3["adapter_sha256"] == got["adapter_sha256"]
    assert step3["metrics"]["cs_arc_easy"]["acc"] == pytest.approx(m["eval/accuracy"], abs=1e-9)
    from goat_dist.eval.lm import resolve_adapter_dir, sha256_of_folder
    step2 = resolve_adapter_dir(os.path.join(ckpt, "step_00000002"))
    assert step2 == os.path.join(ckpt, "step_00000002", "adapter")
    assert sha256_of_folder(step2) != got["adapter_sha256"]
    # a run without its final export (stopped early) is refused, naming the checkpoint to pass
    import shutil
    stopped = str(tmp_path / "stopped")
    shutil.copytree(out, stopped, ignore=lambda d, names: ["adapter"] if d == out else [])
    _bad(["--model", tiny_folder, "--tasks", "cs_arc_easy", "--adapter", stopped], kept_output, capsys,
         f"pass --adapter {os.path.join(stopped, 'checkpoints', 'step_00000003', 'adapter')}")

    from goat_dist.eval.lm import load_model
    from goat_dist.train.evaluate import accuracy
    model, tok, _ = load_model(tiny_folder, out, torch.float32)
    mine = accuracy(model, tok, records, "options", "alpaca", 320, 16, batch_size=3)
    assert mine["eval/accuracy"] == pytest.approx(m["eval/accuracy"], abs=1e-9)


def test_two_ranks_give_the_numbers_of_one(tmp_path, tiny_folder):
    argv = ["--model", tiny_folder, "--tasks", "cs_arc_easy,cs_std_boolq,cs_gen_obqa",
            "--limit", "7", "--dtype", "float32", "--batch_size", "3", "--log_samples"]
    for world in (1, 2):
        assert run_eval_ranks(argv + ["--output_dir", str(tmp_path / f"w{world}")], world) == [0] * world
    one, two = (json.loads((tmp_path / f"w{w}" / "eval_results.json").read_text()) for w in (1, 2))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["n_samples"] == one["n_samples"] == {"cs_arc_easy": 7, "cs_std_boolq": 7, "cs_gen_obqa": 7}
    for task, m in one["metrics"].items():
        assert two["metrics"][task] == pytest.approx(m, abs=1e-9), task

    def preds(w):
        lines = (tmp_path / f"w{w}" / "samples.jsonl").read_text().splitlines()
        return sorted((d["task"], d["doc_id"], json.dumps(d["prediction"])) for d in map(json.loads, lines))
    assert preds(2) == preds(1) and len(preds(1)) == 21
