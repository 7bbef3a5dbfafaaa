"""goat_dist's lm-evaluation-harness tasks: local test files only, nothing from a hub.

Four groups (``TASK_GROUPS``), each task a ``lm_eval.api.task.ConfigurableTask`` built from a
config dict whose dataset is the records of a local JSON file (``custom_dataset``):

* ``commonsense`` (``cs_<source>``): the seven commonsense test sets in the LLM-Adapters
  instruction form we train on, same Alpaca prompt as training, **option scoring**: each option's
  continuation is the record's output with the gold option replaced (``the correct answer is
  answer3``) followed by the tokenizer's eos text, exactly the tokens training puts the loss on;
  metric ``acc``.
* ``commonsense_gen`` (``cs_gen_<source>``): the paper's protocol on the same records: greedy
  generation, then LLM-Adapters answer extraction as an lm-eval filter (``goat_extract``);
  metric ``acc``.
* ``commonsense_std`` (``cs_std_<source>``): the same test sets in the standard zero-shot form of
  the harness's own tasks (``Question: ...\\nAnswer:`` + each choice text, records.py);
  metrics ``acc`` and ``acc_norm``; comparable with published lm-eval figures.
* ``arithmetic`` (``math_<source>``): GSM8K, AddSub, SVAMP: greedy generation, last number
  extracted by the same filter, correct within NUMERIC_TOLERANCE; metric ``acc``.

lm-eval supplies everything else: request building, batching, length sorting, generation,
filters, metrics and stderr. Averages over a group are the unweighted mean of ``acc`` (the
papers' convention), computed in results.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..train.data import format_prompt
from .answers import answer_options, candidate_response, extract_answer, is_correct
from .records import RecordFormatError, standard_doc

# <repo>/data/eval: the committed test sets (scripts/make_commonsense_data.py); an installed
# (non-editable) package passes --data-dir instead.
DEFAULT_DATA_DIR = str(Path(__file__).resolve().parents[2] / "data" / "eval")


class EvalInputError(ValueError):
    """Bad evaluation input (task name, data file, model folder); the message names the fix."""


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task.

    Attributes:
        name: lm-eval task name (``cs_arc_easy``).
        kind: ``options`` (LLM-Adapters option scoring), ``generate`` (LLM-Adapters generate +
            extract), ``std`` (standard zero-shot multiple choice) or ``math`` (generate + last number).
        source: the dataset folder under the data dir (``ARC-Easy``); the test file is
            ``<data_dir>/<source>/test.json``.
    """

    name: str
    kind: str
    source: str


_SHORT = {"boolq": "boolq", "piqa": "piqa", "social_i_qa": "siqa", "winogrande": "winogrande",
          "ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge", "openbookqa": "obqa"}
_MATH = {"gsm8k": "gsm8k", "AddSub": "addsub", "SVAMP": "svamp"}

TASKS: dict[str, TaskSpec] = {}
TASK_GROUPS: dict[str, list[str]] = {"commonsense": [], "commonsense_gen": [],
                                     "commonsense_std": [], "arithmetic": []}
for _src, _short in _SHORT.items():
    for _group, _prefix, _kind in (("commonsense", "cs_", "options"),
                                   ("commonsense_gen", "cs_gen_", "generate"),
                                   ("commonsense_std", "cs_std_", "std")):
        TASKS[_prefix + _short] = TaskSpec(_prefix + _short, _kind, _src)
        TASK_GROUPS[_group].append(_prefix + _short)
for _src, _short in _MATH.items():
    TASKS["math_" + _short] = TaskSpec("math_" + _short, "math", _src)
    TASK_GROUPS["arithmetic"].append("math_" + _short)

GEN_TOKENS = {"generate": 32, "math": 256}  # LLM-Adapters: answers are one sentence / a short derivation


def resolve_tasks(names: list[str]) -> list[str]:
    """Task and group names -> task names (groups expanded, order kept, duplicates dropped).

    Raises:
        EvalInputError: an unknown name (the message lists the groups and tasks).
    """
    out: list[str] = []
    for n in names:
        for part in [p.strip() for p in n.split(",") if p.strip()]:
            if part in TASK_GROUPS:
                out += TASK_GROUPS[part]
            elif part in TASKS:
                out.append(part)
            else:
                raise EvalInputError(
                    f"unknown task {part!r}; choose groups {sorted(TASK_GROUPS)} or tasks "
                    f"{sorted(TASKS)} (comma-separated or repeated)")
    if not out:
        raise EvalInputError("no task given; pass --tasks, e.g. --tasks commonsense_std")
    return list(dict.fromkeys(out))


def task_file(spec: TaskSpec, data_dir: str) -> str:
    return os.path.join(data_dir, spec.source, "test.json")


def load_records(path: str) -> list[dict]:
    """The records of a local JSON list / JSONL file, checked.

    Raises:
        EvalInputError: a missing or unreadable file, no records, or records without
            ``instruction`` / ``answer``.
    """
    if not os.path.isfile(path):
        raise EvalInputError(f"test file {path} does not exist; build data/eval with "
                             f"`python scripts/make_commonsense_data.py` or pass --data-dir")
    try:
        with open(path) as f:
            text = f.read()
        records = json.loads(text) if text.lstrip()[:1] == "[" else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise EvalInputError(f"test file {path} is not a JSON list or JSONL file ({e}); "
                             f"rebuild it with scripts/make_commonsense_data.py") from None
    if not records:
        raise EvalInputError(f"test file {path} holds no records; rebuild it with "
                             f"scripts/make_commonsense_data.py or drop its task")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "instruction" not in r or "answer" not in r:
            raise EvalInputError(f"test file {path} record {i} lacks 'instruction'/'answer' "
                                 f"(LLM-Adapters format: instruction, input, output, answer)")
    return records


# ------------------------------------------------------------------------------------ filters

def _register_filter():
    from lm_eval.api.filter import Filter
    from lm_eval.api.registry import filter_registry, register_filter

    if "goat_extract" in filter_registry:
        return

    @register_filter("goat_extract")
    class GoatExtract(Filter):
        """LLM-Adapters answer extraction: the option word after "the correct answer is" for
        option records, the last number for math (answers.extract_answer)."""

        def apply(self, resps, docs):
            return [[extract_answer(r, d["options"] or None) for r in rs] for rs, d in zip(resps, docs)]


def _score_extracted(doc: dict, results: list) -> dict[str, float]:
    return {"acc": float(is_correct(results[0], doc["answer"]))}


# ------------------------------------------------------------------------------- task configs

def _docs(spec: TaskSpec, records: list[dict], template: str, eos_text: str) -> list[dict]:
    """Records -> the documents the task's prompt/choice functions read (plain JSON columns)."""
    docs = []
    for i, r in enumerate(records):
        try:
            if spec.kind == "std":
                d = standard_doc(r, spec.source)
                d.setdefault("contexts", [])
                d.setdefault("continuation", "")
            else:
                options = answer_options(r) or []
                d = {"prompt": format_prompt(r, template), "options": options,
                     "answer": str(r["answer"])}
                if spec.kind == "options":
                    if not options or str(r["answer"]).lower() not in [o.lower() for o in options]:
                        raise RecordFormatError(f"answer {r['answer']!r} is not one of the options {options}")
                    d["candidates"] = [candidate_response(r, options, o) + eos_text for o in options]
                    d["gold"] = [o.lower() for o in options].index(str(r["answer"]).lower())
        except RecordFormatError as e:
            raise EvalInputError(f"task {spec.name}: record {i} of {spec.source}/test.json does not "
                                 f"fit the task ({e}); rebuild the file with "
                                 f"scripts/make_commonsense_data.py") from None
        docs.append(d)
    return docs


def task_config(spec: TaskSpec, docs: list[dict]) -> dict[str, Any]:
    """The lm-eval ConfigurableTask config of ``spec`` over prepared ``docs``."""
    import datasets

    cfg: dict[str, Any] = {
        "task": spec.name,
        "custom_dataset": lambda **_: datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)}),
        "test_split": "test",
        "num_fewshot": 0,
        "metadata": {"version": 1.0, "source": spec.source},
    }
    if spec.kind == "std":
        wino = spec.source == "winogrande"
        cfg.update(
            output_type="multiple_choice",
            # winogrande: the harness's partial scoring (one context per option, same continuation)
            doc_to_text=(lambda d: d["gold"]) if wino else (lambda d: d["query"]),
            doc_to_choice=(lambda d: d["contexts"]) if wino else (lambda d: d["choices"]),
            doc_to_target=(lambda d: d["continuation"]) if wino else (lambda d: d["gold"]),
            target_delimiter=" ",
            metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
            + ([] if wino else [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]),
        )
    elif spec.kind == "options":
        cfg.update(
            output_type="multiple_choice",
            doc_to_text=lambda d: d["prompt"],
            doc_to_choice=lambda d: d["candidates"],
            doc_to_target=lambda d: d["gold"],
            target_delimiter="",  # the Alpaca prompt ends with "### Response:\n"; the response follows
            metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        )
    else:  # generate / math
        _register_filter()
        cfg.update(
            output_type="generate_until",
            doc_to_text=lambda d: d["prompt"],
            doc_to_target=lambda d: d["answer"],
            target_delimiter="",
            generation_kwargs={"until": ["### Instruction:"], "do_sample": False,
                               "max_gen_toks": GEN_TOKENS[spec.kind]},
            filter_list=[{"name": "extract", "filter": [{"function": "goat_extract"},
                                                          {"function": "take_first"}]}],
            process_results=_score_extracted,
            metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        )
    return cfg


def build_tasks(names: list[str], data_dir: str = DEFAULT_DATA_DIR, template: str = "alpaca",
                eos_text: str = "", records: Optional[dict[str, list[dict]]] = None,
                limit: int = 0) -> dict[str, Any]:
    """lm-eval Task objects, keyed by task name.

    Args:
        names: task or group names (resolve_tasks).
        data_dir: folder with ``<source>/test.json``.
        template: the prompt template of the LLM-Adapters tasks (training's ``data.prompt_template``).
        eos_text: appended to every option-scoring continuation: the tokenizer's eos token, which
            training puts the loss on after the response.
        records: per task name, records to use instead of the test file (the trainer's subset).
        limit: first ``limit`` records of each test file (0 = all).
    """
    from lm_eval.api.task import ConfigurableTask

    out = {}
    for name in resolve_tasks(names):
        spec = TASKS[name]
        recs = records[name] if records and name in records else load_records(task_file(spec, data_dir))
        if limit:
            recs = recs[:limit]
        task = ConfigurableTask(config=task_config(spec, _docs(spec, recs, template, eos_text)))
        task.set_fewshot_seed(seed=1234)
        out[name] = task
    return out
