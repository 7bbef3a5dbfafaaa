"""RunConfig: one run of launch/train.py, read from YAML/JSON plus ``section.key=value`` overrides.

    model:  {preset: tiny-llama}                 # or name_or_path: /models/SmolLM2-135M-Instruct
    data:   {train_file: data/demo/train.json, format: instruction, max_length: 256}
    goat:   {r: 8, lora_alpha: 16, num_experts: 4, top_k: 2}
    optim:  {lr: 2.0e-3, warmup_ratio: 0.03}
    train:  {micro_batch_size: 4, gradient_accumulation_steps: 2, max_steps: 100,
             output_dir: outputs/demo}

Every section is a dataclass with documented fields; unknown keys are errors, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from ..config import GoatConfig, GoatConfigError


class ConfigError(ValueError):
    """A bad run config / override / DeepSpeed config; the message names the problem and the fix."""


@dataclass
class ModelConfig:
    """Which model to fine-tune.

    Attributes:
        name_or_path: local Hugging Face model folder (config.json + weights). Exclusive with preset.
        preset: a tiny model built from a config in code: ``tiny-llama`` (causal LM),
            ``tiny-bert`` / ``tiny-roberta`` (sequence classification). Random weights.
        task: ``causal_lm`` or ``seq_cls`` (sequence classification; the head trains in full).
        num_labels: classes for ``seq_cls`` (0 = infer from the data's labels).
        tokenizer: tokenizer folder or a sentencepiece ``.model`` file; defaults to name_or_path.
            For presets with no tokenizer, one is trained at start-up from the training text.
        vocab_size: vocabulary of a preset's tokenizer trained at start-up.
        dtype: dtype of the frozen base weights: ``float32`` or ``bfloat16`` (adapters stay fp32
            master weights in the optimizer).
        trust_remote_code: let transformers run Python code shipped inside the model or
            tokenizer folder (custom architectures). Off by default: such code runs with the
            job's rights on every rank; turn it on only for folders you trust.
    """

    name_or_path: Optional[str] = None
    preset: Optional[str] = None
    task: str = "causal_lm"
    num_labels: int = 0
    tokenizer: Optional[str] = None
    vocab_size: int = 512
    dtype: str = "float32"
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Training / evaluation data, local files read through ``datasets``.

    Attributes:
        train_file: JSON, JSONL, CSV or Parquet file (by extension), a folder written by
            ``datasets``' ``save_to_disk``, or a Hugging Face hub dataset id (``owner/name``,
            optionally ``owner/name:split``; needs network access, split ``train`` by default).
        eval_file: held-out file (same forms); if None, ``eval_fraction`` of the training records
            are held out.
        eval_fraction: share of training records held out when there is no eval_file.
        format: ``instruction`` (Alpaca records: instruction, input, output, optional answer;
            the loss covers the response only), ``chat`` (``messages`` with role/content, ShareGPT
            ``conversations`` with from/value, or Alpaca records, rendered by the tokenizer's chat
            template; the loss covers the assistant turns only; see goat_dist/train/chat.py) or
            ``classification`` (text + label).
        prompt_template: ``alpaca`` or a string with ``{instruction}`` and ``{input}`` fields.
        chat_template: ``chat`` format: a Jinja chat-template file (or an inline Jinja string)
            used instead of the tokenizer's own; required when the tokenizer has none.
        text_field, text_pair_field, label_field: columns of classification records.
        max_length: maximum tokens per example; longer ones are truncated (and counted).
        max_train_samples, max_eval_samples: cap the number of records (0 = all).
        group_by_length: sort each global batch by example length before cutting it into
            micro-batches (data.StepPlan), so micro-batches pad less. The global batches, hence
            the loss and its gradient, are the same either way (HF Trainer's option of the
            same name regroups whole batches instead, which changes them).
        eval_mode: how accuracy is computed for records with an ``answer``, through the same
            lm-eval tasks as launch/evaluate.py (goat_dist/train/evaluate.py): ``options`` (score
            each answer option's log-likelihood; exact, no generation) or ``generate`` (greedy
            generation + answer extraction). The eval records are the subset scored.
        eval_max_new_tokens: generation budget of ``generate`` mode.
        skip_bad_records: a record whose field has the wrong type (a number as ``instruction``,
            a list as ``output``, null where a value is needed) is an error naming the file,
            the record and the field (false, the default), or is skipped and counted (true;
            the count is in summary.json as ``skipped_bad_records``).
    """

    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    eval_fraction: float = 0.1
    format: str = "instruction"
    prompt_template: str = "alpaca"
    chat_template: Optional[str] = None
    text_field: str = "text"
    text_pair_field: Optional[str] = None
    label_field: str = "label"
    max_length: int = 256
    max_train_samples: int = 0
    max_eval_samples: int = 0
    group_by_length: bool = True
    eval_mode: str = "options"
    eval_max_new_tokens: int = 16
    skip_bad_records: bool = False


@dataclass
class OptimConfig:
    """AdamW + warmup/cosine, as the official GOAT scripts (weight_decay 0, clip 1.0).

    Attributes:
        lr: peak learning rate.
        weight_decay, betas, eps: AdamW.
        warmup_ratio: warmup as a share of total steps (official: 0.03); warmup_steps wins if > 0.
        warmup_steps: warmup in optimizer steps (the paper: 100).
        min_lr_ratio: cosine floor as a share of lr.
        max_grad_norm: gradient clipping (DeepSpeed ``gradient_clipping``); 0 disables.
    """

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    """The loop.

    Attributes:
        output_dir: where logs, checkpoints, the adapter and the summary go.
        micro_batch_size: examples per rank per micro-step (DeepSpeed train_micro_batch_size_per_gpu).
        gradient_accumulation_steps: micro-steps per optimizer step.
        num_epochs: epochs, used when max_steps is 0.
        max_steps: optimizer steps (0 = num_epochs worth).
        seed: everything random (init, sampler order, dropout) derives from it.
        bf16: ``auto`` (on where bf16 is native: CUDA devices with bf16, CPUs with AVX512-BF16
            or AMX-BF16; off elsewhere), true, false. Tests that compare runs in fp32 pin false.
        eval_every: optimizer steps between evaluations (0 = only at the end).
        eval_batches: cap on eval micro-batches per evaluation (0 = the whole eval set).
        log_every: optimizer steps between TensorBoard scalar writes.
        save_every: optimizer steps between checkpoints (0 = only at the end).
        keep_checkpoints: checkpoints kept on disk (older ones are deleted after a new one lands).
        resume: ``auto`` (resume from output_dir's latest checkpoint if there is one), a
            checkpoint path, or ``none``.
        ep_size: expert-parallel degree (1 = experts replicated on every rank).
        overwrite_output_dir: allow starting a fresh run in a folder that holds another run.
        stop_after_steps: end this invocation after this many optimizer steps in total (with a
            checkpoint), e.g. to fit a job's time limit; the schedule still spans max_steps and a
            later ``resume`` continues exactly. 0 = run to the end.
        svd_cache_dir: where SVD priors are cached, keyed by weight content and config, so a
            rerun or resume skips the SVDs: ``auto`` (<output_dir>/svd_cache), ``none``, or a
            folder to share between runs of the same base model.
        max_skipped_steps: a step whose loss or gradient norm is non-finite (NaN/Inf) on any rank
            is skipped on every rank (no parameter, optimizer or scheduler update); after this
            many consecutive skips the run stops with exit status 3 (diverged), leaving the last
            checkpoint current.
        dist_timeout_s: bound, in seconds, on every collective (torch.distributed's process-group
            timeout). A rank that stops answering ends the job after about this long with a
            message naming the operation, instead of hanging until a far longer default. Keep it
            above the slowest legitimate gap between collectives (model loading, a checkpoint).
    """

    output_dir: str = "outputs/run"
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    num_epochs: float = 1.0
    max_steps: int = 0
    seed: int = 0
    bf16: Union[str, bool] = "auto"
    eval_every: int = 0
    eval_batches: int = 0
    log_every: int = 1
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: str = "auto"
    ep_size: int = 1
    overwrite_output_dir: bool = False
    stop_after_steps: int = 0
    svd_cache_dir: str = "auto"
    max_skipped_steps: int = 10
    dist_timeout_s: float = 600.0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    goat: GoatConfig = field(default_factory=GoatConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        m, d, t = self.model, self.data, self.train
        _check_ranges(self)
        if (m.name_or_path is None) == (m.preset is None):
            raise ConfigError("model: give exactly one of model.name_or_path (a local HF folder) "
                              "or model.preset (tiny-llama, tiny-bert, tiny-roberta)")
        if m.preset is not None and m.preset not in PRESETS:
            raise ConfigError(f"model.preset={m.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        if m.preset is not None and PRESETS[m.preset] != m.task:
            raise ConfigError(f"model.preset={m.preset!r} is a {PRESETS[m.preset]} model but "
                              f"model.task={m.task!r}; set model.task={PRESETS[m.preset]}")
        if m.task not in ("causal_lm", "seq_cls"):
            raise ConfigError(f"model.task={m.task!r} is unknown; choose causal_lm or seq_cls")
        if m.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.dtype={m.dtype!r}: choose float32 or bfloat16")
        if d.train_file is None:
            raise ConfigError("data.train_file is required (a local .json/.jsonl/.csv/.parquet file)")
        if d.format not in ("instruction", "chat", "classification"):
            raise ConfigError(f"data.format={d.format!r}: choose instruction, chat or classification")
        if (d.format == "classification") != (m.task == "seq_cls"):
            raise ConfigError(f"data.format={d.format!r} does not fit model.task={m.task!r}: "
                              f"instruction and chat data train causal_lm, classification data "
                              f"trains seq_cls")
        if d.eval_mode not in ("options", "generate"):
            raise ConfigError(f"data.eval_mode={d.eval_mode!r}: choose options or generate")
        if t.max_steps == 0 and t.num_epochs <= 0:
            raise ConfigError("train.num_epochs must be > 0 when train.max_steps is 0")
        if self.goat.num_experts % t.ep_size:
            raise ConfigError(f"train.ep_size={t.ep_size} does not divide goat.num_experts="
                              f"{self.goat.num_experts}; choose an ep_size that divides it")
        if str(t.bf16).lower() not in ("auto", "true", "false"):
            raise ConfigError(f"train.bf16={t.bf16!r}: choose auto, true or false")
        return self


# Allowed ranges of the numeric fields: (low, high, low inclusive, high inclusive); None = open.
# Every numeric value must also be finite (checked for all numeric fields, listed here or not).
_RANGES: dict[str, tuple] = {
    "model.num_labels": (0, None, True, None),
    "model.vocab_size": (16, None, True, None),
    "data.eval_fraction": (0.0, 1.0, True, False),
    "data.max_length": (8, None, True, None),
    "data.max_train_samples": (0, None, True, None),
    "data.max_eval_samples": (0, None, True, None),
    "data.eval_max_new_tokens": (1, None, True, None),
    "optim.lr": (0.0, None, False, None),
    "optim.weight_decay": (0.0, None, True, None),
    "optim.betas": (0.0, 1.0, True, False),
    "optim.eps": (0.0, None, False, None),
    "optim.warmup_ratio": (0.0, 1.0, True, False),
    "optim.warmup_steps": (0, None, True, None),
    "optim.min_lr_ratio": (0.0, 1.0, True, True),
    "optim.max_grad_norm": (0.0, None, True, None),
    "train.micro_batch_size": (1, None, True, None),
    "train.gradient_accumulation_steps": (1, None, True, None),
    "train.num_epochs": (0.0, None, True, None),
    "train.max_steps": (0, None, True, None),
    "train.seed": (0, 2**32 - 1, True, True),
    "train.eval_every": (0, None, True, None),
    "train.eval_batches": (0, None, True, None),
    "train.log_every": (1, None, True, None),
    "train.save_every": (0, None, True, None),
    "train.keep_checkpoints": (1, None, True, None),
    "train.ep_size": (1, None, True, None),
    "train.stop_after_steps": (0, None, True, None),
    "train.max_skipped_steps": (1, None, True, None),
    "train.dist_timeout_s": (0.0, None, False, None),
}


def _check_ranges(cfg: "RunConfig") -> None:
    """Every numeric field in range (``_RANGES``); tuples are checked element by element."""
    for key, (lo, hi, lo_inc, hi_inc) in _RANGES.items():
        sec, name = key.split(".")
        section = getattr(cfg, sec)
        if not hasattr(section, name):
            continue
        value = getattr(section, name)
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
            bad = (lo is not None and (v < lo or (v == lo and not lo_inc))) or \
                  (hi is not None and (v > hi or (v == hi and not hi_inc)))
            if bad:
                lo_s = "" if lo is None else f"{'>=' if lo_inc else '>'} {lo}"
                hi_s = "" if hi is None else f"{'<=' if hi_inc else '<'} {hi}"
                raise ConfigError(f"{key}={value!r} is out of range: it must be "
                                  f"{' and '.join(x for x in (lo_s, hi_s) if x)}")


PRESETS = {"tiny-llama": "causal_lm", "tiny-bert": "seq_cls", "tiny-roberta": "seq_cls"}
_SECTIONS = {"model": ModelConfig, "data": DataConfig, "goat": GoatConfig, "optim": OptimConfig,
             "train": TrainConfig}


# A number as people type it: 3, -2, 1e-4, 1E-4, 2.5e3, 1.0e12, .5, +7. YAML 1.1 (PyYAML) reads
# exponents without a dot or without a sign ("1e-4", "1.0e12") as strings, so both YAML files
# and overrides go through this. nan/inf are deliberately not numbers here (refused below).
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_INT = re.compile(r"[+-]?\d+")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_override(key: str, value: str, hint: Any) -> Any:
    """Parse an override string: YAML for numbers, bools, lists and null; the raw text for
    string fields (so ``train.output_dir=2024`` or ``data.prompt_template=a: b`` stay text)."""
    if value == "":
        return ""
    if _accepts_str(hint) and not _accepts(hint, bool) and not _accepts(hint, list) \
            and not _accepts(hint, tuple):
        return None if (_accepts(hint, type(None)) and value in ("null", "~", "None")) else value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"override {key}={value!r} cannot be parsed ({first}); write the value as YAML, "
                          f"e.g. 3, 1e-4, true, [a, b] or a quoted string") from None


def _args(hint: Any) -> tuple:
    origin = typing.get_origin(hint)
    return typing.get_args(hint) if origin is Union else (hint,)


def _accepts(hint: Any, kind: type) -> bool:
    return any((typing.get_origin(h) or h) is kind for h in _args(hint))


def _accepts_str(hint: Any) -> bool:
    return _accepts(hint, str)


def _check_value(key: str, v: Any, hint: Any) -> Any:
    """Check (and normalise) one config value against its annotation.

    Numbers: int/float fields take ints, floats and numeric strings in any usual form; float
    fields must be finite; int fields must be whole (``1e3`` is 1000). Bools are never numbers.
    """
    if v is None:
        if _accepts(hint, type(None)):
            return None
        raise ConfigError(f"{key} must not be null; give a value or leave the key out for the default")
    if _accepts(hint, bool) and isinstance(v, bool):
        return v
    if _accepts(hint, tuple) or _accepts(hint, list):
        container = next(h for h in _args(hint) if (typing.get_origin(h) or h) in (tuple, list))
        elems = typing.get_args(container)
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{key}={v!r} must be a list, e.g. {key}=[0.9, 0.999]")
        if (typing.get_origin(container) or container) is tuple and elems and Ellipsis not in elems:
            if len(v) != len(elems):
                raise ConfigError(f"{key}={v!r} must be a list of {len(elems)} values")
            v = tuple(_check_value(f"{key}[{i}]", x, h) for i, (x, h) in enumerate(zip(v, elems)))
            return v
        elem = elems[0] if elems else Any
        return [_check_value(f"{key}[{i}]", x, elem) for i, x in enumerate(v)]
    wants_float, wants_int = _accepts(hint, float), _accepts(hint, int)
    if wants_float or wants_int:
        num = v
        if isinstance(v, str) and not _accepts_str(hint):
            text = v.strip()
            if not _NUMBER.fullmatch(text):
                raise ConfigError(f"{key}={v!r} must be a number (e.g. 3, 0.5, 1e-4)")
            num = int(text) if _INT.fullmatch(text) else float(text)
        if isinstance(num, bool) or (not isinstance(num, (int, float)) and not _accepts_str(hint)):
            raise ConfigError(f"{key}={v!r} must be a number (e.g. 3, 0.5, 1e-4), "
                              f"not {type(v).__name__}")
        if isinstance(num, (int, float)) and not isinstance(num, bool):
            if not math.isfinite(num):
                raise ConfigError(f"{key}={v!r} must be a finite number (not NaN or infinity)")
            if wants_float:
                return float(num) if not wants_int else num
            if isinstance(num, float):
                if not num.is_integer():
                    raise ConfigError(f"{key}={v!r} must be a whole number")
                num = int(num)
            return num
    if _accepts_str(hint):
        if not isinstance(v, str):
            raise ConfigError(f"{key}={v!r} must be a string; quote it in YAML (e.g. {key}: \"{v}\")")
        return v
    if _accepts(hint, bool):
        raise ConfigError(f"{key}={v!r} must be true or false")
    return v


def _build_section(name: str, values: dict[str, Any]):
    cls = _SECTIONS[name]
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{name}.{k}' for k in unknown]}; valid keys of "
                          f"'{name}': {sorted(known)}")
    hints = _field_types(cls)
    kwargs = {}
    for k, v in values.items():
        if name == "goat":
            # GoatConfig validates its own fields; numbers typed as text still become numbers
            hint = hints.get(k, Any)
            if isinstance(v, str) and (_accepts(hint, float) or _accepts(hint, int)) \
                    and _NUMBER.fullmatch(v.strip()):
                v = _check_value(f"goat.{k}", v, hint)
            elif isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"goat.{k}={v!r} must be a finite number (not NaN or infinity)")
            kwargs[k] = v
            continue
        kwargs[k] = _check_value(f"{name}.{k}", v, hints[k])
    try:
        return cls(**kwargs)
    except GoatConfigError as e:
        raise ConfigError(f"goat: {e}") from None
    except TypeError as e:
        raise ConfigError(f"section '{name}': {e}") from None


def load_run_config(path: Optional[str], overrides: list[str] = ()) -> RunConfig:
    """Read a YAML/JSON run config (or defaults when ``path`` is None) and apply overrides.

    Args:
        path: config file, ``.yaml``/``.yml``/``.json``.
        overrides: ``section.key=value`` strings (values parsed as YAML: 3, 1e-4, true, [a, b]).

    Raises:
        ConfigError: missing/unparsable file, unknown section or key, bad value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"run config {path!r} does not exist; pass --config <file.yaml|json>")
        with open(path) as f:
            text = f.read()
        try:
            raw = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"run config {path!r} cannot be parsed: {first}. Fix the syntax "
                              f"(it must be a YAML or JSON mapping of sections)") from None
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"run config {path!r} must be a mapping of sections "
                              f"({sorted(_SECTIONS)}), got {type(raw).__name__}")
    for ov in overrides:
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise ConfigError(f"override {ov!r} must look like section.key=value (e.g. train.max_steps=10)")
        key, value = ov.split("=", 1)
        section, k = key.split(".", 1)
        if section not in _SECTIONS:
            raise ConfigError(f"override {ov!r}: unknown section {section!r}; sections: {sorted(_SECTIONS)}")
        raw.setdefault(section, {}) if isinstance(raw.get(section), dict) else raw.__setitem__(section, {})
        raw[section][k] = _parse_override(key, value, _field_types(_SECTIONS[section]).get(k, Any))
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown} in the run config; sections: {sorted(_SECTIONS)}")
    for s, v in raw.items():
        if not isinstance(v, dict):
            raise ConfigError(f"section '{s}' must be a mapping of keys, got {v!r}")
    cfg = RunConfig(**{s: _build_section(s, raw.get(s, {})) for s in _SECTIONS})
    return cfg.validate()
