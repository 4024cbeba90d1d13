"""Write tiny_moe/synthetic_test.jsonl, the synthetic test set that `python eval.py --sets synthetic` reads.
Deterministic: re-running it reproduces the committed file byte for byte (a test checks).

    python tiny_moe/make_eval_set.py            # the committed file: the defaults below

The rows are synthetic.synthetic_rows of the quick start's task families and fact table (FAMILIES, N_FACTS),
drawn from seed EVAL_SEED, which no training split uses (moekd.py's synthetic data: --seed s for the
training rows, s + 1 for dev; the quick start's s is 10), PER_FAMILY rows of each family in the order drawn.
MiniLLM format, as eval.py reads it: `prompt` (the training template, data.format_prompt) and `output`
(the reference), plus `instruction`, `input` and `category` for reading.

The families are closed-book facts about a fixed table of made-up people, shared by every split: a test row
asks about a person the training rows also ask about (it has to: nobody can guess a made-up fact), so the set
measures what a model memorised, as repro.py's capacity test sets do. The rows themselves are drawn apart from
the training rows; with FAMILIES x N_FACTS possible questions most test questions also occur in training.
"""
import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from tiny_moe import synthetic  # noqa: E402

FAMILIES = ("color", "fact", "password")
N_FACTS = 100
PER_FAMILY = 100
EVAL_SEED = 12345
OUT = ROOT / "tiny_moe" / "synthetic_test.jsonl"


def eval_rows(*, families=FAMILIES, n_facts: int = N_FACTS, per_family: int = PER_FAMILY,
              seed: int = EVAL_SEED) -> list[dict]:
    """per_family rows of each family, in the order synthetic_rows draws them from `seed`."""
    drawn = synthetic.synthetic_rows(per_family * len(families) * 4, seed=seed, families=tuple(families),
                                     n_facts=n_facts)
    counts = dict.fromkeys(families, 0)
    rows = []
    for r in drawn:
        if counts[r["category"]] < per_family:
            counts[r["category"]] += 1
            rows.append({"prompt": data.format_prompt(r["instruction"], r["context"]),
                         "output": r["response"], "instruction": r["instruction"], "input": r["context"],
                         "category": r["category"]})
    if min(counts.values()) < per_family:  # never with these sizes; a loud error if someone changes them
        raise SystemExit(f"drew too few rows for {per_family} per family: {counts}")
    return rows


def text(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated synthetic families")
    p.add_argument("--n-facts", type=int, default=N_FACTS, help="people in the fact table")
    p.add_argument("--per-family", type=int, default=PER_FAMILY, help="rows of each family")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the draw (no training split's)")
    p.add_argument("--out", default=str(OUT), help="the jsonl to write")
    args = p.parse_args(argv)
    rows = eval_rows(families=tuple(args.families.split(",")), n_facts=args.n_facts,
                     per_family=args.per_family, seed=args.seed)
    Path(args.out).write_text(text(rows), encoding="utf-8")
    print(f"wrote {args.out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
