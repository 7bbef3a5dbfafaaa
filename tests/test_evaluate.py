"""Answer parsing (LLM-Adapters format) and the trainer's accuracy (goat_dist/train/evaluate.py),
which runs goat_dist's lm-eval tasks; option scoring itself is checked against a brute-force
reference in tests/test_lm_eval_tasks.py."""

from __future__ import annotations


import pytest
import torch

from goat_dist.eval.answers import (
    answer_options,
    candidate_response,
    extract_answer,
    is_correct,
)
from goat_dist.train.config import DataConfig
from goat_dist.train.data import corpus_texts, format_prompt
from goat_dist.train.evaluate import accuracy
from goat_dist.train.tokenizer import train_sentencepiece_tokenizer
from tests.eval_helpers import GSM, demo


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


# ----------------------------------------------------------------------- the trainer's accuracy

def test_candidates_replace_the_gold_option():
    rec = demo("eval.json")[0]
    opts = answer_options(rec)
    assert [candidate_response(rec, opts, o) for o in opts] == [f"the correct answer is {o}" for o in opts]
    assert candidate_response({"output": "", "answer": "true"}, ["true", "false"], "false") == \
        "the correct answer is false"


def _loglik(model, tok, context, continuation):
    ctx, whole = tok(context)["input_ids"], tok(context + continuation)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_trainer_accuracy_options_matches_brute_force(tok, model):
    records = demo("eval.json")[:6] + [GSM]                   # GSM has no options: not counted
    got = accuracy(model, tok, records, "options", "alpaca", 512, 16, batch_size=4)
    assert got["eval/accuracy_n"] == 6
    correct = 0
    for r in records[:6]:
        opts = answer_options(r)
        prompt = format_prompt(r, "alpaca").rstrip("\n")      # lm-eval moves trailing space right
        lls = [_loglik(model, tok, prompt, "\n" + candidate_response(r, opts, o) + tok.eos_token)
               for o in opts]
        correct += opts[max(range(len(lls)), key=lambda i: (lls[i], -i))] == r["answer"]
    assert got["eval/accuracy"] == pytest.approx(correct / 6)


def test_trainer_accuracy_generate_matches_greedy_decoding(tok, model):
    records = [demo("eval.json")[0], GSM, WINO]
    got = accuracy(model, tok, records, "generate", "alpaca", 512, 5, batch_size=2)
    correct = 0
    for r in records:
        ids = tok(format_prompt(r, "alpaca"), return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += is_correct(extract_answer(text, answer_options(r)), r["answer"])
    assert got == {"eval/accuracy": pytest.approx(correct / 3), "eval/accuracy_n": 3.0}
    assert accuracy(model, tok, [GSM], "options", "alpaca", 512, 5, batch_size=2) == {}
