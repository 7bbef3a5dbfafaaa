"""goat_dist: GOAT adapters (LoRA mixture-of-experts, ICML 2025) for Hugging Face models, trained on
DeepSpeed.

    from goat_dist import GoatConfig, get_goat_model, GoatModel

    goat = get_goat_model(model, GoatConfig(r=32, num_experts=8, top_k=2, target_modules=["q_proj"]))
    goat.print_trainable_parameters()
    loss = goat(**batch).loss + goat.aux_loss()           # your loop, or goat_dist.GoatTrainer
    goat.save_pretrained("adapter/")                       # = save_adapter(goat, "adapter/")
    goat = GoatModel.from_pretrained(base_model, "adapter/")   # = load_adapter, frozen, eval mode

The names a user touches are exported here (see docs/API.md). The core (config, model, adapter
folders) is imported eagerly: it needs only torch and safetensors. The training side imports
DeepSpeed and transformers, so its names (``train_main``, ``Trainer``, ``RunConfig``,
``GoatTrainer`` ...) are resolved lazily on first access (PEP 562), and ``import goat_dist`` stays
cheap (no DeepSpeed import, no accelerator probe).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .adapter_io import AdapterLoadError, load_adapter, save_adapter
from .config import GoatConfig, GoatConfigError
from .layer import GoatLinear
from .model import GoatModel, get_goat_model

__version__ = "0.1.0"

# name -> (module, attribute): resolved on first access, then cached in the module's globals.
_LAZY = {
    # the goat-train program: train_main(argv) -> exit status. (Not ``train``: that name is the
    # goat_dist.train subpackage, which the import system sets as an attribute of this package.)
    "train_main": ("goat_dist.train.cli", "main"),
    "Trainer": ("goat_dist.train.loop", "Trainer"),            # the launcher's trainer: Trainer(run, ds).run()
    "RunConfig": ("goat_dist.train.config", "RunConfig"),
    "load_run_config": ("goat_dist.train.config", "load_run_config"),
    "ConfigError": ("goat_dist.train.config", "ConfigError"),
    "DataError": ("goat_dist.train.data", "DataError"),
    "TokenizerError": ("goat_dist.train.tokenizer", "TokenizerError"),
    "GoatTrainer": ("goat_dist.hf_trainer", "GoatTrainer"),
    "GoatTrainerMixin": ("goat_dist.hf_trainer", "GoatTrainerMixin"),
    "goat_trainer_class": ("goat_dist.hf_trainer", "goat_trainer_class"),
}

__all__ = ["GoatConfig", "GoatConfigError", "GoatLinear", "GoatModel", "get_goat_model",
           "load_adapter", "save_adapter", "AdapterLoadError", "__version__", *_LAZY]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these come from __getattr__
    from .hf_trainer import GoatTrainer, GoatTrainerMixin, goat_trainer_class
    from .train.cli import main as train_main
    from .train.config import ConfigError, RunConfig, load_run_config
    from .train.data import DataError
    from .train.loop import Trainer
    from .train.tokenizer import TokenizerError


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'goat_dist' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
