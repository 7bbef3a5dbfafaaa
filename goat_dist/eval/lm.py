"""The model under evaluation: loading (base, base + adapter, run folder) and lm-eval's HF wrapper.

``GoatHFLM`` is lm-eval's own ``HFLM`` given a model instance (a transformers model, or a
GoatModel that wraps one), so batching, length sorting, generation and metrics are the
library's. Four things are added:

* **Data parallel over an explicit torch.distributed group.** HFLM only shards requests when it
  loads the model itself under ``accelerate launch``; given an instance it assumes one process.
  Here rank / world size come from the group passed in, and ``all_gather`` / ``gather_object`` /
  ``barrier`` run over it, so lm-eval's evaluator shards every task's documents over the ranks
  (``doc_iterator(rank, world_size)``), pads the request lists so that every rank runs the same
  number of requests, and gathers the per-document metrics on rank 0.
* **ZeRO-3 lockstep** (``synced_gpus=True``): under ZeRO-3 each forward gathers parameters with
  collectives, so every rank must run the same number of forwards. lm-eval's padding gives every
  rank the same number of loglikelihood requests, hence the same number of fixed-size batches;
  generation is made lockstep with transformers' ``synced_gpus`` (ranks that finish early keep
  running dummy forwards).
* **Shared-prefix log-likelihoods** (goat_dist/eval/prefix.py, off under lockstep): the options of
  a multiple-choice record share their context, which then runs through the model once instead of
  once per option; same numbers within fp32 rounding.
* **Near ties scored again in float32** (goat_dist/eval/near_ties.py): in a bf16 evaluation, the
  records whose best two options are within the rounding error are rescored by a float32 copy
  of the model, so bf16 picks fp32's option wherever rounding could have changed it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..train.ds_config import cpu_native_bf16
from .tasks import EvalInputError


def native_bf16() -> bool:
    """True on CUDA, and on CPUs with native bf16 arithmetic (the trainer's test, so that
    ``--dtype auto`` and ``train.bf16: auto`` agree on every machine)."""
    return torch.cuda.is_available() or cpu_native_bf16()


def resolve_dtype(dtype: str) -> torch.dtype:
    """``auto`` -> bfloat16 where the hardware has native bf16 (native_bf16), else float32."""
    if dtype == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise EvalInputError(f"--dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    return getattr(torch, dtype)


def sha256_of_folder(path: str) -> str:
    """SHA-256 over the folder's files (sorted relative names + contents): the adapter's identity."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def resolve_adapter_dir(path: str) -> str:
    """The adapter folder that ``path`` names: an adapter folder itself, a training run's output
    folder (its final ``adapter/`` export) or one of its checkpoint step folders
    (``checkpoints/step_N/adapter``, written with every checkpoint).

    Raises:
        EvalInputError: the path does not exist or holds no adapter; for a run without a final
            export (stopped or still running) the message names its latest checkpoint's adapter.
    """
    import json

    from ..adapter_io import CONFIG_NAME

    if not os.path.isdir(path):
        raise EvalInputError(f"adapter folder {path!r} does not exist; pass an adapter folder "
                             f"(adapter_config.json + adapter_model.safetensors), a training "
                             f"run's output folder or one of its checkpoints/step_N folders")
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return path
    exported = os.path.join(path, "adapter")
    if os.path.isfile(os.path.join(exported, CONFIG_NAME)):
        return exported
    for root in (path, os.path.join(path, "checkpoints")):   # a checkpoints folder, or a run's
        pointer = os.path.join(root, "latest.json")
        if os.path.isfile(pointer):
            try:
                with open(pointer) as f:
                    latest = os.path.join(root, json.load(f)["tag"], "adapter")
            except (OSError, ValueError, KeyError):
                break
            raise EvalInputError(f"{path!r} has no final adapter export (the run stopped early or "
                                 f"is still running); its latest checkpoint's adapter is "
                                 f"{latest!r}: pass --adapter {latest}")
    if os.path.isfile(os.path.join(path, "run_config.json")):
        raise EvalInputError(f"checkpoint {path!r} holds no adapter/ export (written by an older "
                             f"goat_dist); resume the run from it (train.resume={path}) with "
                             f"train.stop_after_steps set to get one")
    raise EvalInputError(f"{path!r} holds no goat_dist adapter ({CONFIG_NAME}) and no adapter/ "
                         f"export; pass an adapter folder, a training run's output folder or one "
                         f"of its checkpoints/step_N folders")


def load_model(model_dir: str, adapter: Optional[str], dtype: torch.dtype):
    """(model, tokenizer, adapter_dir) for evaluation, nothing downloaded.

    The base model is loaded in ``dtype``; a goat_dist adapter is injected on top of it and its
    experts computed in ``dtype`` too (``adapter_compute_dtype``), its router in float32.

    Raises:
        EvalInputError: a missing/unloadable model folder, or an adapter that does not fit it
            (another architecture, other shapes).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..adapter_io import AdapterLoadError, load_adapter, read_adapter
    from ..train.tokenizer import TokenizerError, load_tokenizer

    if not os.path.isdir(model_dir):
        raise EvalInputError(f"model folder {model_dir!r} does not exist; pass a local Hugging Face "
                             f"model folder (config.json + weights), e.g. models/SmolLM2-135M-Instruct")
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EvalInputError(f"{model_dir!r} is not a Hugging Face model folder "
                             f"({str(e).splitlines()[0]}); convert or copy the model first") from None
    adapter_dir = resolve_adapter_dir(adapter) if adapter else None
    if adapter_dir:
        try:
            meta, _ = read_adapter(adapter_dir)
        except AdapterLoadError as e:
            raise EvalInputError(str(e)) from None
        want = meta["base_model"].get("model_type")
        if want and want != config.model_type:
            raise EvalInputError(f"adapter {adapter_dir!r} was trained on a {want} model but "
                                 f"{model_dir!r} is a {config.model_type} model; pass the base model "
                                 f"the adapter was trained on")
    try:
        tokenizer = load_tokenizer(model_dir)
    except TokenizerError as e:
        raise EvalInputError(str(e)) from None
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    if adapter_dir:
        try:
            model = load_adapter(model, adapter_dir)
        except AdapterLoadError as e:
            raise EvalInputError(f"{e} (base model: {model_dir!r})") from None
        adapter_compute_dtype(model, dtype)
    if dtype != torch.float32:
        fp32_output_head(model)
    model.eval()
    return model, tokenizer, adapter_dir


def adapter_compute_dtype(model, dtype: torch.dtype) -> None:
    """Compute every GoatLinear's experts (A, B and the frozen residual correction) in ``dtype``.

    Why: load_adapter keeps the factors in float32, and GoatLinear computes in its factors'
    dtype, so in a bf16 evaluation every adapted layer cast its base output up to float32 and ran
    the rank-2r expert GEMMs there: with SmolLM2 + a GOAT adapter (r 32, E 8, q/k/v/up/down) a
    scoring forward cost 1.45x the bare bf16 model's, against 1.26x with the experts in bf16
    (scripts/bench_eval_forward.py, docs/BENCHMARKS.md). A bf16 training run computes them in
    bf16 as well.
    The router stays float32: top-k is a discrete choice, and a bf16 router would flip the
    expert of tokens whose two best experts are near equal, for little speed.
    """
    import torch.nn as nn

    from ..layer import GoatLinear

    for mod in model.modules():
        if not isinstance(mod, GoatLinear):
            continue
        for name in ("lora_A", "lora_B"):
            p = getattr(mod, name)
            setattr(mod, name, nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad))
        for name in ("res_A", "res_B"):
            if getattr(mod, name) is not None:
                setattr(mod, name, getattr(mod, name).to(dtype))


def fp32_output_head(model) -> None:
    """Compute the output head (lm_head) in float32 on a float32 copy of its weight.

    Why: option scores are differences of log-likelihoods that are often a few hundredths apart,
    and a bf16 logit near 20 is only resolved to 0.125; the head is one GEMM of the model, so
    keeping it in fp32 costs little and removes the coarsest rounding of a bf16 evaluation.
    The head is untied from the (bf16) input embeddings for this; only evaluation does it.
    """
    import torch.nn as nn

    head = model.get_output_embeddings()
    if head is None or head.weight.dtype == torch.float32:
        return
    fp32 = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                     dtype=torch.float32, device=head.weight.device)
    with torch.no_grad():
        fp32.weight.copy_(head.weight.float())
        if head.bias is not None:
            fp32.bias.copy_(head.bias.float())
    fp32.requires_grad_(False)
    fp32.register_forward_pre_hook(lambda _m, args: (args[0].float(),) + tuple(args[1:]))
    model.config.tie_word_embeddings = False   # HFLM calls tie_weights(): keep the fp32 copy
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    model.set_output_embeddings(fp32)


def _hflm_class():
    from lm_eval.models.huggingface import HFLM

    class GoatHFLM(HFLM):
        """HFLM on a model instance, data-parallel over ``group`` (see the module docstring)."""

        def __init__(self, model, tokenizer, batch_size: int = 16, max_length: Optional[int] = None,
                     group=None, synced_gpus: bool = False, max_gen_toks: int = 256,
                     fp32_model: Optional[Callable[[], Any]] = None, rescore_margin: float = 0.0):
            # logits_cache merges single-token continuations that share a context into one row,
            # so the number of forwards would depend on the rank's documents: off under lockstep
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                             max_length=max_length, backend="causal", logits_cache=not synced_gpus)
            self._group = group
            self._synced_gpus = synced_gpus
            self._max_gen_toks = max_gen_toks
            self._fp32_model = fp32_model
            self._rescore_margin = rescore_margin
            self.rescored = {"records": 0, "requests": 0, "of_requests": 0}
            self._progress_desc = "Running loglikelihood requests"
            if dist.is_available() and dist.is_initialized():
                self._rank = dist.get_rank(group)
                self._world_size = dist.get_world_size(group)

        @property
        def max_gen_toks(self) -> int:
            return self._max_gen_toks

        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            """Concatenation over ranks along dim 0 (what accelerate's gather returns)."""
            if self.world_size <= 1:
                return tensor
            t = tensor.reshape(1) if tensor.dim() == 0 else tensor
            # gloo gathers CPU tensors only; move back afterwards
            parts = [torch.empty_like(t, device="cpu") for _ in range(self.world_size)]
            dist.all_gather(parts, t.cpu(), group=self._group)
            return torch.cat(parts).to(tensor.device)

        def gather_object(self, obj, dst=0):
            if self.world_size <= 1:
                return [obj]
            result = [None] * self.world_size if self.rank == dst else None
            dist.gather_object(obj, result, dst=dist.get_global_rank(self._group, dst)
                               if self._group is not None else dst, group=self._group)
            return result

        def barrier(self):
            if self.world_size > 1:
                dist.barrier(group=self._group)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            """lm-eval's scoring, then the near-tie records (goat_dist/eval/near_ties.py) scored
            again in float32 when a float32 model was given: only those can differ from an fp32
            evaluation. Not under lockstep (ranks would run different numbers of forwards)."""
            results = super().loglikelihood(requests, disable_tqdm)
            self.rescored["of_requests"] += len(requests)
            if self._fp32_model is None or self._rescore_margin <= 0 or self._synced_gpus:
                return results
            from .near_ties import near_tie_indices

            idx = near_tie_indices([(r.task_name, r.doc_id) for r in requests],
                                   [r.args[1] for r in requests], [ll for ll, _ in results],
                                   self._rescore_margin)
            if not idx:
                return results
            reduced = self._model
            self._model = self._fp32_model()
            self._progress_desc = "Rescoring near ties in float32"
            try:
                again = super().loglikelihood([requests[i] for i in idx], disable_tqdm)
            finally:
                self._model = reduced
                self._progress_desc = "Running loglikelihood requests"
            for i, r in zip(idx, again):
                results[i] = r
            self.rescored["requests"] += len(idx)
            self.rescored["records"] += len({(requests[i].task_name, requests[i].doc_id)
                                             for i in idx})
            return results

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            """Shared-prefix scoring (goat_dist/eval/prefix.py): each context runs once for all of
            its options. lm-eval's own loop under lockstep, where the count of forwards must not
            depend on the rank's documents."""
            if self._synced_gpus or self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            from tqdm import tqdm

            from .prefix import score_requests

            pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                        desc=self._progress_desc)

            def done(i, answer):
                if requests[i][0] is not None:   # rolling windows are cached per document upstream
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                pbar.update(1)

            pad = self.tokenizer.pad_token_id
            out = score_requests(self.model, [(c, t) for _, c, t in requests], self.max_length,
                                 override_bs or self.batch_size, pad if pad is not None else 0,
                                 self.device, on_done=done)
            pbar.close()
            return out

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if self._synced_gpus:
                generation_kwargs["synced_gpus"] = True
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    return GoatHFLM


def make_lm(model, tokenizer, batch_size: int = 16, max_length: Optional[int] = None, group=None,
            synced_gpus: bool = False, fp32_model: Optional[Callable[[], Any]] = None,
            rescore_margin: float = 0.0):
    """lm-eval's HF wrapper over ``model`` (see GoatHFLM).

    Args:
        fp32_model: for a reduced-precision ``model``: a callable returning the same model in
            float32 (called once, only if some record is a near tie), used to score again the
            records whose best two options are within ``rescore_margin`` nats.
        rescore_margin: nats; 0 turns rescoring off.
    """
    return _hflm_class()(model, tokenizer, batch_size=batch_size, max_length=max_length,
                         group=group, synced_gpus=synced_gpus, fp32_model=fp32_model,
                         rescore_margin=rescore_margin)
