"""The public API: ``import goat_dist`` exports what users touch, cheaply (no DeepSpeed import), with
peft's names and semantics (print_trainable_parameters, from_pretrained, save_pretrained)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import goat_dist
from goat_dist import GoatConfig, GoatModel, get_goat_model
from tests.helpers_core import lm_batch, tiny_bert, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_is_cheap_and_lazy_names_resolve():
    code = ("import sys, goat_dist; heavy = [m for m in ('deepspeed', 'transformers', 'datasets') "
            "if m in sys.modules]; print(heavy); goat_dist.Trainer; "
            "print('goat_dist.train.loop' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, check=True).stdout.split("\n")
    assert out[0] == "[]"            # import goat_dist pulls in neither DeepSpeed nor transformers
    assert out[1] == "True"          # the training side is imported when first asked for


def test_exports_are_the_real_objects():
    from goat_dist.adapter_io import AdapterLoadError, load_adapter, save_adapter
    from goat_dist.config import GoatConfigError
    from goat_dist.hf_trainer import GoatTrainer, GoatTrainerMixin, goat_trainer_class
    from goat_dist.train.cli import main
    from goat_dist.train.config import ConfigError, RunConfig, load_run_config
    from goat_dist.train.data import DataError
    from goat_dist.train.loop import Trainer
    from goat_dist.train.tokenizer import TokenizerError
    expected = dict(AdapterLoadError=AdapterLoadError, load_adapter=load_adapter,
                    save_adapter=save_adapter, GoatConfigError=GoatConfigError,
                    GoatTrainer=GoatTrainer, GoatTrainerMixin=GoatTrainerMixin,
                    goat_trainer_class=goat_trainer_class, train_main=main,
                    ConfigError=ConfigError, RunConfig=RunConfig, load_run_config=load_run_config,
                    DataError=DataError, Trainer=Trainer, TokenizerError=TokenizerError)
    for name, obj in expected.items():
        assert getattr(goat_dist, name) is obj, name
    assert set(goat_dist.__all__) >= set(expected) | {"GoatConfig", "GoatModel", "get_goat_model"}
    for name in goat_dist.__all__:
        getattr(goat_dist, name)
    # every error a user catches is a ValueError with the problem in its message
    for err in (ConfigError, GoatConfigError, DataError, TokenizerError, AdapterLoadError):
        assert issubclass(err, ValueError)
    with pytest.raises(AttributeError):
        goat_dist.no_such_name
    # the training subpackage is still reachable under its own name
    import importlib
    importlib.import_module("goat_dist.train.cli")
    assert goat_dist.train.cli.main is main


def test_print_trainable_parameters_has_peft_format(capsys):
    goat = get_goat_model(tiny_bert(), GoatConfig(r=8, num_experts=4, target_modules=["query", "value"],
                                                  modules_to_save=["classifier"]))
    trainable = sum(p.numel() for p in goat.parameters() if p.requires_grad)
    total = sum(p.numel() for p in goat.parameters())
    # experts + routers of 4 linears (2 layers x query/value, 64 -> 64) + the classifier head
    assert trainable == 4 * (4 * 2 * 64 + 4 * 64 * 2 + 4 * 64) + (64 * 3 + 3)
    assert goat.get_nb_trainable_parameters() == (trainable, total)
    goat.print_trainable_parameters()
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: {total:,d} "
                                       f"|| trainable%: {100 * trainable / total:.4f}\n")


def test_from_pretrained_and_save_pretrained_follow_peft(tmp_path):
    ids, mask = lm_batch(batch=2, seq=12, pad_last=3)
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids)
    goat = get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=4, lora_dropout=0.0,
                                                   target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW(goat.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        loss = goat(**batch).loss + goat.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    goat.eval()
    with torch.no_grad():
        ref = goat(**batch).logits
    goat.save_pretrained(str(tmp_path / "adapter"))   # the adapter folder, never the base model
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json",
                                                        "adapter_model.safetensors"]
    loaded = GoatModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    assert isinstance(loaded, GoatModel) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())       # inference, as peft
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, ref)
    assert loaded.get_base_model() is loaded.model
    trainable = GoatModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"), is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in goat.named_parameters() if p.requires_grad}
    with pytest.raises(goat_dist.AdapterLoadError):
        GoatModel.from_pretrained(tiny_llama(), str(tmp_path / "missing"))
