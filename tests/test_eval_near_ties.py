"""Near-tie rescoring (goat_dist/eval/near_ties.py, GoatHFLM.loglikelihood): which records are near
ties, and that a bf16 evaluation's rescored records carry the float32 evaluation's numbers (within
fp32 rounding: the rescored requests are batched differently)."""

from __future__ import annotations

import json
import os

import pytest

from goat_dist.eval.cli import main
from goat_dist.eval.near_ties import near_tie_indices
from tests.eval_helpers import build_tiny_model_folder

# fp32 numbers of one request differ by up to ~5e-6 with the batch it is scored in (padding,
# GEMM blocking); bf16 moves them by 5e-4 or more on this model: 1e-4 tells the two apart
FP32 = 1e-4


def test_near_tie_indices_raw_and_per_character_margins():
    keys = ["a", "a", "b", "b", "b", "c", "d", "d"]
    conts = [" yes", " no", " x", " y", " z", " only", " a long option", " b"]
    lls = [-1.00, -1.05,      # a: raw gap 0.05
           -2.0, -3.0, -3.5,  # b: raw gap 1.0, per character 0.5
           -0.1,              # c: one option, never a tie
           -7.0, -0.5]        # d: raw gap 6.5; per character -0.5 (14 chars) vs -0.25 (2 chars)
    assert near_tie_indices(keys, conts, lls, 0.1) == [0, 1]
    assert near_tie_indices(keys, conts, lls, 0.45) == [0, 1]   # d: 0.25 >= 0.45 / 2
    # d is a tie by its per-character gap only (0.25 < 0.55 / 2), b not yet (1.0 >= 0.55)
    assert near_tie_indices(keys, conts, lls, 0.55) == [0, 1, 6, 7]
    assert near_tie_indices(keys, conts, lls, 1.1) == [0, 1, 2, 3, 4, 6, 7]
    assert near_tie_indices(keys, conts, lls, 0.0) == []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny Llama evaluated in float32, and in bf16 with every / no / default near ties
    rescored, on multiple-choice tasks of both forms (shared context, WinoGrande's shared
    continuation) and the LLM-Adapters option form."""
    tmp = tmp_path_factory.mktemp("near_ties")
    folder = build_tiny_model_folder(str(tmp / "tiny"))
    out = {}
    for name, extra in [("fp32", ["--dtype", "float32"]),
                        ("all", ["--dtype", "bfloat16", "--rescore_margin", "1e9"]),
                        ("none", ["--dtype", "bfloat16", "--rescore_margin", "0"]),
                        ("default", ["--dtype", "bfloat16"])]:
        d = str(tmp / name)
        assert main(["--model", folder, "--tasks", "cs_std_arc_easy", "cs_std_winogrande",
                     "cs_arc_easy", "--limit", "12", "--log_samples", "--output_dir", d]
                    + extra) == 0
        with open(os.path.join(d, "eval_results.json")) as f:
            res = json.load(f)
        with open(os.path.join(d, "samples.jsonl")) as f:
            samples = {(s["task"], s["doc_id"]): s for s in map(json.loads, f)}
        out[name] = (res, samples)
    return out


def test_rescored_records_carry_the_float32_numbers(runs):
    fp32_res, fp32 = runs["fp32"]
    assert fp32_res["rescored_in_float32"] is None
    res, every = runs["all"]
    assert res["rescored_in_float32"]["records"] == len(fp32) == 36
    for key, s in fp32.items():
        assert every[key]["loglikelihoods"] == pytest.approx(s["loglikelihoods"], abs=FP32), key
        assert every[key]["prediction"] == s["prediction"], key
    assert res["metrics"] == fp32_res["metrics"]


def test_no_margin_no_rescoring_and_bf16_differs(runs):
    res, none = runs["none"]
    assert res["rescored_in_float32"] == {"margin_nats": 0.0, "records": 0, "requests": 0,
                                          "of_requests": res["rescored_in_float32"]["of_requests"]}
    _, fp32 = runs["fp32"]
    assert all(none[k]["loglikelihoods"] != s["loglikelihoods"] for k, s in fp32.items())


def test_default_margin_rescores_the_near_ties_only(runs):
    """At the default margin each record carries either all its float32 numbers (rescored) or
    all its bf16 ones; the rescored count is reported, and no record left in bf16 has its best
    two options closer than the margin."""
    from goat_dist.eval.cli import RESCORE_MARGIN

    res, default = runs["default"]
    _, none = runs["none"]
    _, fp32 = runs["fp32"]
    rescored = 0
    for key, s in default.items():
        lls = s["loglikelihoods"]
        if lls == pytest.approx(fp32[key]["loglikelihoods"], abs=FP32):
            rescored += 1
            continue
        assert lls == none[key]["loglikelihoods"], key
        best = sorted(lls, reverse=True)
        assert best[0] - best[1] >= RESCORE_MARGIN, key
    assert res["rescored_in_float32"]["records"] == rescored > 0
