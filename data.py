"""The paper's data: Dolly-15k (from the hub or a local raw file), MiniLLM-format jsonl files (prompt/output),
the synthetic set of the tiny default, the Alpaca-style prompt template, and the MiniLLM train/dev split.
Every bad row is a one-line error naming the file, line and field.
"""
from __future__ import annotations

import json
from pathlib import Path

from errors import MoekdError

DOLLY_HUB = "databricks/databricks-dolly-15k"


def format_prompt(instruction: str, context: str = "") -> str:
    """The Alpaca-style template of MiniLLM and the official code (tools/process_data_dolly.py),
    byte-exact."""
    if context:
        return ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n")
    return ("Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise MoekdError(f"{path}: no such file")
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MoekdError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoekdError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise MoekdError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(to_example(row, where=f"{path}:{lineno}"))
    if not rows:
        raise MoekdError(f"{path}: empty file, no examples")
    return rows


def to_example(row: dict, *, where: str) -> dict:
    """One row -> {prompt, responses}: raw Dolly (instruction/context/response) or MiniLLM (prompt/output)."""
    if "prompt" in row and "output" in row:
        outputs = row["output"] if isinstance(row["output"], list) else [row["output"]]
        if not isinstance(row["prompt"], str) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise MoekdError(f"{where}: 'prompt' must be a string and 'output' a string or list of strings")
        return {"prompt": row["prompt"], "responses": outputs}
    if "instruction" in row and "response" in row:
        for key in ("instruction", "response", "context", "input"):
            if key in row and not isinstance(row[key], str):
                raise MoekdError(f"{where}: field {key!r} must be a string, got {json.dumps(row[key])[:40]}")
        context = row.get("context") or row.get("input") or ""
        return {"prompt": format_prompt(row["instruction"], context), "responses": [row["response"]]}
    raise MoekdError(f"{where}: need fields instruction/response (Dolly) or prompt/output (MiniLLM), "
                     f"got {sorted(row)}")


def load_dolly_hub(name: str = DOLLY_HUB) -> list[dict]:
    try:
        import datasets
        table = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, unknown name, ...
        raise MoekdError(f"--data {name}: could not load from the hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); pass a local jsonl") from None
    return [to_example(dict(r), where=f"{name}[{i}]") for i, r in enumerate(table)]


def load_splits(cfg) -> tuple[list[dict], list[dict]]:
    """(train, dev) examples as {prompt, responses}.

    Raw Dolly-15k (hub or a raw-schema file) without --dev-data follows MiniLLM's split:
    rows 0-499 are the test set (shared/data/dolly/valid.jsonl), the next --dev-size (1000) are dev,
    the rest train. Otherwise dev is --dev-data, a folder's dev.jsonl, or the first
    --dev-size rows (the official processing's first-1000-lines-are-valid rule)."""
    if cfg.data == "synthetic":
        from tiny_moe.synthetic import synthetic_rows
        train = [to_example(r, where="synthetic") for r in synthetic_rows(cfg.synthetic_train, seed=cfg.seed)]
        dev = [to_example(r, where="synthetic") for r in synthetic_rows(cfg.synthetic_dev, seed=cfg.seed + 1)]
        return train, (load_examples(cfg.dev_data) if cfg.dev_data else dev)
    raw_dolly = cfg.data == DOLLY_HUB
    if raw_dolly:
        rows = load_dolly_hub(cfg.data)
    else:
        path = Path(cfg.data)
        if path.is_dir():
            rows = read_jsonl(path / "train.jsonl") if (path / "train.jsonl").exists() else None
            if rows is None:
                raise MoekdError(f"--data {path}: folder has no train.jsonl")
            if cfg.dev_data is None and (path / "dev.jsonl").exists():
                return rows, read_jsonl(path / "dev.jsonl")
        elif not path.exists():
            raise MoekdError(f"--data {path}: no such file or folder (or use 'synthetic' / {DOLLY_HUB})")
        else:
            rows = read_jsonl(path)
            raw_dolly = _is_raw_dolly_file(path)
    if cfg.dev_data is not None:
        return rows, load_examples(cfg.dev_data)
    skip, n_dev = (500 if raw_dolly else 0), cfg.dev_size  # MiniLLM: 500 test + 1000 (the default) dev rows
    if len(rows) <= skip + n_dev:
        what = f"{n_dev} dev rows" if not skip else \
            f"the {skip} test rows of MiniLLM's split of raw Dolly (rows 0-{skip - 1}) + {n_dev} dev rows"
        fix = f"a --dev-size below {len(rows) - skip}" if len(rows) > skip + 1 else "a bigger --data"
        raise MoekdError(f"--data {cfg.data}: {len(rows)} rows leave no training rows after holding out "
                         f"{what}; pass --dev-data or {fix}")
    return rows[skip + n_dev:], rows[skip:skip + n_dev]


def data_files(source: str | None, names: tuple[str, ...] = ("train.jsonl", "dev.jsonl")) -> list[str]:
    """The files a --data (or, with `names` dev.jsonl/valid.jsonl, --dev-data) source reads: the file
    itself, or those of its folder."""
    if not source:
        return []
    path = Path(source)
    return [str(path / n) for n in names] if path.is_dir() else [source]


def _is_raw_dolly_file(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        first = json.loads(next(line for line in f if line.strip()))
    return {"instruction", "context", "response", "category"} <= set(first)


def load_examples(source: str) -> list[dict]:
    path = Path(source)
    if path.is_dir():
        for name in ("dev.jsonl", "valid.jsonl"):
            if (path / name).exists():
                return read_jsonl(path / name)
        raise MoekdError(f"--dev-data {path}: folder has no dev.jsonl or valid.jsonl")
    if not path.exists():
        raise MoekdError(f"--dev-data {path}: no such file or folder")
    return read_jsonl(path)
