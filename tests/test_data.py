"""Data loading, prompt/loss masking, truncation, errors, collate, StepPlan and tokenizers."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from goat_dist.train.config import DataConfig
from goat_dist.train.data import (ALPACA_TEMPLATE, IGNORE_INDEX, DataError, StepPlan, collate,
                                  corpus_texts, format_prompt, load_records, load_splits,
                                  prepare_data)
from goat_dist.train.tokenizer import (TokenizerError, check_tokenizer_fits, load_tokenizer,
                                       train_sentencepiece_tokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TRAIN = os.path.join(ROOT, "data", "demo", "train.json")
DEMO_EVAL = os.path.join(ROOT, "data", "demo", "eval.json")

RECORDS = [
    {"instruction": "Please answer with true or false: is the sky blue?\n\nAnswer format: true/false",
     "input": "", "output": "the correct answer is true", "answer": "true"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The answer is 5.",
     "answer": "5.0"},
    {"instruction": "Which is bigger?\n\nAnswer1: ant Answer2: whale\n\nAnswer format: answer1/answer2",
     "input": "", "output": "the correct answer is answer2", "answer": "answer2"},
]


@pytest.fixture(scope="module")
def demo_records():
    with open(DEMO_TRAIN) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tok(tmp_path_factory, demo_records):
    cfg = DataConfig(train_file=DEMO_TRAIN)
    return train_sentencepiece_tokenizer(corpus_texts(demo_records, cfg), 512,
                                         str(tmp_path_factory.mktemp("tok")))


def write_json(path, records):
    with open(path, "w") as f:
        json.dump(records, f)
    return str(path)


# ------------------------------------------------------------------------------------------ loading

def test_load_each_format(tmp_path):
    import datasets

    expected = [{k: r[k] for k in ("instruction", "input", "output", "answer")} for r in RECORDS]
    paths = [write_json(tmp_path / "list.json", RECORDS)]
    for name in ("lines.json", "lines.jsonl"):
        with open(tmp_path / name, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in RECORDS))
        paths.append(str(tmp_path / name))
    table = datasets.Dataset.from_list(RECORDS)
    table.to_csv(str(tmp_path / "r.csv"), index=False)
    table.to_parquet(str(tmp_path / "r.parquet"))
    paths += [str(tmp_path / "r.csv"), str(tmp_path / "r.parquet")]
    for p in paths:
        ds = load_records(p)
        rows = ds.to_list()
        if p.endswith(".csv"):  # CSV reads empty cells as null
            rows = [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]
        assert rows == expected, p


def test_load_demo_files():
    assert load_records(DEMO_TRAIN).num_rows == 600
    assert load_records(DEMO_EVAL).num_rows == 120


@pytest.mark.parametrize("name,content,needle", [
    ("missing.json", None, "does not exist"),
    ("garbled.json", '[{"instruction": "a", "output": ', "cannot be parsed"),
    ("garbled.jsonl", '{"instruction": "a"}\n{oops\n', "cannot be parsed"),
    ("broken.csv", 'instruction,output\n"a,b\n', "cannot be parsed"),
    ("broken.parquet", "not a parquet file", "cannot be parsed"),
    ("data.txt", "hello", "unknown extension"),
    ("empty.json", "[]", "no records"),
    ("zero.json", "", "no records"),
    ("header.csv", "instruction,output\n", "no records"),
])
def test_bad_files(tmp_path, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert needle in str(e.value) and name in str(e.value)


def test_missing_fields_named(tmp_path, tok):
    path = write_json(tmp_path / "bad.json", [{"question": "q", "output": "o"}])
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(train_file=path, eval_fraction=0), tok, "causal_lm", 0)
    msg = str(e.value)
    assert "bad.json" in msg and "'instruction'" in msg and "question" in msg and "found" in msg

    path = write_json(tmp_path / "cls.json", [{"sentence": "good", "label": 1}])
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(train_file=path, format="classification", eval_fraction=0),
                     tok, "seq_cls", 0)
    assert "cls.json" in str(e.value) and "'text'" in str(e.value) and "sentence" in str(e.value)

    path = write_json(tmp_path / "null.json", [{"instruction": "i", "output": None}])
    with pytest.raises(DataError, match="record 0 has no value"):
        prepare_data(DataConfig(train_file=path, eval_fraction=0), tok, "causal_lm", 0)


def test_format_must_fit_task(tok):
    with pytest.raises(DataError, match="does not fit task"):
        prepare_data(DataConfig(train_file=DEMO_TRAIN), tok, "seq_cls", 0)


# ---------------------------------------------------------------------------------------- prompting

def test_format_prompt_alpaca_and_custom():
    assert format_prompt(RECORDS[0], "alpaca") == ALPACA_TEMPLATE["prompt_no_input"].format(
        instruction=RECORDS[0]["instruction"])
    p = format_prompt(RECORDS[1], "alpaca")
    assert p.endswith("### Input:\n2 and 3\n\n### Response:\n") and "paired with an input" in p
    assert format_prompt({"instruction": "x {input} y", "input": "z"},
                         "Q: {instruction} / {input} {other}\nA:") == "Q: x {input} y / z {other}\nA:"
    with pytest.raises(DataError, match="no \\{input\\} field"):
        format_prompt(RECORDS[1], "Q: {instruction}\nA:")
    with pytest.raises(DataError, match="no \\{instruction\\}"):
        format_prompt(RECORDS[0], "Q: {question}")


# ---------------------------------------------------------------------------------- loss masking

def test_response_only_labels(tmp_path, tok):
    path = write_json(tmp_path / "r.json", RECORDS)
    data = prepare_data(DataConfig(train_file=path, eval_fraction=0, max_length=256), tok,
                        "causal_lm", 0)
    assert data.eval is None and data.eval_records == [] and data.num_truncated_train == 0
    assert data.train.column_names == ["input_ids", "labels"] and data.train.num_rows == 3
    for rec, row in zip(RECORDS, data.train):
        ids, labels = row["input_ids"], row["labels"]
        prompt = tok(format_prompt(rec, "alpaca"), add_special_tokens=True)["input_ids"]
        n = len(prompt)
        assert ids[:n] == prompt and ids[0] == tok.bos_token_id
        assert labels[:n] == [IGNORE_INDEX] * n
        assert labels[n:] == ids[n:]                      # exactly the response tokens
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[n:-1]) == rec["output"]     # response = output + eos


def test_truncation_counted_and_prompt_only_dropped(tmp_path, tok):
    long_output = dict(RECORDS[0], output="the correct answer is true " * 40)
    long_prompt = dict(RECORDS[0], instruction="why " * 300)
    path = write_json(tmp_path / "t.json", [RECORDS[0], long_output, long_prompt, RECORDS[2]])
    data = prepare_data(DataConfig(train_file=path, eval_file=path, max_length=96), tok,
                        "causal_lm", 0)
    assert data.num_truncated_train == 2 and data.num_dropped_train == 1
    assert data.num_truncated_eval == 2 and data.num_dropped_eval == 1
    assert data.train.num_rows == 3
    assert all(len(x) <= 96 for x in data.train["input_ids"])
    cut = data.train[1]
    assert len(cut["input_ids"]) == 96 and cut["labels"][-1] != IGNORE_INDEX  # response kept, cut
    # eval_records stay aligned with the eval rows (the dropped record left both)
    assert data.eval_records == [RECORDS[0], long_output, RECORDS[2]]

    path = write_json(tmp_path / "all_long.json", [long_prompt])
    with pytest.raises(DataError, match="no training example is left"):
        prepare_data(DataConfig(train_file=path, eval_fraction=0, max_length=96), tok, "causal_lm", 0)


def test_holdout_and_caps_deterministic(tok):
    cfg = DataConfig(train_file=DEMO_TRAIN, eval_fraction=0.1)
    a, b = load_splits(cfg, "causal_lm", 3), load_splits(cfg, "causal_lm", 3)
    assert a.train == b.train and a.eval == b.eval and len(a.eval) == 60 and len(a.train) == 540
    assert load_splits(cfg, "causal_lm", 4).eval != a.eval
    assert not {json.dumps(r) for r in a.eval} & {json.dumps(r) for r in a.train}
    capped = load_splits(DataConfig(train_file=DEMO_TRAIN, eval_fraction=0.1, max_train_samples=50,
                                    max_eval_samples=7), "causal_lm", 3)
    assert capped.train == a.train[:50] and capped.eval == a.eval[:7]


def test_classification(tmp_path, tok):
    rows = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"},
            {"text": "fine", "label": "pos"}, {"text": "word " * 200, "label": "neu"}]
    path = write_json(tmp_path / "c.json", rows)
    data = prepare_data(DataConfig(train_file=path, eval_file=path, format="classification",
                                   max_length=32), tok, "seq_cls", 0)
    assert data.label_names == ["neg", "neu", "pos"] and data.num_labels == 3
    assert data.train["labels"] == [2, 0, 2, 1] and data.num_truncated_train == 1
    assert max(len(x) for x in data.train["input_ids"]) == 32
    batch = collate([data.train[i] for i in range(4)], tok.pad_token_id)
    assert batch["labels"].tolist() == [2, 0, 2, 1] and batch["input_ids"].shape == (4, 32)

    ints = write_json(tmp_path / "i.json", [{"text": "a", "label": 1}, {"text": "b", "label": 0},
                                            {"text": "c", "label": 4}])
    data = prepare_data(DataConfig(train_file=ints, eval_fraction=0, format="classification"),
                        tok, "seq_cls", 0)
    assert data.label_names is None and data.train["labels"] == [1, 0, 4] and data.num_labels == 5

    other = write_json(tmp_path / "o.json", [{"text": "a", "label": "unseen"}])
    with pytest.raises(DataError, match="never occur"):
        prepare_data(DataConfig(train_file=path, eval_file=other, format="classification"),
                     tok, "seq_cls", 0)


def test_collate_causal():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())


# ----------------------------------------------------------------------------------------- StepPlan

@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("n,b,g", [(103, 2, 3), (64, 4, 1), (50, 1, 2)])
def test_step_plan_world_size_invariant(n, b, g, grouped):
    lengths = [random.Random(i).randrange(1, 300) for i in range(n)] if grouped else None
    one = StepPlan(n, b, 2 * g, world_size=1, rank=0, seed=7, lengths=lengths)
    two = [StepPlan(n, b, g, world_size=2, rank=r, seed=7, lengths=lengths) for r in range(2)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == n // (2 * b * g)
    for epoch in range(3):
        for t in range(one.steps_per_epoch):
            mine = one.micro_batches(epoch, t)
            split = [p.micro_batches(epoch, t) for p in two]
            assert sorted(map(tuple, mine)) == sorted(tuple(m) for ranks in split for m in ranks)
            # same accumulation step j on W ranks = micro-steps j*W .. j*W+W-1 of one process
            for j in range(g):
                assert [split[r][j] for r in range(2)] == mine[2 * j:2 * j + 2]
            assert all(len(m) == b for m in mine) and len(mine) == 2 * g


def test_step_plan_epochs_and_determinism():
    plan = StepPlan(40, 2, 2, world_size=2, rank=0, seed=1)
    others = StepPlan(40, 2, 2, world_size=2, rank=1, seed=1)
    assert plan.global_batch == 8 and plan.steps_per_epoch == 5
    epochs = []
    for e in range(2):
        seen = [i for t in range(5) for p in (plan, others) for m in p.micro_batches(e, t) for i in m]
        assert len(seen) == len(set(seen)) == 40          # no repeats, whole epoch covered
        epochs.append(seen)
    assert epochs[0] != epochs[1]                         # reshuffled
    again = StepPlan(40, 2, 2, world_size=2, rank=0, seed=1)
    assert again.micro_batches(1, 3) == plan.micro_batches(1, 3)
    assert StepPlan(40, 2, 2, 2, 0, seed=2).micro_batches(0, 0) != plan.micro_batches(0, 0)
    assert plan.position(0) == (0, 0) and plan.position(7) == (1, 2) and plan.position(10) == (2, 0)
    # resuming at a global step gives the same batch as running up to it
    assert plan.micro_batches(*plan.position(7)) == StepPlan(40, 2, 2, 2, 0, 1).micro_batches(1, 2)


def test_step_plan_group_by_length_keeps_global_batches_and_pads_less():
    """Grouping reorders examples inside each global batch only (so the token-mean loss of the
    step is unchanged), longest first, and cuts the padding of the micro-batches."""
    n, b, W, GA = 256, 4, 2, 2
    rng = random.Random(0)
    lengths = [rng.randrange(5, 120) for _ in range(n)]
    plain = [StepPlan(n, b, GA, W, r, seed=3) for r in range(W)]
    grouped = [StepPlan(n, b, GA, W, r, seed=3, lengths=lengths) for r in range(W)]
    padded = {False: 0, True: 0}
    for t in range(plain[0].steps_per_epoch):
        for key, plans in ((False, plain), (True, grouped)):
            micro = [m for j in range(GA) for p in plans for m in [p.micro_batches(0, t)[j]]]
            padded[key] += sum(b * max(lengths[i] for i in m) for m in micro)
            if key:
                order = [i for m in micro for i in m]
                assert [lengths[i] for i in order] == sorted((lengths[i] for i in order), reverse=True)
        assert sorted(i for p in plain for m in p.micro_batches(0, t) for i in m) == \
            sorted(i for p in grouped for m in p.micro_batches(0, t) for i in m)
    assert padded[True] < 0.8 * padded[False], padded
    with pytest.raises(ValueError, match="3 lengths for 256 examples"):
        StepPlan(n, b, GA, W, 0, seed=3, lengths=[1, 2, 3])


def test_step_plan_too_little_data():
    with pytest.raises(DataError, match="cannot fill one global batch of b x W x GA = 4 x 2 x 2 = 16"):
        StepPlan(15, 4, 2, world_size=2, rank=0, seed=0)


# ---------------------------------------------------------------------------------------- tokenizers

def test_tokenizer_deterministic_and_reloads(tmp_path, demo_records, tok):
    from transformers import AutoTokenizer

    texts = corpus_texts(demo_records, DataConfig(train_file=DEMO_TRAIN))
    a = train_sentencepiece_tokenizer(texts, 512, str(tmp_path / "a"))
    b = train_sentencepiece_tokenizer(texts, 512, str(tmp_path / "b"))
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()
    assert a(texts[:20])["input_ids"] == b(texts[:20])["input_ids"]
    assert len(a) == 512 and a.pad_token_id == 0 and a.unk_token_id == 1
    assert a.bos_token_id == 2 and a.eos_token_id == 3

    re = AutoTokenizer.from_pretrained(str(tmp_path / "a"), local_files_only=True)
    assert re(texts[:20])["input_ids"] == a(texts[:20])["input_ids"] and re.pad_token_id == 0
    # transformers ids == raw sentencepiece ids, newlines survive the round trip
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "a" / "tokenizer.model"))
    assert [[2] + x for x in sp.encode(texts[:20])] == a(texts[:20])["input_ids"]
    assert a.decode(a(texts[0])["input_ids"], skip_special_tokens=True) == texts[0]

    from_model = load_tokenizer(str(tmp_path / "a" / "tokenizer.model"))
    assert from_model(texts[:5])["input_ids"] == a(texts[:5])["input_ids"]
    assert from_model.pad_token is not None
    assert load_tokenizer(str(tmp_path / "a"))(texts[:5])["input_ids"] == a(texts[:5])["input_ids"]


def test_tokenizer_errors(tmp_path, tok):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(TokenizerError, match="not a sentencepiece"):
        load_tokenizer(str(tmp_path / "x.txt"))
    with pytest.raises(TokenizerError, match="empty"):
        train_sentencepiece_tokenizer(["", ""], 100, str(tmp_path / "t"))
    with pytest.warns(UserWarning, match="supports only"):
        small = train_sentencepiece_tokenizer(["hello world"], 512, str(tmp_path / "s"))
    assert len(small) < 512
    check_tokenizer_fits(tok, 512)
    with pytest.raises(TokenizerError, match="512 tokens.*only 500 rows.*model's own tokenizer or resize"):
        check_tokenizer_fits(tok, 500)
