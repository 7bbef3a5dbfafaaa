#!/usr/bin/env python
"""Build data/commonsense/{train,eval}.json: a small mixed commonsense set for the SmolLM2 demo.

The GOAT paper fine-tunes on the 8-task commonsense mixture (Commonsense170K). Only some of those
tasks have training splits in the shared data folder, so this builds a seeded slice of them:

* train: BoolQ, ARC-Easy, ARC-Challenge and OpenBookQA **train** files (default 4000 records);
* eval:  the same four tasks' **test** files plus the PIQA, Social IQa and WinoGrande test files
  (default 400 records), so the eval also measures transfer to three unseen tasks.

Records keep the Alpaca/LLM-Adapters format (instruction, input, output, answer) that our trainer
reads with ``data.format: instruction``, plus a ``source`` field naming the task. Each split takes
as equal a share from every source as the source allows (BoolQ alone would otherwise be 9.4k of
17.7k training records), then the split is shuffled. Records longer than ``--max-chars``
characters are left out so that nothing is truncated at ``data.max_length: 256``: with SmolLM2's
tokenizer and the Alpaca prompt, 700 characters keeps every record under 256 tokens (only a few
long PIQA/ARC records are dropped). Eval records whose instruction also occurs in the training
files are dropped, so no question is both trained and scored.

The output is a pure function of the inputs and the flags (fixed seed), and PROVENANCE.md is
regenerated next to it (it is tracked in git; the JSON files are not).

    python scripts/make_commonsense_data.py            # reads ../shared/data, writes data/commonsense
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

TRAIN_SOURCES = ["boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"]
EVAL_SOURCES = TRAIN_SOURCES + ["piqa", "social_i_qa", "winogrande"]
# From the shared data README (/work/shared/data/README.md): original dataset and its license.
LICENSES = {
    "boolq": ("BoolQ (Clark et al., 2019)", "CC BY-SA 3.0"),
    "ARC-Easy": ("AI2 Reasoning Challenge, Easy set (Clark et al., 2018)", "CC BY-SA 4.0"),
    "ARC-Challenge": ("AI2 Reasoning Challenge, Challenge set (Clark et al., 2018)", "CC BY-SA 4.0"),
    "openbookqa": ("OpenBookQA (Mihaylov et al., 2018)", "Apache 2.0"),
    "piqa": ("PIQA (Bisk et al., 2020)", "AFL 3.0"),
    "social_i_qa": ("Social IQa (Sap et al., 2019)", "CC BY 4.0"),
    "winogrande": ("WinoGrande (Sakaguchi et al., 2020)", "CC BY"),
}
FIELDS = ("instruction", "input", "output", "answer")

Record = dict[str, Any]


def load_split(shared: Path, source: str, split: str) -> list[Record]:
    """Read ``shared/source/split.json`` and check that every record has the expected fields."""
    path = shared / source / f"{split}.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; point --shared-data at the shared data folder "
                         f"(it holds {', '.join(EVAL_SOURCES)})")
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


def provenance(args: argparse.Namespace, splits: dict[str, list[Record]],
               dropped: dict[str, int], hashes: dict[str, str]) -> str:
    """The PROVENANCE.md text: sources, licenses, per-source counts, flags and checksums."""
    def count(split: str, source: str) -> int:
        return sum(r["source"] == source for r in splits[split])

    lines = [
        "# data/commonsense: provenance",
        "",
        "Generated by `scripts/make_commonsense_data.py` (the JSON files are not committed; rerun",
        "the script to rebuild them byte for byte):",
        "",
        "```",
        f"python scripts/make_commonsense_data.py --train-size {args.train_size} "
        f"--eval-size {args.eval_size} --seed {args.seed} --max-chars {args.max_chars}",
        "```",
        "",
        "Input: the shared data folder (`../shared/data` next to the repository), public",
        "commonsense datasets in the Alpaca-style instruction format of the LLM-Adapters project",
        "(the files the GOAT paper's code uses). Records are copied unchanged (`instruction`,",
        "`input`, `output`, `answer`) plus a `source` field.",
        "",
        "| source | dataset | license | train records (from train.json) | eval records (from test.json) |",
        "|---|---|---|---|---|",
    ]
    for s in EVAL_SOURCES:
        name, lic = LICENSES[s]
        tr = str(count("train", s)) if s in TRAIN_SOURCES else "-"
        lines.append(f"| {s} | {name} | {lic} | {tr} | {count('eval', s)} |")
    lines += [
        f"| **total** | | | **{len(splits['train'])}** | **{len(splits['eval'])}** |",
        "",
        f"Filtering before sampling: {dropped['long']} records longer than {args.max_chars} characters "
        f"(instruction + output) and {dropped['overlap']} test records whose instruction also occurs in",
        "a training file were left out. PIQA, Social IQa and WinoGrande have no training split here:",
        "they measure transfer to unseen tasks.",
        "",
        "Each dataset keeps its own license (above); redistributing a slice requires keeping this",
        "attribution. CC BY-SA slices (BoolQ, ARC) must be shared under the same license.",
        "",
        "SHA-256:",
        "",
    ]
    lines += [f"- `{name}`: `{digest}`" for name, digest in hashes.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"),
                   help="folder with the shared datasets (default: ../shared/data from the repo)")
    p.add_argument("--out", default=str(REPO / "data" / "commonsense"), help="output folder")
    p.add_argument("--train-size", type=int, default=4000, help="training records")
    p.add_argument("--eval-size", type=int, default=400, help="evaluation records")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--max-chars", type=int, default=700,
                   help="leave out records whose instruction + output is longer (0 = keep all)")
    args = p.parse_args(argv)
    if args.train_size < 1 or args.eval_size < 1:
        raise SystemExit("error: --train-size and --eval-size must be >= 1")

    shared, out = Path(args.shared_data), Path(args.out)
    if not shared.is_dir():
        raise SystemExit(f"error: --shared-data {str(shared)!r} is not a folder")

    def short(r: Record) -> bool:
        return args.max_chars <= 0 or len(r["instruction"]) + len(r["output"]) <= args.max_chars

    dropped = {"long": 0, "overlap": 0}
    train_pools: dict[str, list[Record]] = {}
    seen: set[str] = set()
    for s in TRAIN_SOURCES:
        records = load_split(shared, s, "train")
        seen.update(r["instruction"] for r in records)  # all of them, not just the kept ones
        train_pools[s] = [r for r in records if short(r)]
        dropped["long"] += len(records) - len(train_pools[s])
    eval_pools: dict[str, list[Record]] = {}
    for s in EVAL_SOURCES:
        records = load_split(shared, s, "test")
        fresh = [r for r in records if r["instruction"] not in seen]
        dropped["overlap"] += len(records) - len(fresh)
        eval_pools[s] = [r for r in fresh if short(r)]
        dropped["long"] += len(fresh) - len(eval_pools[s])

    # Separate generators: changing --eval-size must not change the training set.
    splits = {"train": sample(train_pools, args.train_size, random.Random(args.seed)),
              "eval": sample(eval_pools, args.eval_size, random.Random(args.seed + 1))}
    for name, want in (("train", args.train_size), ("eval", args.eval_size)):
        if len(splits[name]) < want:
            print(f"warning: only {len(splits[name])} {name} records available (asked {want})",
                  file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    hashes = {f"{name}.json": write_json_atomic(out / f"{name}.json", recs)
              for name, recs in splits.items()}
    text = provenance(args, splits, dropped, hashes)
    fd, tmp = tempfile.mkstemp(prefix=".PROVENANCE.md.", dir=out)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / "PROVENANCE.md")

    for name, recs in splits.items():
        mix = ", ".join(f"{s} {sum(r['source'] == s for r in recs)}" for s in EVAL_SOURCES
                        if any(r["source"] == s for r in recs))
        print(f"{out / (name + '.json')}: {len(recs)} records ({mix})")
    print(f"dropped {dropped['long']} over-long and {dropped['overlap']} train-overlapping records; "
          f"wrote {out / 'PROVENANCE.md'}")


if __name__ == "__main__":
    main()
