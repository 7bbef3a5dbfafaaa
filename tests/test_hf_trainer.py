"""GOAT inside a real ``transformers.Trainer`` (goat_dist.hf_trainer) and TRL's SFTTrainer.

Real components only: the tiny Llama built from a config in code, a sentencepiece tokenizer
trained on the demo data, the demo records tokenized by goat_dist's own data code, the Trainer with
its own ``deepspeed=`` argument (ZeRO-2) on 2 gloo ranks started as torchrun would start them.
The oracle of a saved adapter is the trainer's own eval loss: the adapter reloaded onto a fresh
base model (same seed) must give the same eval loss.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from tests.train_helpers import DEMO_DATA, free_port

GOAT_KW = dict(r=8, lora_alpha=16, num_experts=4, top_k=2, lora_dropout=0.0,
               target_modules="all-linear")
ZERO2 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "train_batch_size": "auto", "gradient_clipping": "auto",
         "zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}
ZERO3 = {**ZERO2, "zero_optimization": {"stage": 3}}


def _data_cfg():
    from goat_dist.train.config import DataConfig
    return DataConfig(train_file=os.path.join(DEMO_DATA, "train.json"),
                      eval_file=os.path.join(DEMO_DATA, "eval.json"), max_length=96,
                      max_train_samples=64, max_eval_samples=16)


def make_tokenizer(out_dir: str) -> str:
    """Train the sentencepiece tokenizer on the demo training split; returns its folder."""
    from goat_dist.train.data import corpus_texts, load_splits
    from goat_dist.train.tokenizer import train_sentencepiece_tokenizer
    cfg = _data_cfg()
    train_sentencepiece_tokenizer(corpus_texts(load_splits(cfg, "causal_lm", 0).train, cfg), 256,
                                  out_dir)
    return out_dir


def make_base(tok_dir: str) -> str:
    """The tokenizer folder + a tiny Llama saved into it: the "pretrained" base model.

    Loaded from disk like a real checkpoint, so a run under ZeRO-3 (built inside zero.Init, whose
    random init differs) and a plain reload start from the same weights.
    """
    from goat_dist.train.modeling import build_preset
    from goat_dist.train.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir)
    build_preset("tiny-llama", len(tok), seed=0, pad_token_id=tok.pad_token_id).save_pretrained(tok_dir)
    return tok_dir


def build(base_dir: str):
    """(tokenizer, prepared data, base tiny Llama) — identical in every process."""
    from transformers import AutoModelForCausalLM

    from goat_dist.train.data import prepare_data
    from goat_dist.train.tokenizer import load_tokenizer
    tok = load_tokenizer(base_dir)
    data = prepare_data(_data_cfg(), tok, "causal_lm", 0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
    return tok, data, model


def trainer_args(out: str, ds=None, **kw):
    from transformers import TrainingArguments
    args = dict(output_dir=out, per_device_train_batch_size=4, per_device_eval_batch_size=1,
                gradient_accumulation_steps=2, max_steps=8, learning_rate=5e-3,
                lr_scheduler_type="constant", logging_steps=1, save_strategy="steps",
                save_steps=4, report_to="none", use_cpu=True, seed=0, data_seed=0,
                dataloader_num_workers=0, deepspeed=ds, disable_tqdm=True)
    args.update(kw)
    return TrainingArguments(**args)


def train_once(tok_dir: str, out: str, ds=None, resume=None) -> dict:
    """One GoatTrainer run; returns eval losses before/after and the training losses."""
    from transformers import DataCollatorForSeq2Seq

    from goat_dist import GoatConfig, GoatTrainer, get_goat_model
    args = trainer_args(out, ds)   # first, as users do: under ZeRO-3 the model is then built partitioned
    if ds is not None:             # zero.Init reads the world size from deepspeed.comm
        import deepspeed
        deepspeed.init_distributed()
    tok, data, model = build(tok_dir)
    torch.manual_seed(0)                     # router init identical on every rank
    goat = get_goat_model(model, GoatConfig(**GOAT_KW))
    trainer = GoatTrainer(model=goat, args=args, train_dataset=data.train, eval_dataset=data.eval,
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True),
                          processing_class=tok)
    # transformers refuses evaluate() before train() under ZeRO-1/2 ("ZeRO inference only makes
    # sense with ZeRO Stage 3"): the caller then measures the untrained model itself.
    before = trainer.evaluate()["eval_loss"] if ds is None else None
    trainer.train(resume_from_checkpoint=resume)
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model(os.path.join(out, "final"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"before": before, "after": after, "losses": losses}


def reload_eval_loss(tok_dir: str, adapter_dir, out: str) -> float:
    """Eval loss of the adapter reloaded onto a fresh base model, 1 process, no DeepSpeed
    (``adapter_dir=None``: the untrained GOAT model every run starts from)."""
    from transformers import DataCollatorForSeq2Seq

    from goat_dist import GoatConfig, GoatModel, GoatTrainer, get_goat_model
    tok, data, model = build(tok_dir)
    if adapter_dir is None:
        torch.manual_seed(0)
        goat = get_goat_model(model, GoatConfig(**GOAT_KW))
    else:
        goat = GoatModel.from_pretrained(model, adapter_dir)
    trainer = GoatTrainer(model=goat, args=trainer_args(out), eval_dataset=data.eval,
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True))
    return trainer.evaluate()["eval_loss"]


def _worker(rank: int, world: int, port: int, tok_dir: str, out: str, ds: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    res = train_once(tok_dir, out, ds)
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(res, f)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_base(make_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def test_compute_loss_adds_aux_loss(tok_dir, tmp_path):
    """The training loss the Trainer backpropagates is the task loss + goat.aux_loss()."""
    from transformers import DataCollatorForSeq2Seq

    from goat_dist import GoatConfig, GoatTrainer, get_goat_model
    tok, data, model = build(tok_dir)
    goat = get_goat_model(model, GoatConfig(**{**GOAT_KW, "aux_loss_coef": 0.5}))
    trainer = GoatTrainer(model=goat, args=trainer_args(str(tmp_path)), train_dataset=data.train,
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True))
    batch = DataCollatorForSeq2Seq(tok, padding=True)([data.train[i] for i in range(4)])
    goat.train()
    got = trainer.compute_loss(goat, dict(batch))
    ref_out = goat(**batch)
    ref = ref_out.loss + goat.aux_loss()
    assert goat.aux_loss().item() > 0.1           # the aux term is not negligible here
    assert abs(got.item() - ref.item()) < 1e-5
    # the Trainer's num_items_in_batch path: the task loss is a share of the whole accumulated
    # batch and is not divided by GA later, so the aux loss is divided by GA here
    assert trainer.model_accepts_loss_kwargs
    trainer.current_gradient_accumulation_steps = 2
    n = int((batch["labels"][:, 1:] != -100).sum()) * 2
    got = trainer.compute_loss(goat, dict(batch), num_items_in_batch=torch.tensor(n))
    ref = goat(**batch, num_items_in_batch=torch.tensor(n)).loss + goat.aux_loss() / 2
    assert abs(got.item() - ref.item()) < 1e-5
    with pytest.raises(TypeError, match="get_goat_model"):
        GoatTrainer(model=model, args=trainer_args(str(tmp_path)))


@pytest.mark.slow
def test_trainer_one_process_trains_saves_and_reloads(tok_dir, tmp_path):
    out = str(tmp_path / "run")
    res = train_once(tok_dir, out)
    assert res["after"] < res["before"] - 0.3, res
    for folder in ("checkpoint-4", "checkpoint-8", "final"):
        assert sorted(f for f in os.listdir(os.path.join(out, folder)) if f.startswith("adapter_")) \
            == ["adapter_config.json", "adapter_model.safetensors"]
    assert not any(f.startswith("model") for f in os.listdir(os.path.join(out, "final")))
    got = reload_eval_loss(tok_dir, os.path.join(out, "final"), str(tmp_path / "eval"))
    assert abs(got - res["after"]) < 1e-5 * max(1.0, res["after"])
    # resuming from checkpoint-4 (adapter folder + the Trainer's optimizer/scheduler/RNG files)
    # continues like the uninterrupted run
    out2 = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(out, "checkpoint-4"), os.path.join(out2, "checkpoint-4"))
    res2 = train_once(tok_dir, out2, resume=os.path.join(out2, "checkpoint-4"))
    assert abs(res2["after"] - res["after"]) < 1e-5 * max(1.0, res["after"])
    # log history: steps 1-4 restored from trainer_state.json, steps 5-8 trained again
    assert len(res2["losses"]) == 8
    assert all(abs(a - b) < 1e-5 for a, b in zip(res2["losses"][4:], res["losses"][4:]))


@pytest.mark.slow
@pytest.mark.parametrize("ds", [ZERO2, ZERO3], ids=["zero2", "zero3"])
def test_trainer_deepspeed_two_ranks(tok_dir, tmp_path, ds):
    """The Trainer's own deepspeed= argument, 2 gloo ranks: the loss falls, and the exported
    adapter (gathered from the ZeRO-3 partitions) reloads in one process to the same eval loss."""
    out = str(tmp_path / "run")
    os.makedirs(out)
    ctx = mp.start_processes(_worker, args=(2, free_port(), tok_dir, out, ds), nprocs=2,
                             start_method="spawn", join=False)
    while not ctx.join(timeout=600):
        pass
    with open(os.path.join(out, "result.json")) as f:
        res = json.load(f)
    res["before"] = reload_eval_loss(tok_dir, None, str(tmp_path / "eval0"))
    assert res["after"] < res["before"] - 0.3, res
    got = reload_eval_loss(tok_dir, os.path.join(out, "final"), str(tmp_path / "eval"))
    assert abs(got - res["after"]) < 1e-4 * max(1.0, res["after"])
    # the periodic checkpoint is an adapter folder too (next to DeepSpeed's own files)
    ck = os.path.join(out, "checkpoint-8")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(ck))


@pytest.mark.slow
def test_trl_sft_trainer(tok_dir, tmp_path):
    """TRL's SFTTrainer (prompt/completion data, loss on the completion) with GoatTrainerMixin."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from goat_dist import GoatConfig, get_goat_model, goat_trainer_class, load_adapter
    from goat_dist.adapter_io import adapter_state_dict
    from goat_dist.train.data import format_prompt, load_records
    tok, _, model = build(tok_dir)
    recs = load_records(os.path.join(DEMO_DATA, "train.json")).to_list()[:64]
    ds = datasets.Dataset.from_list([{"prompt": format_prompt(r, "alpaca"), "completion": r["output"]}
                                     for r in recs])
    torch.manual_seed(0)
    goat = get_goat_model(model, GoatConfig(**GOAT_KW))
    out = str(tmp_path / "sft")
    args = SFTConfig(output_dir=out, per_device_train_batch_size=4, max_steps=8,
                     learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1,
                     save_steps=8, report_to="none", use_cpu=True, max_length=96,
                     disable_tqdm=True, seed=0)
    trainer = goat_trainer_class(SFTTrainer)(model=goat, args=args, train_dataset=ds,
                                             processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 0.3, losses
    _, _, fresh = build(tok_dir)
    reloaded = adapter_state_dict(load_adapter(fresh, os.path.join(out, "checkpoint-8")))
    trained = adapter_state_dict(goat)
    assert reloaded.keys() == trained.keys()
    assert all(torch.equal(reloaded[k], trained[k]) for k in trained)
