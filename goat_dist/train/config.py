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
import os
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
    """

    name_or_path: Optional[str] = None
    preset: Optional[str] = None
    task: str = "causal_lm"
    num_labels: int = 0
    tokenizer: Optional[str] = None
    vocab_size: int = 512
    dtype: str = "float32"


@dataclass
class DataConfig:
    """Training / evaluation data, local files read through ``datasets``.

    Attributes:
        train_file: JSON, JSONL, CSV or Parquet file (by extension).
        eval_file: held-out file; if None, ``eval_fraction`` of the training records are held out.
        eval_fraction: share of training records held out when there is no eval_file.
        format: ``instruction`` (Alpaca records: instruction, input, output, optional answer;
            the loss covers the response only) or ``classification`` (text + label).
        prompt_template: ``alpaca`` or a string with ``{instruction}`` and ``{input}`` fields.
        text_field, text_pair_field, label_field: columns of classification records.
        max_length: maximum tokens per example; longer ones are truncated (and counted).
        max_train_samples, max_eval_samples: cap the number of records (0 = all).
        eval_mode: how accuracy is computed for records with an ``answer``: ``options`` (score
            each answer option's log-likelihood; exact, no generation) or ``generate`` (greedy
            generation + answer extraction).
        eval_max_new_tokens: generation budget of ``generate`` mode.
    """

    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    eval_fraction: float = 0.1
    format: str = "instruction"
    prompt_template: str = "alpaca"
    text_field: str = "text"
    text_pair_field: Optional[str] = None
    label_field: str = "label"
    max_length: int = 256
    max_train_samples: int = 0
    max_eval_samples: int = 0
    eval_mode: str = "options"
    eval_max_new_tokens: int = 16


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
        bf16: ``auto`` (on when the accelerator supports bf16 and it is not a CPU), true, false.
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
        m, d, t, o = self.model, self.data, self.train, self.optim
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
        if d.format not in ("instruction", "classification"):
            raise ConfigError(f"data.format={d.format!r}: choose instruction or classification")
        if (d.format == "classification") != (m.task == "seq_cls"):
            raise ConfigError(f"data.format={d.format!r} does not fit model.task={m.task!r}: "
                              f"instruction data trains causal_lm, classification data trains seq_cls")
        if d.eval_mode not in ("options", "generate"):
            raise ConfigError(f"data.eval_mode={d.eval_mode!r}: choose options or generate")
        if not 0.0 <= d.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
        for name in ("micro_batch_size", "gradient_accumulation_steps", "log_every", "ep_size"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if d.max_length < 8:
            raise ConfigError(f"data.max_length={d.max_length} is too small (>= 8)")
        if t.max_steps < 0 or t.num_epochs <= 0 and t.max_steps == 0:
            raise ConfigError("train.max_steps must be >= 0 and train.num_epochs > 0 when max_steps is 0")
        if o.lr <= 0 or o.max_grad_norm < 0 or o.warmup_steps < 0 or not 0 <= o.warmup_ratio < 1:
            raise ConfigError("optim: lr must be > 0, max_grad_norm >= 0, warmup_steps >= 0 and "
                              "0 <= warmup_ratio < 1")
        if self.goat.num_experts % t.ep_size:
            raise ConfigError(f"train.ep_size={t.ep_size} does not divide goat.num_experts="
                              f"{self.goat.num_experts}; choose an ep_size that divides it")
        if str(t.bf16).lower() not in ("auto", "true", "false"):
            raise ConfigError(f"train.bf16={t.bf16!r}: choose auto, true or false")
        return self


PRESETS = {"tiny-llama": "causal_lm", "tiny-bert": "seq_cls", "tiny-roberta": "seq_cls"}
_SECTIONS = {"model": ModelConfig, "data": DataConfig, "goat": GoatConfig, "optim": OptimConfig,
             "train": TrainConfig}


def _coerce(value: Any, current: Any) -> Any:
    """Parse an override string the way YAML would (numbers, bools, lists, null)."""
    if not isinstance(value, str):
        return value
    parsed = yaml.safe_load(value) if value != "" else ""
    if isinstance(current, tuple) and isinstance(parsed, list):
        return tuple(parsed)
    if isinstance(current, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
        return float(parsed)
    return parsed


def _build_section(name: str, values: dict[str, Any]):
    cls = _SECTIONS[name]
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{name}.{k}' for k in unknown]}; valid keys of "
                          f"'{name}': {sorted(known)}")
    defaults = cls() if name != "goat" else None
    kwargs = {}
    for k, v in values.items():
        cur = getattr(defaults, k) if defaults is not None else None
        if isinstance(cur, tuple) and isinstance(v, list):
            v = tuple(v)
        if isinstance(cur, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if isinstance(cur, (int, float)) and not isinstance(cur, bool) and isinstance(v, str):
            raise ConfigError(f"{name}.{k}={v!r} must be a number")
        kwargs[k] = v
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
        cur = getattr(_SECTIONS[section](), k, None) if section != "goat" else getattr(GoatConfig(), k, None)
        raw[section][k] = _coerce(value, cur)
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown} in the run config; sections: {sorted(_SECTIONS)}")
    for s, v in raw.items():
        if not isinstance(v, dict):
            raise ConfigError(f"section '{s}' must be a mapping of keys, got {v!r}")
    cfg = RunConfig(**{s: _build_section(s, raw.get(s, {})) for s in _SECTIONS})
    return cfg.validate()
