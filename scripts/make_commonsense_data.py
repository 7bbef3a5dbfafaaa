#!/usr/bin/env python
"""Build the committed data of data/commonsense and data/eval from the shared data folder.

Writes (each file a pure function of the inputs and the flags; a PROVENANCE.md with sources,
licenses, counts and SHA-256 next to them):

* ``data/eval/<source>/test.json``: every test set the evaluation tasks use
  (goat_dist/eval/tasks.py), copied unchanged (``instruction``, ``input``, ``output``,
  ``answer``): BoolQ, PIQA, Social IQa, WinoGrande, ARC-Easy, ARC-Challenge, OpenBookQA, GSM8K,
  AddSub, SVAMP.
* ``data/commonsense/train.json``: the training mixture: the BoolQ, ARC-Easy, ARC-Challenge and
  OpenBookQA **train** files (the commonsense tasks with a training split here), LLM-Adapters
  instruction form plus a ``source`` field, shuffled.
* ``data/commonsense/train_std.json``: the same records in the standard form: ``instruction`` is
  the harness prompt (``Question: ...\\nAnswer:``), ``output`` a space plus the gold choice text,
  ``choices`` the choice texts. Train it with ``data.prompt_template: "{instruction}"``.
* ``data/commonsense/validation.json`` / ``validation_std.json``: a balanced split carved from the
  training files (none of it in train.json), for model selection. Test sets are for final numbers.

Training/validation records whose instruction also occurs in a test file are left out (no
question is both trained and scored), and so are records longer than ``--max-chars``
(instruction + output), so nothing is truncated at ``data.max_length: 256`` with SmolLM2's
tokenizer. Nothing at run time reads the shared folder.

    python scripts/make_commonsense_data.py     # reads ../shared/data, writes data/commonsense + data/eval
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from goat_dist.eval.records import standard_training_record  # noqa: E402

TRAIN_SOURCES = ["boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"]
EVAL_SOURCES = TRAIN_SOURCES + ["piqa", "social_i_qa", "winogrande"]
MATH_SOURCES = ["gsm8k", "AddSub", "SVAMP"]
# From the shared data README (../shared/data/README.md): original dataset and its license.
LICENSES = {
    "boolq": ("BoolQ (Clark et al., 2019)", "CC BY-SA 3.0"),
    "ARC-Easy": ("AI2 Reasoning Challenge, Easy set (Clark et al., 2018)", "CC BY-SA 4.0"),
    "ARC-Challenge": ("AI2 Reasoning Challenge, Challenge set (Clark et al., 2018)", "CC BY-SA 4.0"),
    "openbookqa": ("OpenBookQA (Mihaylov et al., 2018)", "Apache 2.0"),
    "piqa": ("PIQA (Bisk et al., 2020)", "AFL 3.0"),
    "social_i_qa": ("Social IQa (Sap et al., 2019)", "CC BY 4.0"),
    "winogrande": ("WinoGrande (Sakaguchi et al., 2020)", "CC BY"),
    "gsm8k": ("GSM8K (Cobbe et al., 2021)", "MIT"),
    "AddSub": ("AddSub (Hosseini et al., 2014)", "MIT"),
    "SVAMP": ("SVAMP (Patel et al., 2021)", "MIT"),
}
FIELDS = ("instruction", "input", "output", "answer")

Record = dict[str, Any]


def load_split(shared: Path, source: str, split: str) -> list[Record]:
    """Read ``shared/source/split.json`` and check that every record has the expected fields."""
    path = shared / source / f"{split}.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; point --shared-data at the shared data folder "
                         f"(it holds {', '.join(EVAL_SOURCES + MATH_SOURCES)})")
    with open(path) as f:
        records = json.load(f)
    for i, r in enumerate(records):
        missing = [k for k in FIELDS if k not in r]
        if missing:
            raise SystemExit(f"error: {path} record {i} lacks {missing}")
    return [{k: r[k] for k in FIELDS} | {"source": source} for r in records]


def quotas(available: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over sources as evenly as possible, capped by what each source has.

    What a small source cannot supply is handed to the others, so the split still reaches
    ``total`` whenever the sources hold enough records.
    """
    take = {s: 0 for s in available}
    left = min(total, sum(available.values()))
    while left > 0:
        open_sources = [s for s in available if take[s] < available[s]]
        share, extra = divmod(left, len(open_sources))
        for i, s in enumerate(open_sources):  # the first `extra` sources get one more
            add = min(share + (i < extra), available[s] - take[s])
            take[s] += add
            left -= add
    return take


def sample(pools: dict[str, list[Record]], total: int, rng: random.Random) -> list[Record]:
    """Draw a balanced, shuffled mixture of ``total`` records from per-source pools."""
    counts = quotas({s: len(p) for s, p in pools.items()}, total)
    out = [r for s, p in pools.items() for r in rng.sample(p, counts[s])]
    rng.shuffle(out)
    return out


def write_json_atomic(path: Path, obj: Any) -> str:
    """Write ``obj`` as JSON via a temp file + os.replace; return the file's SHA-256."""
    data = (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


LICENSE_NOTE = [
    "Each dataset keeps its own license (above); redistributing a slice requires keeping this",
    "attribution. CC BY-SA sets (BoolQ, ARC) must be shared under the same license.",
]


def commonsense_provenance(args, splits: dict[str, list[Record]], dropped: dict[str, int],
                           hashes: dict[str, str]) -> str:
    def count(split: str, source: str) -> int:
        return sum(r["source"] == source for r in splits[split])

    lines = [
        "# data/commonsense: provenance", "",
        "Generated by `scripts/make_commonsense_data.py` and committed (rerun it to rebuild the",
        "files byte for byte; nothing at run time reads the shared folder):", "",
        "```", f"python scripts/make_commonsense_data.py --validation-size {args.validation_size} "
               f"--seed {args.seed} --max-chars {args.max_chars}", "```", "",
        "Input: the shared data folder (`../shared/data`), public commonsense datasets in the",
        "Alpaca-style instruction format of the LLM-Adapters project (the files the GOAT paper's",
        "code uses). `train.json`/`validation.json` copy records unchanged (`instruction`, `input`,",
        "`output`, `answer`) plus `source`; `*_std.json` hold the same records in the standard form",
        "(`Question: ...\\nAnswer:` + the choice text, see goat_dist/eval/records.py).", "",
        "| source | dataset | license | train | validation |", "|---|---|---|---|---|",
    ]
    for s in TRAIN_SOURCES:
        name, lic = LICENSES[s]
        lines.append(f"| {s} | {name} | {lic} | {count('train', s)} | {count('validation', s)} |")
    lines += [f"| **total** | | | **{len(splits['train'])}** | **{len(splits['validation'])}** |", "",
              f"Left out before splitting: {dropped['long']} records longer than {args.max_chars} "
              f"characters (instruction + output) and {dropped['overlap']} records whose instruction",
              "also occurs in a test file. PIQA, Social IQa and WinoGrande have no training split",
              "here: their test sets measure transfer to unseen tasks.", ""] + LICENSE_NOTE
    lines += ["", "SHA-256:", ""] + [f"- `{n}`: `{d}`" for n, d in hashes.items()]
    return "\n".join(lines) + "\n"


def eval_provenance(counts: dict[str, int], hashes: dict[str, str]) -> str:
    lines = [
        "# data/eval: provenance", "",
        "The test sets of the evaluation tasks (goat_dist/eval/tasks.py), copied unchanged from the",
        "shared data folder (`../shared/data/<source>/test.json`, LLM-Adapters instruction format)",
        "by `scripts/make_commonsense_data.py`. Used only for final numbers; model selection uses",
        "data/commonsense/validation.json.", "",
        "| source | dataset | license | test records | SHA-256 |", "|---|---|---|---|---|",
    ]
    for s in EVAL_SOURCES + MATH_SOURCES:
        name, lic = LICENSES[s]
        lines.append(f"| {s} | {name} | {lic} | {counts[s]} | `{hashes[s]}` |")
    return "\n".join(lines + [""] + LICENSE_NOTE) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"),
                   help="folder with the shared datasets (default: ../shared/data from the repo)")
    p.add_argument("--out", default=str(REPO / "data"), help="output folder (gets commonsense/ and eval/)")
    p.add_argument("--validation-size", type=int, default=400,
                   help="validation records carved from the training files (balanced over sources)")
    p.add_argument("--seed", type=int, default=0, help="split/shuffle seed")
    p.add_argument("--max-chars", type=int, default=700,
                   help="leave out train/validation records whose instruction + output is longer (0 = keep all)")
    args = p.parse_args(argv)
    if args.validation_size < 1:
        raise SystemExit("error: --validation-size must be >= 1")
    shared, out = Path(args.shared_data), Path(args.out)
    if not shared.is_dir():
        raise SystemExit(f"error: --shared-data {str(shared)!r} is not a folder")

    tests = {s: load_split(shared, s, "test") for s in EVAL_SOURCES + MATH_SOURCES}
    in_test = {r["instruction"] for s in EVAL_SOURCES for r in tests[s]}
    dropped = {"long": 0, "overlap": 0}
    pools: dict[str, list[Record]] = {}
    for s in TRAIN_SOURCES:
        records = load_split(shared, s, "train")
        fresh = [r for r in records if r["instruction"] not in in_test]
        dropped["overlap"] += len(records) - len(fresh)
        pools[s] = [r for r in fresh
                    if args.max_chars <= 0 or len(r["instruction"]) + len(r["output"]) <= args.max_chars]
        dropped["long"] += len(fresh) - len(pools[s])

    rng = random.Random(args.seed)
    validation = sample(pools, args.validation_size, rng)
    taken = {id(r) for r in validation}
    train = [r for s in TRAIN_SOURCES for r in pools[s] if id(r) not in taken]
    rng.shuffle(train)
    splits = {"train": train, "validation": validation}

    cs, ev = out / "commonsense", out / "eval"
    cs.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name, recs in splits.items():
        hashes[f"{name}.json"] = write_json_atomic(cs / f"{name}.json", recs)
        std = [standard_training_record(r, r["source"]) for r in recs]
        hashes[f"{name}_std.json"] = write_json_atomic(cs / f"{name}_std.json", std)
    write_text_atomic(cs / "PROVENANCE.md", commonsense_provenance(args, splits, dropped, hashes))
    test_hashes = {}
    for s, recs in tests.items():
        (ev / s).mkdir(parents=True, exist_ok=True)
        test_hashes[s] = write_json_atomic(ev / s / "test.json",
                                           [{k: r[k] for k in FIELDS} for r in recs])
    write_text_atomic(ev / "PROVENANCE.md", eval_provenance({s: len(r) for s, r in tests.items()},
                                                            test_hashes))
    for name, recs in splits.items():
        mix = ", ".join(f"{s} {sum(r['source'] == s for r in recs)}" for s in TRAIN_SOURCES)
        print(f"{cs / (name + '.json')} (+ _std): {len(recs)} records ({mix})")
    print(f"{ev}: {', '.join(f'{s} {len(r)}' for s, r in tests.items())}")
    print(f"left out {dropped['long']} over-long and {dropped['overlap']} test-overlapping records")


if __name__ == "__main__":
    main()
