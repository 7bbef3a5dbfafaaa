"""GOAT inside ``transformers.Trainer`` (and TRL's trainers): the aux loss and adapter checkpoints.

    from goat_dist import GoatConfig, GoatTrainer, get_goat_model

    goat = get_goat_model(model, GoatConfig(r=32, num_experts=8, top_k=2, target_modules="all-linear"))
    trainer = GoatTrainer(model=goat, args=TrainingArguments(..., deepspeed="ds_configs/zero2.json"),
                          train_dataset=ds, data_collator=DataCollatorForSeq2Seq(tokenizer))
    trainer.train()              # checkpoint-N/ and save_model() hold adapter folders (load_adapter)

``GoatTrainerMixin`` is the whole integration; ``GoatTrainer`` is the mixin on ``transformers.Trainer``
and ``goat_trainer_class(SFTTrainer)`` puts it on any Trainer subclass (TRL's SFTTrainer,
DPOTrainer ...). What the mixin changes, and why:

* **Aux loss.** ``compute_loss`` adds ``goat.aux_loss()`` (the routers' load-balancing loss, already
  times ``aux_loss_coef``) to the task loss in training forwards. The Trainer normalises the task
  loss in one of two ways and the aux loss must follow it so that its gradient is the mean over the
  micro-batches of one optimizer step, as in goat_dist's own loop: when the model received
  ``num_items_in_batch`` (the task loss is already a share of the whole accumulated batch and the
  Trainer does not divide it) the aux loss is divided by the accumulation steps here; otherwise the
  Trainer divides the sum by them. The Trainer's ``average_tokens_across_devices`` multiplication
  by the world size applies to the task loss only (it happens inside ``super().compute_loss``),
  and DeepSpeed / DDP average the aux gradient over ranks: the mean over ranks, as intended.
* **Checkpoints = adapter folders.** ``save_model`` (called for every ``checkpoint-N`` and by the
  user) writes ``adapter_config.json`` + ``adapter_model.safetensors`` (goat_dist's format:
  experts, routers, residual factors, modules_to_save), never the frozen base. Under ZeRO-3 the
  adapter's partitioned parameters are gathered first (a collective: every rank calls it, which
  the Trainer does). ``_load_from_checkpoint`` reads that folder back for
  ``train(resume_from_checkpoint=...)`` without DeepSpeed (with DeepSpeed the engine's own
  checkpoint, written next to it, is what resumes).
* **Signature.** ``GoatModel.forward(*args, **kwargs)`` has no named parameters, so the Trainer
  would drop every column (``remove_unused_columns``), find no label names and compute no eval
  loss; the wrapped model's signature is used instead.

Limits (docs/HF_TRAINER.md): expert parallelism (``train.ep_size``) and the distributed, cached
SVD initialiser are goat_dist launcher features. Under the Trainer experts are replicated
(data-parallel) and each rank computes the priors of every layer itself (under ZeRO-3 after
gathering one weight at a time, see ``goat_dist.model.default_priors``).
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from typing import Optional

import torch
import transformers

from .adapter_io import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict, read_adapter, save_adapter
from .model import GoatModel


def _unwrap_goat(model) -> Optional[GoatModel]:
    """The GoatModel inside ``model`` (itself, or wrapped by DDP / a DeepSpeed engine)."""
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, GoatModel):
            return model
        model = getattr(model, "module", None)
        seen += 1
    return None


def gathered_adapter_state_dict(goat: GoatModel) -> dict[str, torch.Tensor]:
    """Every adapter tensor on CPU; under ZeRO-3 the partitioned ones are gathered first.

    Collective under ZeRO-3: every rank must call it (the Trainer's save_model runs on all ranks).
    """
    params = [p for p in goat.parameters() if p.requires_grad and hasattr(p, "ds_id")]
    if not params:
        return adapter_state_dict(goat)
    import deepspeed
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return adapter_state_dict(goat)


def write_adapter_into(goat: GoatModel, output_dir: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Write the adapter's two files into ``output_dir``, which may already hold other files (a
    Trainer checkpoint folder). Each file is written in full next to it, then renamed into place."""
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_goat_", dir=output_dir)
    try:
        save_adapter(goat, os.path.join(tmp, "adapter"), state_dict=state_dict)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(os.path.join(tmp, "adapter", name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class GoatTrainerMixin:
    """Put before a ``transformers.Trainer`` class in the bases (see the module docstring).

    The model passed to the Trainer must be a :class:`goat_dist.GoatModel` (from
    ``get_goat_model`` / ``load_adapter`` / ``GoatModel.from_pretrained(..., is_trainable=True)``).
    """

    def __init__(self, model=None, *args, **kwargs):
        if not isinstance(model, GoatModel):
            raise TypeError(f"{type(self).__name__} trains a goat_dist.GoatModel; got "
                            f"{type(model).__name__}. Wrap the model first: "
                            f"goat = goat_dist.get_goat_model(model, goat_dist.GoatConfig(...))")
        self.goat = model
        super().__init__(model, *args, **kwargs)
        # The Trainer reads label names and "can return a loss" from the model class's forward
        # signature; GoatModel.forward(*args, **kwargs) has none, so read the wrapped model's.
        from transformers.utils import can_return_loss, find_labels
        base_cls = model.model.__class__
        if self.args.label_names is None:
            self.label_names = find_labels(base_cls)
        self.can_return_loss = can_return_loss(base_cls)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs: bool = False,
                     num_items_in_batch=None):
        # return_outputs passed through: TRL's SFTTrainer runs an extra forward to rebuild logits
        # when asked for outputs.
        res = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        loss, outputs = res if return_outputs else (res, None)
        if self.goat.training:
            aux = self.goat.aux_loss().to(loss.device)
            declared = getattr(self, "loss_is_scaled_for_ga", None)   # transformers >= 5
            already_scaled = declared if declared is not None \
                else ((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                      or self.compute_loss_func is not None)
            if already_scaled:  # the Trainer will not divide this micro-step's loss by GA
                aux = aux / self.current_gradient_accumulation_steps
            loss = loss + aux
        return (loss, outputs) if return_outputs else loss

    # --------------------------------------------------------------- columns
    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            params = inspect.signature(self.goat.model.forward).parameters
            self._signature_columns = list(params) + list(
                {"label", "label_ids", *self.label_names})

    # ------------------------------------------------------------------ save
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Write the adapter folder (and the tokenizer / processing class) into ``output_dir``."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state_dict = gathered_adapter_state_dict(self.goat)   # collective under ZeRO-3
        if not self.args.should_save:
            return
        write_adapter_into(self.goat, output_dir, state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        if self.is_deepspeed_enabled:  # the engine's checkpoint holds the adapter and optimizer
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        goat = _unwrap_goat(model if model is not None else self.model)
        _, tensors = read_adapter(resume_from_checkpoint)
        current = adapter_state_dict(goat)
        if set(current) != set(tensors):
            raise ValueError(f"checkpoint {resume_from_checkpoint!r} holds another adapter "
                             f"(tensors differ); resume with the configuration that wrote it")
        params = {**dict(goat.model.named_parameters()), **dict(goat.model.named_buffers())}
        with torch.no_grad():
            for k, t in tensors.items():
                params[k].copy_(t)


class GoatTrainer(GoatTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` for a GoatModel: aux loss added, checkpoints are adapter folders."""


def goat_trainer_class(trainer_cls: type) -> type:
    """``trainer_cls`` (a Trainer subclass, e.g. ``trl.SFTTrainer``) with GoatTrainerMixin in front.

        GoatSFTTrainer = goat_trainer_class(trl.SFTTrainer)
    """
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, transformers.Trainer)):
        raise TypeError(f"goat_trainer_class needs a transformers.Trainer subclass, got {trainer_cls!r}")
    return type(f"Goat{trainer_cls.__name__}", (GoatTrainerMixin, trainer_cls), {})
