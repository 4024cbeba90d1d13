"""Data (data.py, moekd's tokenization): the prompt template, label masking, jsonl formats, the splits, the
synthetic set, the tokenizer script; fetch_data.py from a local source and its errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import data
import errors
import eval as moe_eval
import fetch_data
import moekd
from tiny_moe import synthetic

from conftest import ROOT, TINY, STUDENT, SHARED, EVAL_SETS

pytestmark = pytest.mark.usefixtures("seeded")  # torch seeded 0 before each test


# ----------------------------------------------------------------------------
# Template, masking, formats, synthetic set

def test_template_golden_strings():
    assert data.format_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert data.format_prompt("Sum.", "1 and 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSum.\n\n"
        "### Input:\n1 and 2\n\n### Response:\n")


def test_template_reproduces_minillm_prompts():
    """On the committed rows, and on every row of the full sets where fetch_data.py put them."""
    files = [root / name for root in (EVAL_SETS, SHARED)
             for name in ("dolly/valid.jsonl", "dolly/dev.jsonl")]
    rows = [json.loads(line) for f in files if f.is_file() for line in f.read_text().splitlines()]
    assert len(rows) >= 16 and any(r["input"] for r in rows) and any(not r["input"] for r in rows)
    for row in rows:
        assert data.format_prompt(row["instruction"], row["input"]) == row["prompt"]


def official_response_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """The official processing's response ids: encode(prompt + response) after the prompt's length."""
    n = len(tokenizer.encode(prompt, add_special_tokens=False))
    return tokenizer.encode(prompt + response, add_special_tokens=False)[n:] + [tokenizer.eos_token_id]


def test_labels_mask_prompt_and_keep_eos_when_pad_is_eos(any_tokenizer):
    tokenizer = any_tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # MoEKD's LLaMA setting
    eos = tokenizer.eos_token_id
    a = moekd.tokenize_example(tokenizer, "### Q:\n", "red", max_prompt_len=50, max_len=60)
    b = moekd.tokenize_example(tokenizer, "### Question here:\n", "blue green black", max_prompt_len=50,
                               max_len=60)
    n_prompt = len(tokenizer.encode("### Q:\n", add_special_tokens=False))
    assert a["input_ids"][0] != tokenizer.bos_token_id  # no BOS in training (official processing)
    assert a["labels"][:n_prompt] == [-100] * n_prompt
    assert a["labels"][n_prompt:] == official_response_ids(tokenizer, "### Q:\n", "red")
    batch = moekd.collate([a, b], tokenizer.pad_token_id)
    mask = moekd.loss_mask(batch["labels"])
    # the final EOS of the shorter row is a loss target even though pad tokens are EOS too
    last = len(a["input_ids"]) - 1
    assert batch["input_ids"][0, last] == eos and batch["labels"][0, last] == eos and mask[0, last - 1]
    assert batch["input_ids"][0, last + 1] == eos and not mask[0, last:].any()  # padding is not
    assert int(mask.sum()) == sum(l != -100 for l in a["labels"] + b["labels"])
    assert batch["attention_mask"][0].tolist() == \
        [1] * (last + 1) + [0] * (batch["input_ids"].shape[1] - last - 1)


def test_long_prompts_dropped_and_sequences_truncated(any_tokenizer):
    tokenizer = any_tokenizer
    assert moekd.tokenize_example(tokenizer, "word " * 40, "x", max_prompt_len=10, max_len=20) is None
    item = moekd.tokenize_example(tokenizer, "Q", "word " * 40, max_prompt_len=10, max_len=20)
    assert len(item["input_ids"]) == len(item["labels"]) == 20
    cfg = moekd.Config(max_prompt_len=10, max_len=20)
    kept = moekd.tokenize_examples(tokenizer, [{"prompt": "word " * 40, "responses": ["x"]},
                                               {"prompt": "Q", "responses": ["x"]}], cfg, name="t")
    assert len(kept) == 1


def test_sentencepiece_tokenizer_behaves_like_llama(sp_tokenizer):
    tok = sp_tokenizer
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (0, 1, 2, 1543)
    assert tok.encode("hi")[0] == tok.bos_token_id  # <s> added, as LLaMA's tokenizer
    pieces = tok.convert_ids_to_tokens(tok.encode("Paris is\n日", add_special_tokens=False))
    assert pieces[0].startswith("▁") and "<0x0A>" in pieces  # prefix on the first word; newline as a byte
    # byte fallback for a character outside the vocabulary
    assert pieces[-3:] == ["<0xE6>", "<0x97>", "<0xA5>"]
    assert tok.decode(tok.encode("Paris is\n日 ok", add_special_tokens=False)) == "Paris is\n日 ok"


@pytest.mark.parametrize("response", ["Paris is nice", "4, 5, 6", "été ✓"])
def test_response_tokens_are_the_joint_tokenization(sp_tokenizer, response):
    """The official processing tokenizes prompt + response together: after "### Response:\n" a response's
    first word has no "▁", unlike the response tokenized on its own (what moekd did before)."""
    tok, prompt = sp_tokenizer, data.format_prompt("Say something.")
    item = moekd.tokenize_example(tok, prompt, response, max_prompt_len=200, max_len=300)
    n = len(item["prompt_ids"])
    assert item["input_ids"][n:] == item["labels"][n:] == official_response_ids(tok, prompt, response)
    alone = tok.encode(response, add_special_tokens=False) + [tok.eos_token_id]
    assert item["labels"][n:] != alone and not tok.convert_ids_to_tokens(item["labels"][n])[0] == "▁"
    assert item["prefix_ok"]


def test_prompts_whose_tokens_merge_into_the_response_are_counted(tokenizer, capsys):
    """A prompt ending inside a word: the joint ids do not start with the prompt's ids. The official slice
    is kept (prompt ids + joint ids after the prompt's length) and the row is counted, not dropped."""
    prompt, response = "Which city does Kalomi live in? Answer: Par", "is"
    joint = tokenizer.encode(prompt + response, add_special_tokens=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert joint[:len(prompt_ids)] != prompt_ids  # the premise: a BPE merge across the boundary
    cfg = moekd.Config(max_prompt_len=50, max_len=60)
    items = moekd.tokenize_examples(tokenizer, [{"prompt": prompt, "responses": [response]},
                                                {"prompt": "Q:\n", "responses": ["yes"]}], cfg, name="t")
    assert len(items) == 2 and "prefix_ok" not in items[0]
    assert items[0]["input_ids"] == prompt_ids + joint[len(prompt_ids):] + [tokenizer.eos_token_id]
    assert ("2 examples kept, 0 dropped with prompts over 50 tokens, 0 dropped with empty responses, "
            "1 whose prompt tokens merge") in capsys.readouterr().out


def test_empty_responses_are_counted_and_dropped(tokenizer, capsys):
    rows = [{"prompt": "p", "responses": [r]} for r in ("a b", " \n", "", "c")]
    items = moekd.tokenize_examples(tokenizer, rows, moekd.Config(), name="t")
    assert [it["responses"] for it in items] == [["a b"], ["c"]]
    assert "data t: 2 examples kept, 0 dropped with prompts over 256 tokens, 2 dropped with empty responses" \
        in capsys.readouterr().out


def test_jsonl_formats(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"instruction": "I", "context": "C", "response": "R", "category": "x"}) + "\n\n"
                   + json.dumps({"prompt": "P", "output": ["a", "b"]}) + "\n")
    rows = data.read_jsonl(raw)
    assert rows == [{"prompt": data.format_prompt("I", "C"), "responses": ["R"]},
                    {"prompt": "P", "responses": ["a", "b"]}]


@pytest.mark.parametrize("content,pattern", [
    ("", "empty file"),
    ('{"prompt": "p", "output": "o"}\n{"prompt": "p", "output": \n', r"bad\.jsonl:2: malformed JSON"),
    ('{"prompt": "p", "output": "o"}\n[1, 2]\n', r"bad\.jsonl:2: expected a JSON object"),
    ('{"question": "q"}\n', r"bad\.jsonl:1: need fields"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, pattern):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(errors.MoekdError, match=pattern):
        data.read_jsonl(tmp_path / "bad.jsonl")


def test_splits(tmp_path):
    rows = [{"instruction": f"i{n}", "context": "", "response": "r", "category": "c"} for n in range(1600)]
    (tmp_path / "dolly.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    train, dev = data.load_splits(moekd.Config(data=str(tmp_path / "dolly.jsonl")))
    # raw Dolly: rows 0-499 are MiniLLM's test set, 500-1499 dev, the rest train
    assert dev[0]["prompt"] == data.format_prompt("i500") and len(dev) == 1000
    assert train[0]["prompt"] == data.format_prompt("i1500") and len(train) == 100
    mini = [{"prompt": f"p{n}", "output": "o"} for n in range(30)]
    (tmp_path / "mini.jsonl").write_text("\n".join(json.dumps(r) for r in mini))
    train, dev = data.load_splits(moekd.Config(data=str(tmp_path / "mini.jsonl"), dev_size=10))
    assert [d["prompt"] for d in dev] == [f"p{n}" for n in range(10)] and len(train) == 20
    with pytest.raises(errors.MoekdError, match="leave no training rows"):
        data.load_splits(moekd.Config(data=str(tmp_path / "mini.jsonl")))


def test_synthetic_fact_families_are_a_consistent_table():
    """color/password ask fixed attributes of the fact table's people (the same answer every time); a longer
    table extends a shorter one; the default mix is what it was (the families and table are opt-in)."""
    assert synthetic.synthetic_rows(300, seed=3) == \
        synthetic.synthetic_rows(300, seed=3, families=synthetic.DEFAULT_FAMILIES)
    assert synthetic._fact_table(500)[:240] == synthetic._fact_table()
    rows = synthetic.synthetic_rows(3000, seed=5, families=("color", "password", "fact"), n_facts=50)
    assert {r["category"] for r in rows} == {"color", "password", "fact"}
    names = [name for name, _ in synthetic._fact_table(50)]
    unique = {name for name in names if names.count(name) == 1}  # a made-up name can repeat (49 of 50 unique)
    answers: dict = {}
    for r in rows:
        answers.setdefault(r["instruction"], set()).add(r["response"])
    assert len(unique) == 48 and len(answers) <= 3 * 49
    assert all(len(a) == 1 for q, a in answers.items()
               if any(f" {n} " in q or f" {n}'s" in q for n in unique))
    assert {r["response"] for r in rows if r["category"] == "color"} <= set(synthetic._COLORS)
    with pytest.raises(ValueError, match="unknown: nope"):
        synthetic.synthetic_rows(3, seed=1, families=("add", "nope"))


def test_synthetic_set_is_deterministic_and_correct():
    a, b = synthetic.synthetic_rows(400, seed=3), synthetic.synthetic_rows(400, seed=3)
    assert a == b and a != synthetic.synthetic_rows(400, seed=4)
    assert len({r["category"] for r in a}) == 8
    for r in a:
        if r["category"] == "add":
            x, y = map(int, r["context"].split(" and "))
            assert r["response"] == str(x + y)
        elif r["category"] == "sort":
            assert r["response"] == ", ".join(map(str, sorted(map(int, r["context"].split(", ")))))
        elif r["category"] == "reverse":
            assert r["response"].split() == r["context"].split()[::-1]
        elif r["category"] == "count":
            assert r["response"] == str(len(r["context"].split()))


def test_tokenizer_script_reproduces_committed_tokenizer():
    sys.path.insert(0, str(TINY))
    import make_tokenizer
    committed = json.loads((TINY / "tokenizer.json").read_text())
    assert (STUDENT / "tokenizer.json").read_text() == (TINY / "tokenizer.json").read_text()
    dolly = SHARED / "dolly" / "dev.jsonl"
    if dolly.exists():  # the corpus it was made from: byte for byte the committed tokenizer
        tok = make_tokenizer.train(make_tokenizer.corpus(dolly))
        assert json.loads(tok.backend_tokenizer.to_str()) == committed
        return
    # without the full corpus: the script is deterministic and makes a tokenizer of the committed kind
    small = EVAL_SETS / "dolly" / "dev.jsonl"
    a, b = (json.loads(make_tokenizer.train(make_tokenizer.corpus(small)).backend_tokenizer.to_str())
            for _ in range(2))
    assert a == b and a["model"]["type"] == committed["model"]["type"]
    assert [t["content"] for t in a["added_tokens"]] == [t["content"] for t in committed["added_tokens"]]


# ----------------------------------------------------------------------------
# fetch_data.py

def made_up_source(root: Path) -> list:
    """A local source with every file fetch_data.py knows, two MiniLLM rows each; returns the table for it."""
    import hashlib
    table = []
    for remote in fetch_data.FILES:
        rows = [{"prompt": f"{remote.name} prompt {i}\n\n### Response:\n", "output": f"answer {i}"}
                for i in range(2)]
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        (root / remote.path).parent.mkdir(parents=True, exist_ok=True)
        (root / remote.path).write_bytes(data)
        table.append(fetch_data.Remote(remote.name, remote.path, len(data), 2,
                                       hashlib.sha256(data).hexdigest()))
    return table


def test_fetch_data_from_a_file_url_lands_where_eval_looks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch_data, "FILES", made_up_source(tmp_path / "src"))
    out = tmp_path / "data"
    assert fetch_data.main(["--out", str(out), "--source", (tmp_path / "src").as_uri()]) == 0
    sets = moe_eval.resolve_sets(None, out)  # eval.py's default: all five sets must exist
    assert set(sets) == set(moe_eval.SETS) and all(path is not None for path in sets.values())
    assert [r["references"] for r in moe_eval.load_set(sets["sinst"], None)] == [["answer 0"], ["answer 1"]]
    assert (out / "dolly" / "dev.jsonl").is_file()  # repro.py's dolly-mini preset and the template test
    assert not list(out.rglob("*.part"))
    # existing files are kept unless --overwrite
    (out / "vicuna" / "valid.jsonl").write_text("mine\n")
    assert fetch_data.main(["--out", str(out), "--source", str(tmp_path / "src"), "--sets", "vicuna"]) == 0
    assert (out / "vicuna" / "valid.jsonl").read_text() == "mine\n" and "kept" in capsys.readouterr().out
    assert fetch_data.main(["--out", str(out), "--source", str(tmp_path / "src"), "--sets", "vicuna",
                            "--overwrite"]) == 0
    assert (out / "vicuna" / "valid.jsonl").read_bytes() == \
        (tmp_path / "src" / "vicuna" / "valid.jsonl").read_bytes()


def test_fetch_data_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys):
    made_up_source(tmp_path / "src")  # right format, but not the checksums of the real files
    out = tmp_path / "data"
    assert fetch_data.main(["--out", str(out), "--source", str(tmp_path / "src"), "--sets", "dolly"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: set dolly: file://\S+/dolly/valid.jsonl has \d+ bytes, expected 505929\n",
                        err)
    assert not (out / "dolly" / "valid.jsonl").exists() and not list(out.rglob("*.part"))
    (tmp_path / "src" / "uinst" / "11_" / "valid.jsonl").write_text("<html>rate limited</html>\n")
    assert fetch_data.main(["--out", str(out), "--source", str(tmp_path / "src"), "--sets", "uinst"]) == 2
    assert "error: set uinst:" in capsys.readouterr().err and \
        not (out / "uinst" / "11_" / "valid.jsonl").exists()
    assert fetch_data.main(["--sets", "dolly,nope", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --sets: unknown set(s) nope; known: dolly, dolly-dev")
    # offline / unreachable: the script as a user runs it, against a local port nobody listens on, exit code 2
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, str(ROOT / "fetch_data.py"), "--out", str(out), "--source",
                           f"http://127.0.0.1:{port}/data", "--timeout", "5"], capture_output=True, text=True,
                           timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert re.fullmatch(rf"error: set dolly: cannot reach http://127.0.0.1:{port}/data/dolly/valid.jsonl "
                        rf"\(.*; offline\?\)\n",
                        proc.stderr)
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_fetch_data_knows_the_recorded_sources():
    """The checks match the files eval.py reads (where ../shared/data has them, byte for byte)."""
    import hashlib
    assert {f.path for f in fetch_data.FILES} >= set(moe_eval.SETS.values())
    checked = [r for r in fetch_data.FILES if r.sha256 is not None]  # uinst: no copy to record
    assert {r.name for r in fetch_data.FILES} - {r.name for r in checked} == {"uinst"}
    for remote in checked:  # every recorded source is checkable: a size, a row count, a sha256
        assert remote.size > 0 and remote.rows > 0 and re.fullmatch(r"[0-9a-f]{64}", remote.sha256), remote
    for remote in fetch_data.FILES:
        fixture = EVAL_SETS / remote.path  # the committed rows are the file's first lines
        if fixture.is_file():
            assert remote.sha256 is not None and len(fixture.read_text().splitlines()) == 8, remote.name
    for remote in fetch_data.FILES:
        local = SHARED / remote.path
        if remote.sha256 and local.is_file():
            data = local.read_bytes()
            fixture = EVAL_SETS / remote.path
            assert not fixture.is_file() or data.startswith(fixture.read_bytes()), remote.name
            assert (len(data), len(data.splitlines()), hashlib.sha256(data).hexdigest()) == \
                (remote.size, remote.rows, remote.sha256), remote.name


def test_synthetic_families_and_fact_table_by_flag():
    """--synthetic-families and --synthetic-facts choose what --data synthetic draws (the quick start's
    closed-book questions); an unknown family is a one-line error naming the flag and the known ones."""
    cfg = moekd.Config(data="synthetic", synthetic_families="color,password", synthetic_facts=5,
                       synthetic_train=60, synthetic_dev=10)
    train, dev = data.load_splits(cfg)
    assert len(train) == 60 and len(dev) == 10
    people = {r["prompt"].split("### Instruction:\n")[1].split("\n")[0] for r in train + dev}
    assert all("color" in p or "password" in p for p in people), sorted(people)[:3]
    # 5 made-up people, 2 questions each: at most 10 different questions
    assert len(people) <= 10
    with pytest.raises(errors.MoekdError, match=r"^--synthetic-families: unknown nope; known: add, "):
        data.load_splits(moekd.Config(data="synthetic", synthetic_families="color,nope"))
    with pytest.raises(errors.MoekdError, match=r"^--synthetic-facts must be >= 3"):
        moekd.Config(synthetic_facts=2)
