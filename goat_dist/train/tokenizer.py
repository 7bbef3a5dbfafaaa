"""Tokenizers: train a small sentencepiece BPE model at start-up, or load a local one.

Presets (tiny-llama, tiny-bert, ...) ship no tokenizer, so one is trained from the training text in
well under a second. Facts this file relies on (transformers 5.24, sentencepiece 0.2.3):

* ``LlamaTokenizer(vocab_file=...)`` is broken (a vocab of 3 that encodes everything to ``[]``);
  ``LlamaTokenizer.from_pretrained(dir)`` with the model copied to ``dir/tokenizer.model`` works and
  gives the same ids as raw sentencepiece.
* The converted Llama tokenizer silently drops ``"\\n"`` unless the sentencepiece model has a piece
  for it, and the Alpaca prompt is built from newlines. So the model is trained with
  ``"\\n"`` as a user-defined symbol and identity normalisation (no NFKC, whitespace kept as is):
  then the transformers ids equal the sentencepiece ids and decoding gives the newlines back.

Nothing here downloads: folders are loaded with ``local_files_only=True``.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import warnings
from typing import Iterable

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

# Ids of the special pieces of a tokenizer trained here (sentencepiece's trainer arguments).
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TokenizerError(ValueError):
    """A missing / unusable tokenizer; the message names the problem and the fix."""


def train_sentencepiece_tokenizer(texts: Iterable[str], vocab_size: int,
                                  out_dir: str) -> PreTrainedTokenizerBase:
    """Train a BPE sentencepiece model on ``texts`` and save it as a transformers tokenizer folder.

    Deterministic: one thread, no input sampling or shuffling, so the same texts give a
    byte-identical model and identical ids. Special ids: pad 0, unk 1, bos 2, eos 3; digits are
    split (numbers tokenise digit by digit, as in Llama).

    Args:
        texts: training sentences (whole prompt + response strings are fine; each one is a
            sentencepiece "sentence", newlines included).
        vocab_size: requested vocabulary. On small text BPE may run out of merges first: the
            vocabulary is then smaller (``hard_vocab_limit=False``) and a warning says so;
            ``len(tokenizer)`` is the real size.
        out_dir: gets ``tokenizer.model`` (the raw sentencepiece model) and the transformers files
            (``tokenizer.json``, ``tokenizer_config.json``), so ``AutoTokenizer.from_pretrained(out_dir)``
            reloads it.

    Returns:
        The transformers tokenizer (a ``LlamaTokenizer``: adds bos, not eos), pad token ``<pad>``.

    Raises:
        TokenizerError: no text, or a vocab_size too small for the characters of the text.
    """
    import sentencepiece as spm

    # Empty strings carry nothing and sentencepiece rejects an all-empty corpus with a cryptic error.
    sentences = [t for t in texts if t]
    if not sentences:
        raise TokenizerError("cannot train a tokenizer: the training text is empty; check data.train_file")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,  # determinism
            character_coverage=1.0, split_digits=True, hard_vocab_limit=False,
            user_defined_symbols=["\n"], normalization_rule_name="identity",
            remove_extra_whitespaces=False, max_sentence_length=1 << 16, minloglevel=2)
    except RuntimeError as e:
        raise TokenizerError(f"sentencepiece training failed with vocab_size={vocab_size}: {e}. "
                             f"Raise model.vocab_size (it must exceed the number of distinct "
                             f"characters of the training text + 5 special pieces)") from None
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    tok = _llama_from_model_dir(out_dir)
    tok.pad_token = tok.convert_ids_to_tokens(PAD_ID)
    if len(tok) < vocab_size:
        warnings.warn(f"the training text supports only {len(tok)} of the requested "
                      f"{vocab_size} tokenizer pieces; the tokenizer has {len(tok)}", stacklevel=2)
    tok.save_pretrained(out_dir)
    return tok


def _llama_from_model_dir(path: str) -> PreTrainedTokenizerBase:
    """The transformers tokenizer of ``path/tokenizer.model`` (the working way to load one).

    add_bos_token: a bare tokenizer.model loads with bos off in transformers 5, but Llama models
    expect "<s>" first (as Llama's own tokenizer configs set). It is saved in tokenizer.json's
    post-processor, so reloads of a saved folder add it too.
    """
    return LlamaTokenizer.from_pretrained(path, local_files_only=True, add_bos_token=True)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a local tokenizer: a transformers folder, or a sentencepiece ``.model`` file.

    A ``.model`` file is copied as ``tokenizer.model`` into a temporary folder and loaded with
    ``LlamaTokenizer.from_pretrained`` (the only working way, see the module docstring), adding
    bos like Llama; the tokenizer lives in memory afterwards, so the folder is removed.

    Pad token: kept if the tokenizer has one; otherwise the unk token, else the eos token. The pad
    id only fills positions that attention_mask hides and labels ignore (-100), so its value does
    not change any loss; unk is preferred so that eos keeps a single meaning.

    Args:
        trust_remote_code: allow a tokenizer class shipped as code in the folder (ModelConfig).

    Raises:
        TokenizerError: missing path, a file that is not a ``.model``, or a folder transformers
            cannot load.
    """
    if not os.path.exists(path):
        raise TokenizerError(f"tokenizer {path!r} does not exist; set model.tokenizer to a local "
                             f"tokenizer folder or a sentencepiece .model file")
    try:
        if os.path.isdir(path):
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                trust_remote_code=trust_remote_code)
        elif path.endswith(".model"):
            with tempfile.TemporaryDirectory(prefix="goat_tok_") as tmp:
                shutil.copyfile(path, os.path.join(tmp, "tokenizer.model"))
                tok = _llama_from_model_dir(tmp)
        else:
            raise TokenizerError(f"tokenizer {path!r} is a file but not a sentencepiece .model; "
                                 f"give a tokenizer folder or a .model file")
    except TokenizerError:
        raise
    except Exception as e:  # transformers raises OSError/ValueError/... for unusable folders
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(f"cannot load tokenizer {path!r}: {first}. Give a folder with "
                             f"tokenizer files (tokenizer.json / tokenizer.model + "
                             f"tokenizer_config.json) or a sentencepiece .model file") from None
    if len(tok) <= 3:  # what a mis-loaded sentencepiece model looks like: only the special pieces
        raise TokenizerError(f"tokenizer {path!r} loaded with only {len(tok)} tokens; it is not a "
                             f"usable tokenizer (a corrupt or empty model file?)")
    ensure_pad_token(tok)
    return tok


def ensure_pad_token(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tok`` a pad token if it has none (unk, else eos; see load_tokenizer). In place."""
    if tok.pad_token is None:
        fallback = tok.unk_token if tok.unk_token is not None else tok.eos_token
        if fallback is None:
            raise TokenizerError("the tokenizer has no pad, unk or eos token to pad with; add a "
                                 "pad token to it (tokenizer.add_special_tokens)")
        tok.pad_token = fallback
    return tok


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, vocab_size_of_model: int) -> None:
    """Raise TokenizerError if the tokenizer can produce ids >= the model's embedding rows.

    ``len(tokenizer)`` counts the base vocabulary plus added tokens: the largest id is
    ``len(tokenizer) - 1``. A smaller tokenizer than the model is fine (unused rows).
    """
    n = len(tokenizer)
    if n > vocab_size_of_model:
        raise TokenizerError(f"the tokenizer has {n} tokens (ids up to {n - 1}) but the model's "
                             f"embedding has only {vocab_size_of_model} rows; use the model's own "
                             f"tokenizer or resize the model's embeddings to >= {n}")
