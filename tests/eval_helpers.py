"""Shared pieces of the evaluation tests: a tiny Llama + tokenizer (built in code, saved as a
local Hugging Face folder), demo records, and spawned ranks running ``launch/evaluate.py``."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "data", "demo")

GSM = {"instruction": "Mr Boarden is remodeling his bathroom. For every square foot, he needs 24 "
       "mosaic tiles. How many mosaic tiles would Mr Boarden need to cover two thirds of his 36 sq ft "
       "bathroom?", "input": "", "output": "\nA: He needs 24 tiles for every square foot. He needs to "
       "cover two thirds of his 36 sq ft bathroom. That means he needs to cover 36 * 2/3 = 24 sq ft. "
       "He needs 24 tiles for every sq ft, so he needs 24 * 24 = 576 tiles. The answer is 576.",
       "answer": "576.0"}


def demo(name: str) -> list[dict]:
    with open(os.path.join(DEMO, name)) as f:
        return json.load(f)


def build_tiny_model_folder(path: str, hidden: int = 32, seed: int = 0) -> str:
    """A tiny Llama + a sentencepiece tokenizer trained on the demo data, saved at ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from goat_dist.train.config import DataConfig
    from goat_dist.train.data import corpus_texts
    from goat_dist.train.tokenizer import train_sentencepiece_tokenizer

    texts = corpus_texts(demo("train.json"), DataConfig(train_file="x.json"))
    tok = train_sentencepiece_tokenizer(texts, 512, path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok),
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load_tiny(folder: str):
    """(model, tokenizer) of a folder made by build_tiny_model_folder, in float32."""
    from goat_dist.eval.lm import load_model

    model, tok, _ = load_model(folder, None, torch.float32)
    return model, tok


def _eval_worker(rank: int, world: int, port: int, argv: list[str], result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from goat_dist.eval.cli import main
    rc = main(argv)
    from tests.train_helpers import write_status
    write_status(result_dir, rank, rc)


def run_eval_ranks(argv: list[str], world: int, tmp_dir: Optional[str] = None,
                   timeout_s: float = 900) -> list[Optional[int]]:
    """``launch/evaluate.py argv`` on ``world`` spawned gloo ranks; each rank's exit status."""
    import tempfile

    import torch.multiprocessing as mp

    from tests.train_helpers import free_port, read_status

    result_dir = tempfile.mkdtemp(dir=tmp_dir)
    ctx = mp.start_processes(_eval_worker, args=(world, free_port(), argv, result_dir),
                             nprocs=world, start_method="spawn", join=False)
    for p in ctx.processes:
        p.join(timeout_s)   # a safety net against a hang, not a timing assertion
    rcs = []
    for rank, p in enumerate(ctx.processes):
        if p.is_alive():
            p.kill()
        status = read_status(result_dir, rank)
        rcs.append(p.exitcode if status is None else status)
    return rcs
