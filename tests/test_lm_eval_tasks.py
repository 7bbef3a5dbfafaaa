"""goat_dist's lm-eval tasks on a tiny Llama against brute-force references.

The reference scores one (context, continuation) pair at a time, unbatched and unpadded, by
summing log-softmax over the continuation tokens: lm-eval's batching, length sorting, padding,
request building and metric aggregation must reproduce it, and the prediction must be its argmax.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from goat_dist.eval.lm import make_lm
from goat_dist.eval.records import COMMONSENSE_SOURCES, standard_doc
from goat_dist.eval.results import predictions, run_evaluation, task_metrics
from goat_dist.eval.tasks import TASK_GROUPS, EvalInputError, build_tasks, resolve_tasks
from goat_dist.train.data import format_prompt
from tests.eval_helpers import GSM, build_tiny_model_folder, demo, load_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_DATA = os.path.join(ROOT, "data", "eval")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return load_tiny(build_tiny_model_folder(str(tmp_path_factory.mktemp("tiny_llama"))))


def brute_loglik(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), one sequence, no padding (lm-eval's definition: the
    context's trailing whitespace moves to the continuation; the pair is tokenized jointly)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    assert whole[:len(ctx)] == ctx
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_every_committed_test_set_parses_to_the_standard_form():
    for src in COMMONSENSE_SOURCES:
        with open(os.path.join(EVAL_DATA, src, "test.json")) as f:
            records = json.load(f)
        for r in records:
            d = standard_doc(r, src)
            assert 0 <= d["gold"] < len(d["choices"]) and all(d["choices"])
    arc = standard_doc(demo("eval.json")[0], "ARC-Easy")
    assert arc["query"].startswith("Question: Plants grow best") and arc["query"].endswith("\nAnswer:")
    assert arc["choices"] == ["grains of sand", "lumps of clay", "layers of gravel",
                              "decaying plants and animals"] and arc["gold"] == 3


def test_task_names_and_groups():
    assert resolve_tasks(["commonsense_std"]) == TASK_GROUPS["commonsense_std"]
    assert len(TASK_GROUPS["commonsense"]) == 7 and len(TASK_GROUPS["arithmetic"]) == 3
    assert resolve_tasks(["cs_arc_easy,math_gsm8k", "cs_arc_easy"]) == ["cs_arc_easy", "math_gsm8k"]
    with pytest.raises(EvalInputError, match="unknown task 'arc'"):
        resolve_tasks(["arc"])


def _records_by_source(n: int) -> dict[str, list[dict]]:
    out = {}
    for src in ("boolq", "ARC-Easy", "winogrande", "piqa"):
        with open(os.path.join(EVAL_DATA, src, "test.json")) as f:
            out[src] = json.load(f)[:n]
    return out


def test_option_scoring_and_standard_form_equal_brute_force(tiny_lm):
    model, tok = tiny_lm
    recs = _records_by_source(5)
    names = ["cs_boolq", "cs_arc_easy", "cs_std_arc_easy", "cs_std_boolq", "cs_std_winogrande",
             "cs_std_piqa"]
    src_of = {"cs_boolq": "boolq", "cs_arc_easy": "ARC-Easy", "cs_std_arc_easy": "ARC-Easy",
              "cs_std_boolq": "boolq", "cs_std_winogrande": "winogrande", "cs_std_piqa": "piqa"}
    tasks = build_tasks(names, EVAL_DATA, eos_text=tok.eos_token,
                        records={n: recs[src_of[n]] for n in names})
    lm = make_lm(model, tok, batch_size=3, max_length=512)   # batches mix lengths and docs
    res = run_evaluation(lm, tasks, log_samples=True, bootstrap_iters=100000)
    metrics = task_metrics(res)
    for name in names:
        preds = predictions(res["samples"][name])
        correct = []
        for i, r in enumerate(recs[src_of[name]]):
            if name.startswith("cs_std"):
                d = standard_doc(r, src_of[name])
                if src_of[name] == "winogrande":   # partial scoring: contexts differ, continuation shared
                    pairs = [(c, " " + d["continuation"]) for c in d["contexts"]]
                else:
                    pairs = [(d["query"], " " + c) for c in d["choices"]]
                gold = d["gold"]
            else:
                opts = ["true", "false"] if src_of[name] == "boolq" else \
                    [f"answer{k}" for k in range(1, 5)]
                pairs = [(format_prompt(r, "alpaca"), f"the correct answer is {o}{tok.eos_token}")
                         for o in opts]
                gold = opts.index(r["answer"])
            ref = [brute_loglik(model, tok, c, x) for c, x in pairs]
            got = [s for s in res["samples"][name] if s["doc_id"] == i][0]
            assert [x[0] for x in got["filtered_resps"]] == pytest.approx(ref, abs=1e-3), (name, i)
            best = max(range(len(ref)), key=lambda k: (ref[k], -k))
            assert preds[i] == best
            correct.append(float(best == gold))
        assert metrics[name]["acc"] == pytest.approx(sum(correct) / len(correct))
        assert "acc_stderr" in metrics[name]


def test_generation_tasks_extract_like_llm_adapters(tiny_lm):
    model, tok = tiny_lm
    recs = demo("eval.json")[:3]
    tasks = build_tasks(["cs_gen_arc_easy", "math_gsm8k"], EVAL_DATA, eos_text=tok.eos_token,
                        records={"cs_gen_arc_easy": recs, "math_gsm8k": [GSM, dict(GSM, answer="1")]})
    for t in tasks.values():  # short generations keep the test fast
        t.config.generation_kwargs["max_gen_toks"] = 6
    res = run_evaluation(make_lm(model, tok, batch_size=2, max_length=512), tasks, log_samples=True)
    from goat_dist.eval.answers import answer_options, extract_answer, is_correct
    for name, rs in (("cs_gen_arc_easy", recs), ("math_gsm8k", [GSM, dict(GSM, answer="1")])):
        for s in res["samples"][name]:
            r = rs[s["doc_id"]]
            text = s["resps"][0][0]
            want = extract_answer(text, answer_options(r))
            assert s["filtered_resps"][0] == want
            assert s["acc"] == float(is_correct(want, r["answer"]))


def test_bf16_model_keeps_an_fp32_output_head(tmp_path):
    from goat_dist.eval.lm import load_model, resolve_dtype

    folder = build_tiny_model_folder(str(tmp_path / "tiny"))
    m16, tok, _ = load_model(folder, None, torch.bfloat16)
    m32, _, _ = load_model(folder, None, torch.float32)
    assert m16.get_output_embeddings().weight.dtype == torch.float32
    assert m16.get_input_embeddings().weight.dtype == torch.bfloat16
    make_lm(m16, tok)                          # HFLM ties weights: the fp32 head must survive
    assert m16.get_output_embeddings().weight.dtype == torch.float32
    ids = torch.tensor([tok("Question: is the sky blue?\nAnswer: yes")["input_ids"]])
    with torch.no_grad():
        l16, l32 = m16(ids).logits, m32(ids).logits
    assert l16.dtype == torch.float32 and (l16 - l32).abs().max() < 0.05
    assert resolve_dtype("float32") == torch.float32
    with pytest.raises(EvalInputError):
        resolve_dtype("int8")


def test_bf16_model_computes_its_adapter_in_bf16_and_routes_in_fp32(tmp_path):
    """A bf16 evaluation runs the GOAT experts in bf16 (not the float32 they are saved in: that
    made every adapted layer cast up and ran a SmolLM2 forward 1.15x slower), keeps the router in fp32 and
    stays within bf16 rounding of the fp32 model; a float32 evaluation keeps float32."""
    from transformers import AutoModelForCausalLM

    from goat_dist import GoatConfig, get_goat_model
    from goat_dist.eval.lm import load_model
    from goat_dist.layer import GoatLinear

    folder = build_tiny_model_folder(str(tmp_path / "tiny"))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    get_goat_model(base, GoatConfig(r=8, lora_alpha=16, num_experts=4, top_k=2, init="goat",
                                    target_modules=["q_proj", "v_proj", "up_proj"])
                   ).save_pretrained(str(tmp_path / "adapter"))
    m16, tok, _ = load_model(folder, str(tmp_path / "adapter"), torch.bfloat16)
    m32, _, _ = load_model(folder, str(tmp_path / "adapter"), torch.float32)
    for m, dt in ((m16, torch.bfloat16), (m32, torch.float32)):
        layers = [mod for mod in m.modules() if isinstance(mod, GoatLinear)]
        assert len(layers) == 3 * 2                            # tiny llama: 2 layers
        for lin in layers:
            assert lin.lora_A.dtype == lin.lora_B.dtype == dt
            assert lin.res_A.dtype == lin.res_B.dtype == dt
            assert lin.lora_router.weight.dtype == torch.float32
    ids = torch.tensor([tok("Question: is the sky blue?\nAnswer: yes")["input_ids"]])
    with torch.no_grad():
        l16, l32 = m16(ids).logits, m32(ids).logits
    assert (l16 - l32).abs().max() < 0.05
