"""model.trust_remote_code: a model folder that ships its own Python code is refused (the code
never runs) unless the run config turns the switch on."""

from __future__ import annotations

import json
import os

import pytest

from goat_dist.train.config import ConfigError, ModelConfig
from goat_dist.train.modeling import build_preset, load_base_model

CONFIG_CODE = '''
from transformers import LlamaConfig


class GoatTestConfig(LlamaConfig):
    model_type = "goat_test_llama"
'''

MODELING_CODE = '''
from transformers import LlamaForCausalLM

from .configuration_goat_test import GoatTestConfig

open(MARKER, "w").close()   # proof that this file ran


class GoatTestForCausalLM(LlamaForCausalLM):
    config_class = GoatTestConfig
'''


def _custom_code_folder(path: str, marker: str) -> str:
    model = build_preset("tiny-llama", 64, seed=0, pad_token_id=0)
    model.save_pretrained(path)
    with open(os.path.join(path, "configuration_goat_test.py"), "w") as f:
        f.write(CONFIG_CODE)
    with open(os.path.join(path, "modeling_goat_test.py"), "w") as f:
        f.write(MODELING_CODE.replace("MARKER", repr(marker)))
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["model_type"] = "goat_test_llama"
    cfg["architectures"] = ["GoatTestForCausalLM"]
    cfg["auto_map"] = {"AutoConfig": "configuration_goat_test.GoatTestConfig",
                       "AutoModelForCausalLM": "modeling_goat_test.GoatTestForCausalLM"}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return path


def test_remote_code_needs_the_switch(tmp_path):
    marker = str(tmp_path / "RAN")
    folder = _custom_code_folder(str(tmp_path / "custom"), marker)
    with pytest.raises(ConfigError, match="model.name_or_path"):
        load_base_model(ModelConfig(name_or_path=folder), 64, 2, 0, 0, None)
    assert not os.path.exists(marker), "the folder's code ran without trust_remote_code"

    model, _ = load_base_model(ModelConfig(name_or_path=folder, trust_remote_code=True),
                               64, 2, 0, 0, None)
    assert type(model).__name__ == "GoatTestForCausalLM"
    assert os.path.exists(marker)
