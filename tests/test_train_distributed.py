"""The trainer against its oracles: the one-process run (ZeRO-2 / ZeRO-3 + offload on 2 gloo
ranks), the uninterrupted run (resume), and the trained model (adapter export)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.train_helpers import ROOT, adapter_eval_loss, losses, read_summary, run_train, tiny_config

ZERO2 = os.path.join(ROOT, "ds_configs", "zero2.json")
ZERO3 = os.path.join(ROOT, "ds_configs", "zero3.json")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """Oracle: 1 rank, micro-batch 2 x accumulation 4 (global batch 8), ZeRO-0."""
    d = tmp_path_factory.mktemp("single")
    out = str(d / "out")
    cfg = tiny_config(str(d / "run.yaml"), out, train={"gradient_accumulation_steps": 4})
    assert run_train(["--config", cfg], world=1) == 0
    return out


@pytest.mark.parametrize("ds_config", [ZERO2, ZERO3], ids=["zero2", "zero3_offload_param"])
def test_two_ranks_match_single_process(tmp_path, single_process_run, ds_config):
    """2 ranks x micro-batch 2 x accumulation 2 sees the same global batches as the oracle:
    per-step losses agree within 1e-4 for 5 steps."""
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "run.yaml"), out)
    assert run_train(["--config", cfg, "--ds_config", ds_config], world=2) == 0
    ref, got = losses(single_process_run), losses(out)
    assert len(got) == len(ref) == 5
    assert got == pytest.approx(ref, abs=1e-4), (got, ref)
    # training moved: the loss is not constant
    assert abs(got[0] - got[-1]) > 1e-3
    summary = read_summary(out)
    assert summary["world_size"] == 2 and summary["finished"]


def test_exported_adapter_reproduces_eval_loss(tmp_path):
    """ZeRO-3 (partitioned, offloaded backbone) export: non-empty tensors, and the adapter on
    the original base model in ONE process gives the trained model's eval loss."""
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "run.yaml"), out, train={"max_steps": 3})
    assert run_train(["--config", cfg, "--ds_config", ZERO3], world=2) == 0
    summary = read_summary(out)
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert tensors and all(t.numel() > 0 for t in tensors.values())

    assert adapter_eval_loss(cfg, out) == pytest.approx(summary["final_metrics"]["eval/loss"],
                                                     rel=1e-5)


def test_resume_is_exact(tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 steps: identical losses and adapter, and the
    resumed summary's history is the whole run's. Dropout is on, so the RNG state must be
    restored too."""
    from safetensors.torch import load_file

    straight = str(tmp_path / "straight")
    cfg = tiny_config(str(tmp_path / "a.yaml"), straight, goat={"lora_dropout": 0.1},
                      train={"max_steps": 6})
    assert run_train(["--config", cfg]) == 0
    split = str(tmp_path / "split")
    cfg2 = tiny_config(str(tmp_path / "b.yaml"), split, goat={"lora_dropout": 0.1},
                       train={"max_steps": 6})
    assert run_train(["--config", cfg2, "train.stop_after_steps=3"]) == 0
    first = losses(split)
    assert read_summary(split)["finished"] is False and len(first) == 3
    assert run_train(["--config", cfg2]) == 0          # resume=auto picks up step 3
    second = read_summary(split)
    assert second["resumed_from"].endswith("step_00000003")
    # the resumed job found every layer's SVD priors in the cache
    assert second["svd_init"]["svd_computed"] == 0 and second["svd_init"]["cache_hits"] > 0
    assert read_summary(straight)["svd_init"]["svd_computed"] > 0
    # the resumed run's summary holds the whole run's history: steps 1-3 come from the
    # checkpoint (history.json), 4-6 from the resumed job
    assert [h["step"] for h in second["history"]] == [1, 2, 3, 4, 5, 6]
    got = [h["loss"] for h in second["history"]]
    assert got[:3] == first
    assert got == pytest.approx(losses(straight), abs=1e-6)
    a = load_file(os.path.join(straight, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(split, "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_local_hf_folder_loads_partitioned_under_zero3(tmp_path):
    """A model folder (save_pretrained) + tokenizer folder: under ZeRO-3 transformers builds it
    inside zero.Init (HfDeepSpeedConfig first), and training matches the one-process run."""
    from goat_dist.train.data import corpus_texts, load_splits
    from goat_dist.train.config import load_run_config
    from goat_dist.train.modeling import build_preset
    from goat_dist.train.tokenizer import train_sentencepiece_tokenizer

    folder = str(tmp_path / "tiny_llama_hf")
    probe = load_run_config(tiny_config(str(tmp_path / "p.yaml"), str(tmp_path / "p")))
    tok = train_sentencepiece_tokenizer(
        corpus_texts(load_splits(probe.data, "causal_lm", 0).train, probe.data), 256, folder)
    build_preset("tiny-llama", len(tok), seed=0, pad_token_id=tok.pad_token_id).save_pretrained(folder)
    model = {"preset": None, "name_or_path": folder}
    one = tiny_config(str(tmp_path / "one.yaml"), str(tmp_path / "one"), model=model,
                      train={"gradient_accumulation_steps": 4})
    two = tiny_config(str(tmp_path / "two.yaml"), str(tmp_path / "two"), model=model)
    assert run_train(["--config", one]) == 0
    assert run_train(["--config", two, "--ds_config", ZERO3], world=2) == 0
    assert read_summary(str(tmp_path / "two"))["base_loaded_partitioned"] is True
    assert read_summary(str(tmp_path / "one"))["base_loaded_partitioned"] is False
    assert losses(str(tmp_path / "two")) == pytest.approx(losses(str(tmp_path / "one")), abs=1e-4)
