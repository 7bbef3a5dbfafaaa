"""Chat data (goat_dist/train/chat.py) and the other data sources of load_records.

Oracle of the loss mask: transformers' own ``apply_chat_template(..., return_assistant_tokens_mask=
True)`` over a ``{% generation %}``-marked copy of the template, after checking that the marked
copy renders exactly the same text as the template itself. Checked for SmolLM2-Instruct's template
(copied below from models/SmolLM2-135M-Instruct/chat_template.jinja: the model is not installed in
CI) and for a template written here (bos from the template, another turn layout).
"""

from __future__ import annotations

import json
import os

import pytest

from goat_dist.train.chat import segments, to_messages, tokenize_chat
from goat_dist.train.data import DataError, IGNORE_INDEX, load_records
from tests.train_helpers import DEMO_DATA, run_train, tiny_config

# models/SmolLM2-135M-Instruct/chat_template.jinja, verbatim.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
# The same template with the assistant's reply (+ the closing <|im_end|>\n) marked for
# transformers' assistant mask.
SMOLLM2_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endgeneration %}{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
# A template written for this test: bos from the template, "### Role:" headers, eos after replies,
# a system prompt only when given. Its generation markers are ignored by plain rendering; they
# mark what goat_dist learns of an assistant turn: everything the template writes from the reply
# to the start of the next message (reply, eos, separator), as in the SmolLM2 copy above.
TEST_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### User:\n' + m['content'] + '\n' }}"
    "{% else %}{{ '### Assistant:\n' }}{% generation %}{{ m['content'] + eos_token + '\n' }}"
    "{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}")

DIALOGUES = [
    [{"role": "user", "content": "Is the sky blue?"}, {"role": "assistant", "content": "true"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Which is a mammal: answer1 or answer2?"},
     {"role": "assistant", "content": "the correct answer is answer1"},
     {"role": "user", "content": "And a bird?"},
     {"role": "assistant", "content": "the correct answer is answer2"}],
    [{"role": "user", "content": "Say 3 words."}, {"role": "assistant", "content": "one two three"},
     {"role": "user", "content": "Again"}, {"role": "assistant", "content": "four five six"},
     {"role": "user", "content": "Once more"}, {"role": "assistant", "content": "seven eight nine"}],
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The sentencepiece tokenizer goat_dist trains for presets, + SmolLM2's chat control tokens."""
    from goat_dist.train.data import corpus_texts, load_splits
    from goat_dist.train.config import DataConfig
    from goat_dist.train.tokenizer import train_sentencepiece_tokenizer
    cfg = DataConfig(train_file=os.path.join(DEMO_DATA, "train.json"), max_train_samples=200)
    texts = corpus_texts(load_splits(cfg, "causal_lm", 0).train, cfg)
    texts += [m["content"] for d in DIALOGUES for m in d] + ["### User: Assistant: system"]
    tok = train_sentencepiece_tokenizer(texts, 300, str(tmp_path_factory.mktemp("tok")))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def _oracle(tok, marked: str, messages):
    """(ids, labels) from transformers' own rendering + assistant mask."""
    enc = tok.apply_chat_template(messages, chat_template=marked, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids = list(enc["input_ids"])
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, enc["assistant_masks"])]


@pytest.mark.parametrize("template,marked", [(SMOLLM2_TEMPLATE, SMOLLM2_MARKED),
                                             (TEST_TEMPLATE, TEST_TEMPLATE)],
                         ids=["smollm2", "written_here"])
def test_labels_mask_exactly_the_assistant_tokens(tokenizer, template, marked):
    for d in DIALOGUES:  # the marked copy is the same template
        assert tokenizer.apply_chat_template(d, chat_template=marked, tokenize=False) == \
            tokenizer.apply_chat_template(d, chat_template=template, tokenize=False)
    recs = [{"messages": d} for d in DIALOGUES]
    ids, labels, kept, trunc, dropped = tokenize_chat(recs, tokenizer, template, 4096, "mem")
    assert kept == [0, 1, 2] and trunc == dropped == 0
    for d, i, l in zip(DIALOGUES, ids, labels):
        text = "".join(t for t, _ in segments(tokenizer, template, d, "mem"))
        assert text == tokenizer.apply_chat_template(d, chat_template=template, tokenize=False)
        ref_ids, ref_labels = _oracle(tokenizer, marked, d)
        assert i == ref_ids
        assert l == ref_labels
        n_asst = sum(m["role"] == "assistant" for m in d)
        # every assistant turn is learned (multi-turn), nothing else is
        learned = tokenizer.decode([t for t in l if t != IGNORE_INDEX])
        assert all(m["content"] in learned for m in d if m["role"] == "assistant")
        assert not any(m["content"] in learned for m in d if m["role"] != "assistant")
        assert learned.count(tokenizer.eos_token if template is TEST_TEMPLATE else "<|im_end|>") == n_asst


def test_sharegpt_and_alpaca_records_render_like_messages(tokenizer):
    d = DIALOGUES[1]
    tag = {"system": "system", "user": "human", "assistant": "gpt"}
    share = {"conversations": [{"from": tag[m["role"]], "value": m["content"]} for m in d[1:]],
             "system": d[0]["content"]}
    alpaca = {"instruction": "Is it\nraining?", "input": "in Paris", "output": "false"}
    as_msgs = [{"role": "user", "content": "Is it\nraining?\n\nin Paris"},
               {"role": "assistant", "content": "false"}]
    got = tokenize_chat([share, alpaca], tokenizer, SMOLLM2_TEMPLATE, 4096, "mem")
    ref = tokenize_chat([{"messages": d}, {"messages": as_msgs}], tokenizer, SMOLLM2_TEMPLATE,
                        4096, "mem")
    assert got[:2] == ref[:2]


@pytest.mark.parametrize("record,match", [
    ({"messages": [{"role": "user", "content": "a"}]}, "ending with an assistant turn"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
     "turns must be"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "turns must be"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "observation", "value": "b"}]},
     "observation"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]},
     "string content"),
    ({"text": "a"}, "no 'messages'"),
])
def test_bad_records_name_the_record(record, match):
    with pytest.raises(DataError, match=match) as e:
        to_messages(record, 7, "chats.jsonl")
    assert "record 7" in str(e.value) and "chats.jsonl" in str(e.value)


def test_no_template_and_unstable_template_are_clear_errors(tokenizer):
    tok = tokenizer
    saved, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(DataError, match="data.chat_template"):
            tokenize_chat([{"messages": DIALOGUES[0]}], tok, None, 256, "mem")
    finally:
        tok.chat_template = saved
    # renders only the last turn: the beginning of a dialogue is not a prefix of the whole
    last_only = "{{ messages[-1]['role'] + ': ' + messages[-1]['content'] }}"
    with pytest.raises(DataError, match="prefix"):
        tokenize_chat([{"messages": DIALOGUES[1]}], tok, last_only, 256, "mem")
    with pytest.raises(DataError, match="neither an existing file"):
        tokenize_chat([{"messages": DIALOGUES[0]}], tok, "no/such/template.jinja", 256, "mem")


def test_truncation_is_counted_and_never_leaves_a_dangling_prompt(tokenizer):
    d = DIALOGUES[2]
    full_ids, full_labels, *_ = tokenize_chat([{"messages": d}], tokenizer, TEST_TEMPLATE, 4096, "m")
    full_ids, full_labels = full_ids[0], full_labels[0]
    starts = [j for j in range(1, len(full_labels))
              if full_labels[j] != IGNORE_INDEX and full_labels[j - 1] == IGNORE_INDEX]
    ends = [j for j in range(len(full_labels)) if full_labels[j] != IGNORE_INDEX
            and (j + 1 == len(full_labels) or full_labels[j + 1] == IGNORE_INDEX)]
    assert len(starts) == 3 and len(ends) == 3
    # cut inside the 3rd assistant turn's prompt: kept up to the end of the 2nd reply, counted
    cut = starts[2] - 2
    ids, labels, kept, trunc, dropped = tokenize_chat([{"messages": d}], tokenizer, TEST_TEMPLATE,
                                                      cut, "m")
    assert (kept, trunc, dropped) == ([0], 1, 0)
    assert ids[0] == full_ids[:ends[1] + 1] and labels[0] == full_labels[:ends[1] + 1]
    # cut inside the 2nd reply: the partial reply is learned, counted as truncated
    cut = starts[1] + 2
    ids, labels, kept, trunc, dropped = tokenize_chat([{"messages": d}], tokenizer, TEST_TEMPLATE,
                                                      cut, "m")
    assert (trunc, dropped) == (1, 0) and ids[0] == full_ids[:cut] and labels[0] == full_labels[:cut]
    # the first reply's prompt fills max_length: dropped, counted twice (truncated and dropped)
    ids, labels, kept, trunc, dropped = tokenize_chat([{"messages": d}], tokenizer, TEST_TEMPLATE,
                                                      starts[0], "m")
    assert (ids, kept, trunc, dropped) == ([], [], 1, 1)


def _write_chats(path, n=48):
    """A JSONL chat file built from the demo's Alpaca records (two-turn dialogues)."""
    with open(os.path.join(DEMO_DATA, "train.json")) as f:
        recs = json.load(f)[:n]
    with open(path, "w") as f:
        for a, b in zip(recs[0::2], recs[1::2]):
            conv = [{"from": "human", "value": a["instruction"]}, {"from": "gpt", "value": a["output"]},
                    {"from": "human", "value": b["instruction"]}, {"from": "gpt", "value": b["output"]}]
            f.write(json.dumps({"conversations": conv}) + "\n")
    return path


@pytest.mark.slow
def test_train_chat_format_end_to_end(tmp_path):
    """goat-train on ShareGPT dialogues with a template file; without one: exit 2, clear message."""
    data = _write_chats(str(tmp_path / "chats.jsonl"))
    tmpl = tmp_path / "template.jinja"
    tmpl.write_text(TEST_TEMPLATE)
    out = str(tmp_path / "run")
    data_cfg = {"train_file": data, "eval_file": None, "eval_fraction": 0.25, "format": "chat",
                "max_length": 160, "max_train_samples": 0, "max_eval_samples": 0}
    bad = tiny_config(str(tmp_path / "bad.yaml"), str(tmp_path / "bad"), data=data_cfg)
    assert run_train(["--config", bad], world=1) == 2
    cfg = tiny_config(str(tmp_path / "c.yaml"), out, data={**data_cfg, "chat_template": str(tmpl)},
                      train={"max_steps": 3})
    assert run_train(["--config", cfg], world=1) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["global_step"] == 3
    assert "eval/loss" in summary["final_metrics"]


# --------------------------------------------------------------------- other sources of records

def test_save_to_disk_folders_load(tmp_path):
    import datasets
    recs = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"))
    assert load_records(str(tmp_path / "ds")).to_list() == recs
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs)}).save_to_disk(str(tmp_path / "dd"))
    assert load_records(str(tmp_path / "dd")).to_list() == recs
    two = datasets.DatasetDict({"train": datasets.Dataset.from_list(recs),
                                "test": datasets.Dataset.from_list(recs[:2])})
    two.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match="point data.train_file"):
        load_records(str(tmp_path / "two"))
    assert load_records(str(tmp_path / "two" / "test")).to_list() == recs[:2]
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_records(str(tmp_path / "plain"))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    # scripts/test.sh sets HF_DATASETS_OFFLINE / HF_HUB_OFFLINE; datasets reads them at import
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    with pytest.raises(DataError, match="HF_HUB_OFFLINE"):
        load_records("someone/some_dataset:train")
    with pytest.raises(DataError, match="does not exist"):
        load_records("data/missing.json")
