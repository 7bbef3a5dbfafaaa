"""Build the embedded demo data set data/demo/{train,eval}.json from the shared Alpaca-style files.

    python scripts/make_demo_data.py --src ../shared/data --out data/demo

Deterministic: a fixed seed picks ``--train-per-source`` records from each source's train.json and
``--eval-per-source`` from its test.json (random.Random(seed).sample, per source, in a fixed
order), then the picks of all sources are shuffled together with the same Random. The files are
JSON lists written one record per line (small diffs, readable with ``head``). Sources and
licenses: data/demo/PROVENANCE.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random

SOURCES = ("boolq", "ARC-Easy", "openbookqa")
FIELDS = ("instruction", "input", "output", "answer")


def pick(src: str, split: str, n: int, rng: random.Random) -> list[dict]:
    with open(os.path.join(src, split)) as f:
        records = json.load(f)
    idx = sorted(rng.sample(range(len(records)), n))
    return [{k: records[i][k] for k in FIELDS} for i in idx]


def write(records: list[dict], path: str) -> None:
    # one record per line inside a JSON list: valid JSON for datasets' json builder, small diffs
    lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" + lines + "\n]\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--src", default=os.path.join(repo, "..", "shared", "data"),
                    help="the shared data folder (default: ../shared/data beside the repository)")
    ap.add_argument("--out", default="data/demo")
    ap.add_argument("--train-per-source", type=int, default=200)
    ap.add_argument("--eval-per-source", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    train, eval_ = [], []
    for name in SOURCES:
        train += pick(os.path.join(args.src, name), "train.json", args.train_per_source, rng)
        eval_ += pick(os.path.join(args.src, name), "test.json", args.eval_per_source, rng)
    rng.shuffle(train)
    rng.shuffle(eval_)
    os.makedirs(args.out, exist_ok=True)
    for records, name in ((train, "train.json"), (eval_, "eval.json")):
        path = os.path.join(args.out, name)
        write(records, path)
        with open(path, "rb") as f:
            data = f.read()
        print(f"{path}: {len(records)} records, {len(data)} bytes, "
              f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
