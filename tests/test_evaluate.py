"""Answer parsing, option scoring (log-likelihood of each option) and greedy generation."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from goat_dist.train.config import DataConfig
from goat_dist.train.data import IGNORE_INDEX, collate, corpus_texts, format_prompt, tokenize_instruction
from goat_dist.train.evaluate import (answer_options, extract_answer, generate_answers, is_correct,
                                      option_scoring_batches, pick_options, score_candidates,
                                      sequence_logprobs)
from goat_dist.train.tokenizer import train_sentencepiece_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "data", "demo")

# real records of the other LLM-Adapters sets (shared data piqa / winogrande / social_i_qa / gsm8k)
PIQA = {"instruction": "Please choose the correct solution to the question: How do I ready a guinea "
        "pig cage for it's new occupants?\n\nSolution1: Provide the guinea pig with a cage full of a "
        "few inches of bedding made of ripped paper strips, you will also need to supply it with a "
        "water bottle and a food dish.\n\nSolution2: Provide the guinea pig with a cage full of a few "
        "inches of bedding made of ripped jeans material, you will also need to supply it with a "
        "water bottle and a food dish.\n\nAnswer format: solution1/solution2",
        "input": "", "output": "the correct answer is solution1", "answer": "solution1"}
WINO = {"instruction": "Please choose the correct answer to fill in the blank to complete the given "
        "sentence: Sarah was a much better surgeon than Maria so _ always got the easier cases.\n\n"
        "Option1: Sarah Option2: Maria Answer format: option1/option2",
        "input": "", "output": "the correct answer is option2", "answer": "option2"}
SIQA = {"instruction": "Please choose the correct answer to the question: Tracy didn't go home that "
        "evening and resisted Riley's attacks. What does Tracy need to do before this?\n\nAnswer1: "
        "make a new plan Answer2: Go home and see Riley Answer3: Find somewhere to go\n\nAnswer "
        "format: answer1/answer2/answer3", "input": "", "output": "the correct answer is answer3",
        "answer": "answer3"}
GSM = {"instruction": "Mr Boarden is remodeling his bathroom. For every square foot, he needs 24 "
       "mosaic tiles. How many mosaic tiles would Mr Boarden need to cover two thirds of his 36 sq ft "
       "bathroom?", "input": "", "output": "\nA: He needs 24 tiles for every square foot. He needs to "
       "cover two thirds of his 36 sq ft bathroom. That means he needs to cover 36 * 2/3 = 24 sq ft. "
       "He needs 24 tiles for every sq ft, so he needs 24 * 24 = 576 tiles. The answer is 576.",
       "answer": "576.0"}


def demo(name):
    with open(os.path.join(DEMO, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = corpus_texts(demo("train.json"), DataConfig(train_file="x.json"))
    return train_sentencepiece_tokenizer(texts, 512, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


# -------------------------------------------------------------------------------------- parsing

def test_options_and_extraction_on_real_records():
    records = demo("train.json") + demo("eval.json")
    kinds = set()
    for r in records:
        opts = answer_options(r)
        assert opts is not None and r["answer"] in opts, r["instruction"][-80:]
        assert extract_answer(r["output"], opts) == r["answer"]
        assert is_correct(extract_answer(r["output"], opts), r["answer"])
        kinds.add(tuple(opts))
    assert ("true", "false") in kinds and ("answer1", "answer2", "answer3", "answer4") in kinds
    assert answer_options(PIQA) == ["solution1", "solution2"]
    assert answer_options(WINO) == ["option1", "option2"]       # format on the options' line
    assert answer_options(SIQA) == ["answer1", "answer2", "answer3"]
    assert answer_options(GSM) is None
    for r in (PIQA, WINO, SIQA):
        assert extract_answer(r["output"], answer_options(r)) == r["answer"]


def test_extract_answer_generated_text():
    opts = ["answer1", "answer2", "answer3", "answer4"]
    assert extract_answer("The correct answer is Answer3.", opts) == "answer3"
    # the text after "the correct answer is" wins over an earlier mention
    assert extract_answer("answer1 looks wrong; the correct answer is answer2", opts) == "answer2"
    assert extract_answer("I would say answer4 because", opts) == "answer4"
    assert extract_answer("no idea", opts) is None
    assert extract_answer("the correct answer is answer10", opts + ["answer10"]) == "answer10"
    assert extract_answer("the correct answer is answer1x", opts) is None
    assert extract_answer("the correct answer is false", ["true", "false"]) == "false"


def test_numeric_answers():
    assert extract_answer(GSM["output"], None) == "576.0"
    assert is_correct(extract_answer(GSM["output"], None), GSM["answer"])
    assert is_correct("576", "576.0") and is_correct("576.0004", "576")
    assert not is_correct("577", "576.0")
    assert extract_answer("so 1,152 tiles in all", None) == "1152.0"
    assert extract_answer("it drops to -3.5 degrees, then 2", None) == "2.0"
    assert extract_answer("A: The answer is -3.5.", None) == "-3.5"
    assert extract_answer("Paris", None) == "Paris" and is_correct("Paris", "paris")
    assert extract_answer("   ", None) is None
    assert not is_correct(None, "1") and not is_correct("true", "false")


# -------------------------------------------------------------------------------- option scoring

def test_candidates_follow_the_training_format(tok):
    records = demo("eval.json")[:12] + [GSM]
    cands = option_scoring_batches(records, tok, "alpaca", 256)
    assert {c["record_index"] for c in cands} == set(range(12))  # GSM has no options
    for ri, rec in enumerate(records[:12]):
        mine = [c for c in cands if c["record_index"] == ri]
        opts = answer_options(rec)
        assert [c["option"] for c in mine] == opts and [c["option_index"] for c in mine] == list(range(len(opts)))
        prompt = tok(format_prompt(rec, "alpaca"))["input_ids"]
        for c in mine:
            n = len(prompt)
            assert c["input_ids"][:n] == prompt and c["labels"][:n] == [IGNORE_INDEX] * n
            assert c["labels"][n:] == c["input_ids"][n:] and c["input_ids"][-1] == tok.eos_token_id
            assert tok.decode(c["input_ids"][n:-1]) == f"the correct answer is {c['option']}"
        # the gold candidate is exactly the training example of the record
        ids, labels, _, _, _ = tokenize_instruction([rec], tok, "alpaca", 256)
        gold = mine[opts.index(rec["answer"])]
        assert gold["input_ids"] == ids[0] and gold["labels"] == labels[0]


def test_candidates_keep_response_when_too_long(tok):
    rec = dict(SIQA, instruction="context " * 200 + SIQA["instruction"])
    cands = option_scoring_batches([rec], tok, "alpaca", 64)
    assert len(cands) == 3
    for c in cands:
        assert len(c["input_ids"]) == 64 and c["input_ids"][0] == tok.bos_token_id
        resp = [t for t in c["labels"] if t != IGNORE_INDEX]
        assert tok.decode(resp[:-1]) == f"the correct answer is {c['option']}"


def test_sequence_logprobs_matches_manual_and_hf_loss(tok, model):
    cands = option_scoring_batches(demo("eval.json")[:3], tok, "alpaca", 256)
    batch = collate(cands[:5], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = sequence_logprobs(logits, batch["labels"])
    assert got.shape == (5,)
    for b in range(5):
        manual = 0.0
        for s in range(1, batch["labels"].shape[1]):
            t = int(batch["labels"][b, s])
            if t != IGNORE_INDEX:
                manual += float(F.log_softmax(logits[b, s - 1].double(), -1)[t])
        assert got[b].item() == pytest.approx(manual, abs=1e-4)
    # and equals -(HF mean loss) * (number of scored tokens) for one unpadded sequence
    one = collate(cands[:1], tok.pad_token_id)
    with torch.no_grad():
        loss = model(**one).loss
    n = int((one["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert got[0].item() == pytest.approx(-loss.item() * n, rel=1e-5)


def test_pick_options_chooses_highest_loglik(tok, model):
    records = demo("eval.json")[:6] + [GSM] + demo("eval.json")[6:8]
    cands = option_scoring_batches(records, tok, "alpaca", 256)
    scores = score_candidates(model, cands, tok.pad_token_id, batch_size=4, device="cpu")
    single = score_candidates(model, cands, tok.pad_token_id, batch_size=1, device="cpu")
    assert scores == pytest.approx(single, abs=1e-3)          # right padding does not change scores
    picks = pick_options(cands, scores)
    assert len(picks) == len(records) and picks[6] == -1      # GSM had no candidates
    for ri in range(len(records)):
        mine = [(s, c["option_index"]) for c, s in zip(cands, scores) if c["record_index"] == ri]
        if mine:
            assert picks[ri] == max(mine, key=lambda x: (x[0], -x[1]))[1]
    # synthetic: ties go to the first option, record 1 without candidates
    cs = [{"record_index": 0, "option_index": i} for i in range(3)] + \
         [{"record_index": 2, "option_index": i} for i in range(2)]
    assert pick_options(cs, [-3.0, -1.0, -1.0, -0.5, -0.2]) == [1, -1, 1]
    with pytest.raises(ValueError):
        pick_options(cs, [0.0])


# ------------------------------------------------------------------------------------ generation

def test_generate_answers_left_padding(tok, model):
    records = [demo("eval.json")[0], GSM, WINO]
    side = tok.padding_side
    batched = generate_answers(model, tok, records, "alpaca", max_new_tokens=6, device="cpu",
                               batch_size=3)
    alone = [generate_answers(model, tok, [r], "alpaca", max_new_tokens=6, device="cpu",
                              batch_size=1)[0] for r in records]
    assert len(batched) == 3 and all(isinstance(s, str) for s in batched)
    assert batched == alone                                    # left padding is invisible
    assert tok.padding_side == side                             # the tokenizer is untouched
    cut = generate_answers(model, tok, records[:1], "alpaca", max_new_tokens=2, device="cpu",
                           batch_size=1, max_prompt_length=16)
    assert len(cut) == 1
