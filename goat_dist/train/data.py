"""Data: local files -> records -> tokenized train/eval sets, the collate function and the step plan.

Formats (``DataConfig.format``):

* ``instruction``: Alpaca records ``{instruction, input, output, answer}`` (input and answer
  optional). An example is ``prompt ids + response ids`` where prompt = the template filled with
  instruction/input, tokenized *with* the tokenizer's special tokens (bos for Llama), and
  response = output tokenized *without* special tokens, + eos. The two parts are tokenized
  separately and concatenated, so the prompt/response boundary is exact (no merge across it) and
  the loss mask (labels -100 on the prompt) is exact; generation and option scoring in
  evaluate.py build their inputs the same way.
* ``chat``: ``messages`` / ShareGPT ``conversations`` / Alpaca records rendered by the tokenizer's
  chat template, the loss on the assistant turns only (goat_dist/train/chat.py).
* ``classification``: ``text`` (+ optional ``text_pair``) and ``label`` columns; labels that are
  strings become ids in sorted order (``label_names``), integer labels are used as they are.

Truncation: examples longer than ``max_length`` are cut at the end and counted. An instruction
example whose prompt alone fills ``max_length`` has no response token left to learn from, so it
is dropped (and counted both as truncated and in ``num_dropped_*``).

StepPlan fixes which examples each rank sees at each optimizer step, independently of the world
size, so a run on W ranks with GA accumulation steps processes exactly the same global batches
as one process with W*GA accumulation steps.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .config import DataConfig

IGNORE_INDEX = -100  # labels value the HF causal-LM loss ignores

ALPACA_TEMPLATE = {
    # The Stanford Alpaca prompt, as LLM-Adapters / GOAT fine-tune and evaluate with (their code
    # writes it as an indented f-string; this is the clean text without the indentation).
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "prompt_no_input": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
}

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_FIELD = re.compile(r"\{(instruction|input)\}")


class DataError(ValueError):
    """Bad data input (file, fields, sizes); the message names the file/problem and the fix."""


# ----------------------------------------------------------------------------------------- loading

def load_records(path: str):
    """Read a data file into a ``datasets.Dataset`` (by extension), a ``save_to_disk`` folder, or,
    for a path that does not exist locally and looks like ``owner/name[:split]``, a hub dataset.

    ``.json`` (a JSON list of records, or JSON lines), ``.jsonl``, ``.csv``, ``.parquet``. The
    ``datasets`` cache goes to a temporary folder and the table is kept in memory, so concurrent
    ranks never contend for (or read stale entries of) the shared HF cache.

    Raises:
        DataError: missing file, unknown extension, unparsable file, no records.
    """
    import datasets

    if os.path.isdir(path):
        return _load_saved_dataset(path)
    if not os.path.isfile(path):
        if _HUB_ID.fullmatch(path) and not os.path.splitext(path)[1].lower() in _BUILDERS:
            return _load_hub_dataset(path)
        raise DataError(f"data file {path!r} does not exist; check data.train_file / data.eval_file "
                        f"(paths are relative to the working directory)")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDERS:
        raise DataError(f"data file {path!r}: unknown extension {ext or '(none)'!r}; use one of "
                        f"{sorted(_BUILDERS)} (JSON list or JSON lines, CSV, Parquet)")
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="goat_data_") as cache:
            ds = datasets.load_dataset(_BUILDERS[ext], data_files=os.path.abspath(path),
                                       split="train", cache_dir=cache, keep_in_memory=True)
    except (ValueError, StopIteration) as e:
        # datasets: 'Instruction "train" corresponds to no data!' (empty list / header-only CSV),
        # StopIteration for a zero-byte JSON file.
        if isinstance(e, StopIteration) or "corresponds to no data" in str(e):
            raise DataError(f"data file {path!r} holds no records; it must contain at least one") from None
        raise _unparsable(path, ext, e) from None
    except Exception as e:  # DatasetGenerationError wraps the parser's error (pyarrow, pandas, json)
        raise _unparsable(path, ext, e) from None
    if ds.num_rows == 0:
        raise DataError(f"data file {path!r} holds no records; it must contain at least one")
    return ds


# owner/name or owner/name:split (a hub dataset id, tried only when no such local path exists)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?")


def _load_saved_dataset(path: str):
    """A folder written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk`` with one
    split, or a split's own subfolder), read into memory."""
    import datasets

    if not any(os.path.isfile(os.path.join(path, f))
               for f in ("state.json", "dataset_info.json", "dataset_dict.json")):
        raise DataError(f"data path {path!r} is a folder but not one written by datasets' "
                        f"save_to_disk (no state.json / dataset_dict.json); give a data file or "
                        f"a save_to_disk folder")
    try:
        ds = datasets.load_from_disk(path, keep_in_memory=True)
    except Exception as e:  # FileNotFoundError / arrow errors for damaged folders
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"data folder {path!r} cannot be read by datasets.load_from_disk "
                        f"({type(e).__name__}: {first}); write it again with save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise DataError(f"data folder {path!r} holds the splits {sorted(ds)}; point "
                            f"data.train_file / data.eval_file at one of them, e.g. "
                            f"{os.path.join(path, sorted(ds)[0])!r}")
        ds = next(iter(ds.values()))
    if ds.num_rows == 0:
        raise DataError(f"data folder {path!r} holds no records; it must contain at least one")
    return ds


def _load_hub_dataset(spec: str):
    """A Hugging Face hub dataset ``owner/name[:split]`` (split ``train`` by default).

    Offline (``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` set) this is refused at once, without a
    network attempt. Online, an unreachable hub fails after huggingface_hub's own timeouts.
    """
    import datasets
    from huggingface_hub import constants as hub_constants

    name, _, split = spec.partition(":")
    split = split or "train"
    if datasets.config.HF_DATASETS_OFFLINE or hub_constants.HF_HUB_OFFLINE:
        raise DataError(f"data {spec!r} is neither a local file or folder nor reachable: as a hub "
                        f"dataset id it needs network access, but HF_DATASETS_OFFLINE / "
                        f"HF_HUB_OFFLINE is set. Check the path, or download the dataset on a "
                        f"machine with network access and save_to_disk it here")
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # ConnectionError, DatasetNotFoundError, ValueError (unknown split)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"data {spec!r}: not a local path, and loading it as a hub dataset failed "
                        f"({type(e).__name__}: {first}); check the path, the dataset id and the "
                        f"split (owner/name:split)") from None
    if ds.num_rows == 0:
        raise DataError(f"hub dataset {spec!r} holds no records")
    return ds


def _unparsable(path: str, ext: str, e: BaseException) -> DataError:
    cause = e.__cause__ or e.__context__ or e
    msg = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    expected = {".json": "a JSON list of records or JSON lines (one object per line)",
                ".jsonl": "JSON lines (one object per line)", ".csv": "CSV with a header row",
                ".parquet": "a Parquet table"}[ext]
    return DataError(f"data file {path!r} cannot be parsed ({type(cause).__name__}: {msg}); "
                     f"it must be {expected}")


# --------------------------------------------------------------------------------------- prompting

def format_prompt(record: dict, template: str) -> str:
    """The prompt of an instruction record (everything before the response).

    Args:
        record: has ``instruction`` and optionally ``input`` (None / empty / blank = no input).
        template: ``alpaca`` (ALPACA_TEMPLATE: the with-input variant when the record has an input)
            or a custom string with ``{instruction}`` and optionally ``{input}``. Other braces in
            a custom template are left as they are (no str.format), and the record's text is
            inserted in one pass, so braces inside instructions are safe too.

    Raises:
        DataError: a custom template without ``{instruction}``, or a record with an input the
            template has no ``{input}`` field for (it would be silently lost).
    """
    instruction = "" if record.get("instruction") is None else str(record["instruction"])
    inp = record.get("input")
    inp = "" if inp is None else str(inp)
    if template == "alpaca":
        template = ALPACA_TEMPLATE["prompt_input" if inp.strip() else "prompt_no_input"]
    elif "{instruction}" not in template:
        raise DataError(f"data.prompt_template {template!r} has no {{instruction}} field; use "
                        f"'alpaca' or a string with {{instruction}} (and {{input}})")
    elif inp.strip() and "{input}" not in template:
        raise DataError("a record has a non-empty 'input' but data.prompt_template has no "
                        "{input} field, so the input would be lost; add {input} to the template")
    values = {"instruction": instruction, "input": inp}
    return _FIELD.sub(lambda m: values[m.group(1)], template)


# ----------------------------------------------------------------------------------------- splits

@dataclass
class RecordSplits:
    """Raw records of the train and eval splits (before tokenization).

    Attributes:
        train: training records (dicts), file order, after ``max_train_samples``.
        eval: evaluation records, after ``max_eval_samples``; empty when there is no eval set.
        train_source, eval_source: where they came from, for messages
            (e.g. ``"data/demo/train.json"``, ``"data/demo/train.json (held out)"``).
        skipped_bad_records: records of both files dropped for a missing or mistyped field
            (``data.skip_bad_records``).
    """

    train: list[dict]
    eval: list[dict]
    train_source: str
    eval_source: Optional[str]
    skipped_bad_records: int = 0


def _required_fields(cfg: DataConfig) -> list[str]:
    if cfg.format == "instruction":
        return ["instruction", "output"]
    return [cfg.text_field] + ([cfg.text_pair_field] if cfg.text_pair_field else []) + [cfg.label_field]


# The types each field of a record may hold: text fields must be strings; ``input`` may also be
# null (datasets fills a key a record leaves out with null, so null is "no input"); ``answer``
# may be a number (math data); classification labels are integers or strings.
_TEXT = (str,)
_OPTIONAL_TYPES = {"input": (str, type(None)), "answer": (str, int, float, type(None))}


def _field_types(cfg: DataConfig) -> dict[str, tuple]:
    """Allowed Python types of each checked field (required ones exclude None)."""
    if cfg.format == "instruction":
        return {"instruction": _TEXT, "output": _TEXT, **_OPTIONAL_TYPES}
    # labels may be JSON booleans (BoolQ's true/false): _label_ids maps them like strings
    types = {cfg.text_field: _TEXT, cfg.label_field: (int, str, float, bool)}
    if cfg.text_pair_field:
        types[cfg.text_pair_field] = _TEXT
    return types


def _bad_field(record: dict, types: dict[str, tuple]) -> Optional[str]:
    """The first field of ``record`` whose value has a wrong type, described, or None."""
    for name, allowed in types.items():
        if name not in record:
            continue
        v = record[name]
        if v is None and type(None) not in allowed:
            return f"has no value for field {name!r} (null or an empty CSV cell)"
        if (isinstance(v, bool) and bool not in allowed) or not isinstance(v, allowed):
            want = " or ".join("null" if t is type(None) else {"str": "a string", "int": "an integer",
                                                                   "float": "a number",
                                                                   "bool": "a boolean"}[t.__name__]
                               for t in allowed)
            return f"has field {name!r} = {str(v)[:40]!r} of type {type(v).__name__}, expected {want}"
    return None


def _check_fields(ds, path: str, cfg: DataConfig) -> tuple[list[dict], int]:
    """Column and per-record type checks; returns (the good records as dicts, records skipped).

    A record with a missing value or a value of the wrong type is an error naming the file, the
    record index (0-based, in file order) and the field, unless ``cfg.skip_bad_records``, which
    drops it and counts it.
    """
    if cfg.format == "chat":  # messages / ShareGPT / Alpaca shapes, checked in chat.py
        from .chat import check_records
        return check_records(ds, path, cfg.skip_bad_records)
    need = _required_fields(cfg)
    found = list(ds.column_names)
    missing = [f for f in need if f not in found]
    if missing:
        hint = ("instruction records need 'instruction' and 'output' ('input', 'answer' optional)"
                if cfg.format == "instruction" else
                "set data.text_field / data.text_pair_field / data.label_field to the file's columns")
        raise DataError(f"data file {path!r}: missing field(s) {missing} for data.format="
                        f"{cfg.format!r}; found fields {found}. {hint}")
    types = _field_types(cfg)
    good, skipped = [], 0
    for i, r in enumerate(ds.to_list()):
        problem = _bad_field(r, types)
        if problem is None:
            good.append(r)
            continue
        if not cfg.skip_bad_records:
            raise DataError(f"data file {path!r}: record {i} {problem}; fix or remove the "
                            f"record, or set data.skip_bad_records=true to skip such records")
        skipped += 1
    if not good:
        raise DataError(f"data file {path!r}: all {skipped} records are bad (see "
                        f"data.skip_bad_records); fix the file")
    return good, skipped


def load_splits(cfg: DataConfig, task: str, seed: int) -> RecordSplits:
    """Load and check the train/eval records, holding out ``eval_fraction`` if there is no eval file.

    The hold-out is a deterministic shuffle from ``seed`` (``random.Random(seed)``); both splits
    keep file order. Caps (``max_train_samples`` / ``max_eval_samples``, 0 = all) apply after the
    split, so capping the training set never changes the held-out set.

    Raises:
        DataError: see load_records; missing fields; a format that does not fit ``task``; a
            hold-out that leaves no training records.
    """
    want = {"causal_lm": ("instruction", "chat"), "seq_cls": ("classification",)}.get(task)
    if want is None:
        raise DataError(f"task {task!r} is unknown; choose causal_lm or seq_cls")
    if cfg.format not in want:
        raise DataError(f"data.format={cfg.format!r} does not fit task {task!r}; {task} trains on "
                        f"data.format={' or '.join(repr(w) for w in want)}")
    if cfg.train_file is None:
        raise DataError("data.train_file is not set; give a local .json/.jsonl/.csv/.parquet file")
    train, skipped = _check_fields(load_records(cfg.train_file), cfg.train_file, cfg)
    eval_source: Optional[str] = None
    if cfg.eval_file is not None:
        eval_, eval_skipped = _check_fields(load_records(cfg.eval_file), cfg.eval_file, cfg)
        skipped += eval_skipped
        eval_source = cfg.eval_file
    elif cfg.eval_fraction > 0:
        n = len(train)
        n_eval = max(1, round(n * cfg.eval_fraction))
        if n_eval >= n:
            raise DataError(f"{cfg.train_file!r} has {n} records: holding out data.eval_fraction="
                            f"{cfg.eval_fraction} leaves none to train on; add data, lower "
                            f"eval_fraction or give data.eval_file")
        held = set(random.Random(seed).sample(range(n), n_eval))
        eval_ = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
        eval_source = f"{cfg.train_file} (held out)"
    else:
        eval_ = []
    if cfg.max_train_samples > 0:
        train = train[:cfg.max_train_samples]
    if cfg.max_eval_samples > 0:
        eval_ = eval_[:cfg.max_eval_samples]
    return RecordSplits(train=train, eval=eval_, train_source=cfg.train_file, eval_source=eval_source,
                        skipped_bad_records=skipped)


def corpus_texts(records: list[dict], cfg: DataConfig) -> list[str]:
    """The text a tokenizer should be trained on: prompt + output, or text (+ text pair)."""
    if cfg.format == "instruction":
        return [format_prompt(r, cfg.prompt_template) + str(r["output"]) for r in records]
    if cfg.format == "chat":
        from .chat import corpus_text, to_messages
        return [corpus_text(to_messages(r, i, "train")) for i, r in enumerate(records)]
    out = [str(r[cfg.text_field]) for r in records]
    if cfg.text_pair_field:
        out += [str(r[cfg.text_pair_field]) for r in records]
    return out


# ----------------------------------------------------------------------------------- tokenization

@dataclass
class PreparedData:
    """Tokenized train/eval sets.

    Attributes:
        train: ``datasets.Dataset`` with ``input_ids`` (list of ints, length <= max_length) and
            ``labels``: for causal_lm a list as long as input_ids (-100 on prompt tokens, the
            token ids on the response = output + eos); for seq_cls one int class id.
        eval: same columns, or None when there is no eval set.
        eval_records: raw dicts of the eval examples, aligned with ``eval`` rows (record i made
            row i; dropped examples are left out of both). Kept for accuracy (answers, options).
        num_truncated_train, num_truncated_eval: examples longer than max_length (cut at the end),
            including the dropped ones.
        num_dropped_train, num_dropped_eval: instruction examples dropped because their prompt
            alone fills max_length (no response token would be left).
        label_names: seq_cls with string labels: the sorted distinct labels (id = position);
            None for integer labels and for causal_lm.
        num_labels: seq_cls: classes the data needs (len(label_names), or the largest integer
            label + 1 over train and eval); 0 for causal_lm.
    """

    train: Any
    eval: Any
    eval_records: list[dict] = field(default_factory=list)
    num_truncated_train: int = 0
    num_truncated_eval: int = 0
    num_dropped_train: int = 0
    num_dropped_eval: int = 0
    label_names: Optional[list[str]] = None
    num_labels: int = 0


def tokenize_instruction(records: list[dict], tokenizer, template: str,
                         max_length: int) -> tuple[list[list[int]], list[list[int]], list[int], int, int]:
    """Tokenize instruction records into (input_ids, labels) with the loss on the response only.

    Returns:
        (input_ids, labels, kept, num_truncated, num_dropped): ``kept`` are the indices of the
        records that made an example (dropped ones are missing).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; instruction data needs one to end each "
                        "response (use a causal-LM tokenizer)")
    if not records:  # transformers' fast tokenizers fail on an empty batch
        return [], [], [], 0, 0
    prompts = tokenizer([format_prompt(r, template) for r in records],
                        add_special_tokens=True)["input_ids"]
    responses = tokenizer([str(r["output"]) for r in records], add_special_tokens=False)["input_ids"]
    ids_out, labels_out, kept = [], [], []
    truncated = dropped = 0
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = list(p) + list(r) + [eos]
        if len(ids) > max_length:
            truncated += 1
            if len(p) >= max_length:
                dropped += 1
                continue
            ids = ids[:max_length]
        ids_out.append(ids)
        labels_out.append([IGNORE_INDEX] * len(p) + ids[len(p):])
        kept.append(i)
    return ids_out, labels_out, kept, truncated, dropped


def _tokenize_classification(records: list[dict], tokenizer, cfg: DataConfig):
    if not records:
        return [], 0
    texts = [str(r[cfg.text_field]) for r in records]
    pairs = [str(r[cfg.text_pair_field]) for r in records] if cfg.text_pair_field else None
    full = tokenizer(texts, pairs, add_special_tokens=True)["input_ids"]
    long_ = [i for i, x in enumerate(full) if len(x) > cfg.max_length]
    if long_:
        # re-encode only the long ones with the tokenizer's own (pair-aware) truncation
        cut = tokenizer([texts[i] for i in long_], [pairs[i] for i in long_] if pairs else None,
                        add_special_tokens=True, truncation=True,
                        max_length=cfg.max_length)["input_ids"]
        for i, x in zip(long_, cut):
            full[i] = x
    return [list(x) for x in full], len(long_)


def _label_ids(train: list[dict], eval_: list[dict], cfg: DataConfig, splits: RecordSplits):
    """Map labels to class ids; returns (train_ids, eval_ids, label_names or None)."""
    def kind(v):
        if isinstance(v, bool):
            return int
        if isinstance(v, float) and v.is_integer():  # CSV/parquet ints read as floats
            return int
        return type(v)

    values = [r[cfg.label_field] for r in train]
    kinds = {kind(v) for v in values}
    if kinds == {int}:
        bad = [v for v in values if int(v) < 0]
        if bad:
            raise DataError(f"{splits.train_source!r}: integer labels must be >= 0, got {bad[0]}")
        ev = [r[cfg.label_field] for r in eval_]
        if {kind(v) for v in ev} - {int}:
            raise DataError(f"{splits.eval_source!r}: labels must be integers like the training "
                            f"labels, got {next(v for v in ev if kind(v) is not int)!r}")
        return [int(v) for v in values], [int(v) for v in ev], None
    if kinds == {str}:
        names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({str(r[cfg.label_field]) for r in eval_} - set(names))
        if unknown:
            raise DataError(f"{splits.eval_source!r}: eval label(s) {unknown[:5]} never occur in "
                            f"the training labels {names[:10]}; fix the labels or the split")
        return ([index[v] for v in values], [index[str(r[cfg.label_field])] for r in eval_], names)
    raise DataError(f"{splits.train_source!r}: field {cfg.label_field!r} must hold all integers or "
                    f"all strings, got types {sorted(k.__name__ for k in kinds)}")


def prepare_data(cfg: DataConfig, tokenizer, task: str, seed: int,
                 splits: Optional[RecordSplits] = None) -> PreparedData:
    """Load, split, check and tokenize the data of a run.

    Args:
        cfg: the run's DataConfig.
        tokenizer: a transformers tokenizer (with an eos token for causal_lm).
        task: ``causal_lm`` (needs data.format=instruction) or ``seq_cls`` (classification).
        seed: the hold-out shuffle's seed (the run's train.seed).
        splits: records already loaded by ``load_splits`` (e.g. to train a tokenizer on them
            first); loaded here when None.

    Raises:
        DataError: anything load_splits raises; a training (or requested eval) set left empty
            after dropping over-long examples.
    """
    import datasets

    splits = splits if splits is not None else load_splits(cfg, task, seed)
    out = PreparedData(train=None, eval=None)
    if task == "causal_lm" and cfg.format == "chat":
        from .chat import tokenize_chat
        ids, labels, _, out.num_truncated_train, out.num_dropped_train = tokenize_chat(
            splits.train, tokenizer, cfg.chat_template, cfg.max_length, splits.train_source)
        e_ids, e_labels, kept, out.num_truncated_eval, out.num_dropped_eval = tokenize_chat(
            splits.eval, tokenizer, cfg.chat_template, cfg.max_length, str(splits.eval_source))
        # accuracy (option scoring / generation) builds Alpaca prompts: chat eval sets report loss
        eval_records = []
        features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                      "labels": datasets.List(datasets.Value("int32"))})
    elif task == "causal_lm":
        ids, labels, _, out.num_truncated_train, out.num_dropped_train = tokenize_instruction(
            splits.train, tokenizer, cfg.prompt_template, cfg.max_length)
        e_ids, e_labels, kept, out.num_truncated_eval, out.num_dropped_eval = tokenize_instruction(
            splits.eval, tokenizer, cfg.prompt_template, cfg.max_length)
        eval_records = [splits.eval[i] for i in kept]
        features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                      "labels": datasets.List(datasets.Value("int32"))})
    else:
        ids, out.num_truncated_train = _tokenize_classification(splits.train, tokenizer, cfg)
        e_ids, out.num_truncated_eval = _tokenize_classification(splits.eval, tokenizer, cfg)
        labels, e_labels, out.label_names = _label_ids(splits.train, splits.eval, cfg, splits)
        out.num_labels = len(out.label_names) if out.label_names else max(labels + e_labels) + 1
        eval_records = list(splits.eval)
        features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                      "labels": datasets.Value("int64")})
    if not ids:
        raise DataError(f"{splits.train_source!r}: no training example is left: all "
                        f"{out.num_dropped_train} prompts fill data.max_length={cfg.max_length} "
                        f"on their own; raise data.max_length")
    if splits.eval and not e_ids:
        raise DataError(f"{splits.eval_source!r}: no eval example is left: all "
                        f"{out.num_dropped_eval} prompts fill data.max_length={cfg.max_length} "
                        f"on their own; raise data.max_length")
    out.train = datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}, features=features)
    if e_ids:
        out.eval = datasets.Dataset.from_dict({"input_ids": e_ids, "labels": e_labels},
                                              features=features)
        out.eval_records = eval_records
    return out


# ---------------------------------------------------------------------------------------- batching

def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into model inputs.

    Args:
        batch: dicts with ``input_ids`` (list of ints) and ``labels`` (a list as long as
            input_ids for causal LM, or an int for classification). Other keys are ignored.
        pad_id: token id used for padding (hidden by attention_mask, so its value is irrelevant).

    Returns:
        ``input_ids`` (B, S) long, ``attention_mask`` (B, S) long 1/0, ``labels`` (B, S) long
        padded with -100 (causal LM) or (B,) long (classification). S = longest example.
    """
    if not batch:
        raise ValueError("collate: empty batch")
    B = len(batch)
    S = max(len(x["input_ids"]) for x in batch)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, S), dtype=torch.long)
    first = batch[0]["labels"]
    causal = isinstance(first, (list, tuple)) or (isinstance(first, torch.Tensor) and first.dim() > 0)
    labels = torch.full((B, S), IGNORE_INDEX, dtype=torch.long) if causal else torch.empty(B, dtype=torch.long)
    for i, x in enumerate(batch):
        n = len(x["input_ids"])
        input_ids[i, :n] = torch.as_tensor(x["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        if causal:
            labels[i, :n] = torch.as_tensor(x["labels"], dtype=torch.long)
        else:
            labels[i] = int(x["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class StepPlan:
    """Which dataset indices each rank processes at each optimizer step; deterministic, resumable.

    Per epoch e the indices are shuffled by ``torch.randperm(N, Generator().manual_seed(seed + e))``
    and cut into global batches of G = b * W * GA examples (the last N mod G are skipped that
    epoch; the reshuffle makes it other examples next epoch). Global batch t is split into W * GA
    micro-batches of b; micro-batch u goes to rank u mod W at accumulation step u // W. The global
    batches and their micro-batches depend on b * W * GA and b only, so W=2, GA=g and W=1, GA=2g
    compute the same gradients (each micro-batch loss is a mean over its own tokens in both).

    With ``lengths`` (``data.group_by_length``), each global batch is sorted by example length,
    longest first, before it is cut: micro-batches then hold similar lengths and pad less, and the
    W micro-batches of one accumulation step are neighbours, so ranks wait less for each other.
    A global batch keeps its examples, so the token-mean loss and its gradient are unchanged;
    only per-micro-batch statistics (the router aux loss) and dropout masks see other company.

    Attributes:
        num_examples, micro_batch_size, grad_accum, world_size, rank, seed: as given.
        lengths: (N,) example lengths in tokens when grouping by length, else None.
        global_batch: G = micro_batch_size * world_size * grad_accum.
        steps_per_epoch: N // G optimizer steps.
    """

    def __init__(self, num_examples: int, micro_batch_size: int, grad_accum: int, world_size: int,
                 rank: int, seed: int, lengths: Optional[Sequence[int]] = None):
        if min(micro_batch_size, grad_accum, world_size) < 1 or not 0 <= rank < world_size:
            raise ValueError(f"StepPlan: need micro_batch_size, grad_accum, world_size >= 1 and "
                             f"0 <= rank < world_size; got b={micro_batch_size}, GA={grad_accum}, "
                             f"W={world_size}, rank={rank}")
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"StepPlan: {len(lengths)} lengths for {num_examples} examples")
        self.lengths = None if lengths is None else list(lengths)
        self.global_batch = micro_batch_size * world_size * grad_accum
        self.steps_per_epoch = num_examples // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"{num_examples} examples cannot fill one global batch of b x W x GA = "
                            f"{micro_batch_size} x {world_size} x {grad_accum} = {self.global_batch}; "
                            f"lower micro_batch_size / gradient_accumulation_steps or add data")
        self._perm_epoch: Optional[int] = None
        self._perm: Optional[torch.Tensor] = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's shuffled indices, (N,) long (cached for the current epoch)."""
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_examples, generator=g), epoch
        return self._perm

    def micro_batches(self, epoch: int, step_in_epoch: int) -> list[list[int]]:
        """The ``grad_accum`` micro-batches (lists of ``micro_batch_size`` indices) of this rank."""
        if not 0 <= step_in_epoch < self.steps_per_epoch:
            raise IndexError(f"step_in_epoch={step_in_epoch} outside [0, {self.steps_per_epoch})")
        b, G, W = self.micro_batch_size, self.global_batch, self.world_size
        block = self.permutation(epoch)[step_in_epoch * G:(step_in_epoch + 1) * G].tolist()
        if self.lengths is not None:     # stable: equal lengths keep their shuffled order
            block.sort(key=lambda i: -self.lengths[i])
        return [block[(j * W + self.rank) * b:(j * W + self.rank + 1) * b]
                for j in range(self.grad_accum)]

    def position(self, global_step: int) -> tuple[int, int]:
        """(epoch, step_in_epoch) of the 0-based optimizer step ``global_step``."""
        return divmod(global_step, self.steps_per_epoch)
