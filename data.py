"""The data: Dolly-15k (from the hub or a local raw file), MiniLLM-format jsonl files (prompt/output),
conversations (`messages` lists of role/content, TRL's and the hub's chat format), any table by column
(--prompt-column/--response-column) from jsonl, parquet, arrow or csv files, a folder `datasets` saved, or
the hub; the synthetic set of the tiny default; the prompt templates (the paper's Alpaca template, or the
student's chat template: --template chat) and where a chat response ends; the MiniLLM train/dev split.
Every bad row is a one-line error naming the file, line (or row) and field.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from errors import MoekdError

DOLLY_HUB = "databricks/databricks-dolly-15k"
TEMPLATES = ("alpaca", "chat")
TABLE_FILES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}  # read through `datasets`


def format_prompt(instruction: str, context: str = "") -> str:
    """The Alpaca-style template of MiniLLM and the official code, byte-exact.
    As in the official tools/process_data_dolly.py."""
    if context:
        return ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n")
    return ("Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def read_jsonl(path: str | Path, *, template: str = "alpaca", columns: tuple[str, str] | None = None,
               kinds: Counter | None = None) -> list[dict]:
    """The examples of a jsonl file (to_example per line); `kinds` counts the row formats read."""
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
            rows.append(to_example(row, where=f"{path}:{lineno}", template=template, columns=columns,
                                   kinds=kinds))
    if not rows:
        raise MoekdError(f"{path}: empty file, no examples")
    return rows


KINDS = {"messages": "messages", "minillm": "prompt/output", "dolly": "instruction/response (+context/input)"}


def row_kind(row: dict, columns: tuple[str, str] | None) -> str | None:
    """How a row is read: by the named columns, or by its fields (a conversation, MiniLLM, Dolly)."""
    if columns:
        return "columns"
    if "messages" in row:
        return "messages"
    if "prompt" in row and "output" in row:
        return "minillm"
    if "instruction" in row and "response" in row:
        return "dolly"
    return None


def to_example(row: dict, *, where: str, template: str = "alpaca", columns: tuple[str, str] | None = None,
               kinds: Counter | None = None) -> dict:
    """One row -> an example: {prompt, responses}, or with --template chat {messages, responses, where}.
    {prompt, responses}: the Alpaca template, or MiniLLM's prompt verbatim. Chat: a conversation that ends
    with the assistant turn to learn, rendered later with the student's chat template
    (prompt_and_response). responses[0] is the target, all of them ROUGE-L's references. Under chat an
    instruction (+ its context/input) or a --prompt-column value is one user turn."""
    kind = row_kind(row, columns)
    if kinds is not None and kind:
        kinds[kind] += 1
    if kind == "columns":
        return column_example(row, columns, where=where, template=template)
    if kind == "messages":
        return chat_example(row["messages"], where=f"{where}: 'messages'", template=template)
    if kind == "minillm":
        outputs = row["output"] if isinstance(row["output"], list) else [row["output"]]
        if not isinstance(row["prompt"], str) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise MoekdError(f"{where}: 'prompt' must be a string and 'output' a string or list of strings")
        if template == "chat":  # MiniLLM's rows keep their instruction and input beside the rendered prompt
            user = instruction_turn(row, where) if "instruction" in row else row["prompt"]
            return turn_example(user, outputs)
        return {"prompt": row["prompt"], "responses": outputs}
    if kind == "dolly":
        if template == "chat":
            return turn_example(instruction_turn(row, where), [row["response"]])
        return {"prompt": format_prompt(row["instruction"], instruction_context(row, where)),
                "responses": [row["response"]]}
    raise MoekdError(f"{where}: need fields instruction/response (Dolly), prompt/output (MiniLLM) or "
                     f"messages (a conversation), or name them with --prompt-column/--response-column; "
                     f"got {sorted(row)}")


def instruction_context(row: dict, where: str) -> str:
    for key in ("instruction", "response", "context", "input"):
        if key in row and not isinstance(row[key], str):
            raise MoekdError(f"{where}: field {key!r} must be a string, got {json.dumps(row[key])[:40]}")
    return row.get("context") or row.get("input") or ""


def instruction_turn(row: dict, where: str) -> str:
    """An instruction and its context (Dolly) or input (MiniLLM) as one user turn, a blank line apart."""
    context = instruction_context(row, where)
    return f"{row['instruction']}\n\n{context}" if context else row["instruction"]


def turn_example(user: str, responses: list[str]) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": responses[0]}],
            "responses": responses, "where": "(one user turn)"}


def column_example(row: dict, columns: tuple[str, str], *, where: str, template: str) -> dict:
    """An example from a row read by --prompt-column/--response-column.
    Strings (the response: one or a list of references), or TRL's conversational prompt/completion (lists
    of turns, joined into one conversation)."""
    for flag, column in zip(("--prompt-column", "--response-column"), columns):
        if column not in row:
            raise MoekdError(f"{where}: no column {column!r} ({flag}); the row has {', '.join(sorted(row))}")
    prompt, response = row[columns[0]], row[columns[1]]
    if isinstance(prompt, list):
        completion = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
        return chat_example(prompt + completion, where=f"{where}: {columns[0]!r} + {columns[1]!r}",
                            template=template)
    responses = response if isinstance(response, list) else [response]
    if not isinstance(prompt, str):
        raise MoekdError(f"{where}: column {columns[0]!r} (--prompt-column) must be a string or a list of "
                         f"turns, got {json.dumps(prompt, default=str)[:40]}")
    if not responses or not all(isinstance(r, str) for r in responses):
        raise MoekdError(f"{where}: column {columns[1]!r} (--response-column) must be a string or a list of "
                         f"strings, got {json.dumps(response, default=str)[:40]}")
    if template == "chat":
        return turn_example(prompt, responses)
    return {"prompt": format_prompt(prompt), "responses": responses}


def chat_example(messages, *, where: str, template: str) -> dict:
    """A conversation up to its last assistant turn (the response to learn; later turns are left out)."""
    if template != "chat":
        raise MoekdError(f"{where}: a conversation needs --template chat (the student's chat template)")
    if not isinstance(messages, list) or not messages:
        raise MoekdError(f"{where}: must be a non-empty list of turns ({{role, content}})")
    for i, turn in enumerate(messages):
        if not (isinstance(turn, dict) and all(isinstance(turn.get(k), str) for k in ("role", "content"))):
            raise MoekdError(f"{where}[{i}]: a turn needs a string 'role' and a string 'content', "
                             f"got {json.dumps(turn, default=str)[:60]}")
    last = max((i for i, turn in enumerate(messages) if turn["role"] == "assistant"), default=None)
    if last is None:
        raise MoekdError(f"{where}: no assistant turn, nothing to learn")
    if last == 0:
        raise MoekdError(f"{where}: the assistant turn comes first, so its prompt would be empty")
    turns = [{"role": t["role"], "content": t["content"]} for t in messages[:last + 1]]
    return {"messages": turns, "responses": [turns[-1]["content"]], "where": where}


# ----------------------------------------------------------------------------
# The chat template: rendering, where a response ends

PROBE = [{"role": "user", "content": "Say the probe."},  # a conversation every template takes (no system)
         {"role": "assistant", "content": "moekd probe answer"}, {"role": "user", "content": "Again."}]


def render(tokenizer, messages: list[dict], *, generation_prompt: bool = False, where: str = "") -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # the template's own raise_exception (roles must alternate, ...), a Jinja error
        raise MoekdError(f"{where or tokenizer.name_or_path}: the chat template of {tokenizer.name_or_path} "
                         f"fails ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def special_ids(tokenizer) -> set[int]:
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return added | set(tokenizer.all_special_ids)


def generation_eos_ids(tokenizer, flag: str) -> list[int]:
    """The eos_token_id of generation_config.json beside the tokenizer (an id or a list, as Llama 3.1's)."""
    path = Path(tokenizer.name_or_path) / "generation_config.json"
    if not path.is_file():
        return []
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise MoekdError(f"{flag}: {path}: not a JSON object ({type(e).__name__})") from None
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise MoekdError(f"{flag}: {path}: eos_token_id must be an id or a list of ids, "
                         f"got {json.dumps(value)}")
    return ids


def chat_stop_ids(tokenizer, flag: str = "--model") -> list[int]:
    """The ids that end a response under the chat template, the response's own end first.
    The first special token the template writes after an assistant message's content (<|im_end|>,
    <|eot_id|>, <end_of_turn>, </s>), then the tokenizer's EOS and the eos_token_id(s) of the model's
    generation_config.json."""
    name = f"{flag} {tokenizer.name_or_path}"
    if not getattr(tokenizer, "chat_template", None):
        raise MoekdError(f"--template chat: {name} has no chat template (chat_template in "
                         f"tokenizer_config.json or chat_template.jinja); use --template alpaca")
    text, answer = render(tokenizer, PROBE[:2], where=name), PROBE[1]["content"]
    if answer not in text:
        raise MoekdError(f"--template chat: the chat template of {name} does not write an assistant turn's "
                         f"content")
    specials = special_ids(tokenizer)
    after = [i for i in tokenizer.encode(text[text.rindex(answer) + len(answer):], add_special_tokens=False)
             if i in specials]
    if not after:
        raise MoekdError(f"--template chat: the chat template of {name} writes no special token after an "
                         f"assistant turn, so where a response ends is unknown")
    return list(dict.fromkeys([after[0], tokenizer.eos_token_id, *generation_eos_ids(tokenizer, flag)]))


def set_template(tokenizer, template: str, flag: str = "--model") -> None:
    """Ready `tokenizer` for --template.
    chat: the ids that end a response (chat_stop_ids) become tokenizer.moekd_stop_ids, which
    sampling.stop_ids reads; alpaca: the tokenizer's EOS, as before."""
    if template != "chat":
        return
    stops = tokenizer.moekd_stop_ids = chat_stop_ids(tokenizer, flag)
    names = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)} ({i})" for i in stops)
    print(f"template chat: {flag} {tokenizer.name_or_path}'s chat template; a response ends with "
          f"{tokenizer.convert_ids_to_tokens(stops[0])}, generation stops at {names}")


def prompt_and_response(tokenizer, example: dict) -> tuple[str, str] | None:
    """An example's prompt and response text; None where its conversation cannot be split right.
    A conversation: the turns before its last one rendered with the generation prompt, and the text the
    template writes after them up to the response's end token (appended as an id by tokenize_example). No
    split is right where the template's prefix property fails: the prompt rendered alone is not the start
    of the whole conversation rendered (or no end token follows)."""
    if "messages" not in example:
        return example["prompt"], example["responses"][0]
    stops = getattr(tokenizer, "moekd_stop_ids", None)
    if stops is None:
        raise MoekdError("chat examples need the tokenizer readied by data.set_template(tokenizer, 'chat')")
    prompt = render(tokenizer, example["messages"][:-1], generation_prompt=True, where=example["where"])
    whole = render(tokenizer, example["messages"], where=example["where"])
    end = whole.find(tokenizer.convert_ids_to_tokens(stops[0]), len(prompt))
    if not whole.startswith(prompt) or end < 0:
        return None
    return prompt, whole[len(prompt):end]


def check_same_template(teacher_tok, student_tok, *, teacher: str, model: str) -> None:
    """Teacher and student must render one chat template: the teacher reads the student's prompts."""
    texts = [render(t, PROBE, generation_prompt=True) if getattr(t, "chat_template", None) else None
             for t in (teacher_tok, student_tok)]
    if texts[0] != texts[1]:
        why = ("the teacher has none" if texts[0] is None else "the student has none" if texts[1] is None
               else f"e.g. {texts[0][:60]!r} vs {texts[1][:60]!r}")
        raise MoekdError(f"--template chat: --teacher {teacher} and --model {model} render different chat "
                         f"templates ({why}); distillation needs one")


# ----------------------------------------------------------------------------
# Sources: files, folders, `datasets` tables, the hub; the train/dev split

def load_hub(name: str, flag: str = "--data", *, split: str | None = None, template: str = "alpaca",
             columns: tuple[str, str] | None = None, kinds: Counter | None = None,
             split_flag: str = "--data-split") -> list[dict]:
    try:
        import datasets
        table = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, unknown name, unknown split, ...
        text = str(e).splitlines()[0] if str(e) else ""
        if "Unknown split" in text:
            raise MoekdError(f"{flag} {name}: no split {split or 'train'!r} ({split_flag}; {text})") from None
        raise MoekdError(f"{flag} {name}: could not load from the hub ({type(e).__name__}: {text}); "
                         f"pass a local file") from None
    return table_examples(table, name, flag, template=template, columns=columns, kinds=kinds)


def is_saved_dataset(path: Path) -> bool:
    """A folder `datasets` wrote with save_to_disk (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def looks_like_hub_name(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source)) and Path(source).suffix not in (
        ".jsonl", ".json", *TABLE_FILES)


def load_table(source: str, flag: str, *, split: str | None, template: str, columns: tuple[str, str] | None,
               kinds: Counter | None = None, split_flag: str = "--data-split") -> list[dict]:
    """The examples of a parquet/arrow/csv file, a save_to_disk folder or a hub dataset, through `datasets`.
    `split` where the source has splits (default train), an error where it has none."""
    path = Path(source)
    if not path.exists():
        if looks_like_hub_name(source):
            return load_hub(source, flag, split=split, template=template, columns=columns, kinds=kinds,
                            split_flag=split_flag)
        raise MoekdError(f"{flag} {source}: no such file or folder (or use 'synthetic', a hub dataset name)")
    import datasets
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per small file is noise, and an error stays one line
    try:
        if path.is_dir():
            table = datasets.load_from_disk(str(path))
        else:
            table = datasets.load_dataset(TABLE_FILES[path.suffix], data_files=str(path), split="train")
    except Exception as e:  # a damaged or foreign file
        raise MoekdError(f"{flag} {source}: `datasets` cannot read it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    if isinstance(table, datasets.DatasetDict):
        if (split or "train") not in table:
            raise MoekdError(f"{flag} {source}: no split {split or 'train'!r} "
                             f"({split_flag}; its splits: {', '.join(table)})")
        table = table[split or "train"]
    elif split is not None:
        raise MoekdError(f"{flag} {source}: one table without splits, so no split {split!r} ({split_flag})")
    return table_examples(table, source, flag, template=template, columns=columns, kinds=kinds)


def table_examples(table, source: str, flag: str, *, template: str, columns: tuple[str, str] | None,
                   kinds: Counter | None) -> list[dict]:
    for column, which in zip(columns or (), ("--prompt-column", "--response-column")):
        if column not in table.column_names:
            raise MoekdError(f"{flag} {source}: no column {column!r} ({which}); its columns: "
                             f"{', '.join(table.column_names)}")
    rows = [to_example(dict(r), where=f"{source}[{i}]", template=template, columns=columns, kinds=kinds)
            for i, r in enumerate(table)]
    if not rows:
        raise MoekdError(f"{flag} {source}: no rows")
    return rows


def read_source(source: str, flag: str, cfg, *, split: str | None, kinds: Counter,
                split_flag: str = "--data-split") -> list[dict]:
    """One --data/--dev-data file or dataset (not a folder of jsonl files) -> examples."""
    fmt = dict(template=cfg.template, columns=columns_of(cfg), kinds=kinds)
    path = Path(source)
    if path.is_file() and path.suffix not in TABLE_FILES:
        if split is not None:
            raise MoekdError(f"{flag} {source}: a jsonl file has no splits, so no split {split!r} "
                             f"({split_flag})")
        return read_jsonl(path, **fmt)
    return load_table(source, flag, split=split, split_flag=split_flag, **fmt)


def columns_of(cfg) -> tuple[str, str] | None:
    return (cfg.prompt_column, cfg.response_column) if cfg.prompt_column else None


def log_source(flag: str, source: str, split: str | None, rows: list[dict], kinds: Counter, cfg) -> None:
    """The data log's line for one source: what was read, by which columns, under which template."""
    cols = columns_of(cfg)
    read = (f"columns {cols[0]!r} (prompt) and {cols[1]!r} (response)" if cols else
            ", ".join(f"{KINDS[k]} ({n} rows)" for k, n in kinds.items()))
    how = {"alpaca": "alpaca (the paper's; MiniLLM prompts verbatim)",
           "chat": "chat (the student's chat template)"}
    print(f"data {flag} {source}{f' split {split}' if split else ''}: {len(rows)} rows read by {read}; "
          f"template {how[cfg.template]}")


def load_splits(cfg) -> tuple[list[dict], list[dict]]:
    """(train, dev) examples: {prompt, responses} or, with --template chat, {messages, responses, where}.

    Raw Dolly-15k (hub or a raw-schema file) without --dev-data follows MiniLLM's split:
    rows 0-499 are the test set (shared/data/dolly/valid.jsonl), the next --dev-size (1000) are dev,
    the rest train. Otherwise dev is --dev-data (or its --dev-split), --data's --dev-split, a folder's
    dev.jsonl, or the first --dev-size rows (the official processing's first-1000-lines-are-valid rule)."""
    fmt = dict(template=cfg.template, columns=columns_of(cfg))
    kinds: Counter = Counter()
    if cfg.data == "synthetic":
        from tiny_moe.synthetic import FAMILIES, synthetic_rows
        families = tuple(f.strip() for f in cfg.synthetic_families.split(","))
        unknown = [f for f in families if f not in FAMILIES]
        if unknown or not families:
            raise MoekdError(f"--synthetic-families: unknown {', '.join(unknown) or '(none given)'}; known: "
                             f"{', '.join(FAMILIES)}")
        kind = dict(families=families, n_facts=cfg.synthetic_facts)
        train = [to_example(r, where="synthetic", **fmt)
                 for r in synthetic_rows(cfg.synthetic_train, seed=cfg.seed, **kind)]
        dev = [to_example(r, where="synthetic", **fmt)
               for r in synthetic_rows(cfg.synthetic_dev, seed=cfg.seed + 1, **kind)]
        return train, (load_examples(cfg) if cfg.dev_data or cfg.dev_split else dev)
    raw_dolly = cfg.data == DOLLY_HUB
    path = Path(cfg.data)
    if raw_dolly:
        rows = load_hub(cfg.data, split=cfg.data_split, kinds=kinds, **fmt)
    elif path.is_dir() and not is_saved_dataset(path):
        if not (path / "train.jsonl").exists():
            raise MoekdError(f"--data {path}: folder has no train.jsonl (nor a dataset saved by `datasets`)")
        rows = read_jsonl(path / "train.jsonl", kinds=kinds, **fmt)
        if cfg.dev_data is None and cfg.dev_split is None and (path / "dev.jsonl").exists():
            log_source("--data", cfg.data, None, rows, kinds, cfg)
            return rows, read_jsonl(path / "dev.jsonl", **fmt)
    else:
        rows = read_source(cfg.data, "--data", cfg, split=cfg.data_split, kinds=kinds)
        raw_dolly = path.is_file() and path.suffix not in TABLE_FILES and _is_raw_dolly_file(path)
    log_source("--data", cfg.data, cfg.data_split, rows, kinds, cfg)
    if cfg.dev_data is not None or cfg.dev_split is not None:
        return rows, load_examples(cfg)
    skip, n_dev = (500 if raw_dolly else 0), cfg.dev_size  # MiniLLM: 500 test + 1000 (the default) dev rows
    if len(rows) <= skip + n_dev:
        what = f"{n_dev} dev rows" if not skip else \
            f"the {skip} test rows of MiniLLM's split of raw Dolly (rows 0-{skip - 1}) + {n_dev} dev rows"
        fix = f"a --dev-size below {len(rows) - skip}" if len(rows) > skip + 1 else "a bigger --data"
        raise MoekdError(f"--data {cfg.data}: {len(rows)} rows leave no training rows after holding out "
                         f"{what}; pass --dev-data or {fix}")
    return rows[skip + n_dev:], rows[skip:skip + n_dev]


def data_files(source: str | None, names: tuple[str, ...] = ("train.jsonl", "dev.jsonl")) -> list[str]:
    """The files a --data source reads: the file itself, those of its folder, or a dataset's folder.
    With `names` dev.jsonl/valid.jsonl, those a --dev-data source reads."""
    if not source:
        return []
    path = Path(source)
    return [str(path / n) for n in names] if path.is_dir() and not is_saved_dataset(path) else [source]


def _is_raw_dolly_file(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        first = json.loads(next(line for line in f if line.strip()))
    return {"instruction", "context", "response", "category"} <= set(first)


def load_examples(cfg) -> list[dict]:
    """The dev examples, from --dev-data or --dev-split.
    --dev-data: a file, a folder's dev.jsonl or valid.jsonl, a dataset; --dev-split: of --dev-data, else of
    --data."""
    source, flag = (cfg.dev_data, "--dev-data") if cfg.dev_data else (cfg.data, "--data")
    path = Path(source)
    if path.is_dir() and not is_saved_dataset(path) or source == "synthetic":
        if cfg.dev_split is not None:
            raise MoekdError(f"--dev-split {cfg.dev_split}: {flag} {source} has no splits")
        for name in ("dev.jsonl", "valid.jsonl"):
            if (path / name).exists():
                return read_jsonl(path / name, template=cfg.template, columns=columns_of(cfg))
        raise MoekdError(f"--dev-data {path}: folder has no dev.jsonl or valid.jsonl")
    if not path.exists() and not looks_like_hub_name(source):
        raise MoekdError(f"{flag} {path}: no such file or folder")
    kinds: Counter = Counter()
    rows = read_source(source, flag, cfg, split=cfg.dev_split, kinds=kinds, split_flag="--dev-split")
    log_source(flag, source, cfg.dev_split, rows, kinds, cfg)
    return rows
