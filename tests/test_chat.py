"""Chat models and any dataset (issue 27): conversations through the student's chat template, the end-of-turn
token in sampling, dev and eval generation, teacher/student template agreement, tables read by column through
`datasets`, and the README's chat distillation on tiny models.

The tokenizers are tiny_moe/chat/'s (make_chat.py): chatml/ (byte-level like Qwen's, eos_token
<|endoftext|> as a base model's, the turn ends with <|im_end|>) and llama3/ (Llama 3's template with its own
BOS, encode() adding one too, generation_config.json listing three eos ids). Expected ids are written out by
hand from their vocabularies, never computed with the code under test.
"""
import json
import re
import shlex
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import checkpoints  # noqa: E402
import data  # noqa: E402
import errors  # noqa: E402
import moekd  # noqa: E402
import sampling  # noqa: E402

CHAT = ROOT / "tiny_moe" / "chat"
CHATML, LLAMA3, CHATML_STUDENT = CHAT / "chatml", CHAT / "llama3", CHAT / "chatml" / "student"
# the special ids of the two vocabularies (tokenizer.json's added tokens, at the end as in Qwen and Llama 3)
ENDOFTEXT, IM_START, IM_END = 997, 998, 999
BEGIN, END_OF_TEXT, START_HEADER, END_HEADER, EOM, EOT = 1011, 1012, 1013, 1014, 1015, 1016
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 13."},
                {"role": "assistant", "content": "15"}, {"role": "user", "content": "Spell cup."},
                {"role": "assistant", "content": " c-u-p "}]


def chat_tokenizer(folder: Path):
    tok = checkpoints.load_tokenizer(str(folder))
    data.set_template(tok, "chat")
    return tok


@pytest.fixture
def chatml():
    return chat_tokenizer(CHATML)


@pytest.fixture
def llama3():
    return chat_tokenizer(LLAMA3)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------
# The tiny chat tokenizers and models

def test_chat_script_reproduces_the_committed_files(tmp_path):
    """make_chat.py is the source of tiny_moe/chat/: re-running it writes the same bytes."""
    sys.path.insert(0, str(CHAT))
    import make_chat
    make_chat.main(["--out", str(tmp_path)])
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(written) == 13
    for rel in written:
        assert (tmp_path / rel).read_bytes() == (CHAT / rel).read_bytes(), rel


def test_the_tiny_tokenizers_behave_like_their_models():
    """No BOS from the ChatML tokenizer; Llama 3's encode() adds <|begin_of_text|>; specials at the end."""
    chatml, llama3 = checkpoints.load_tokenizer(str(CHATML)), checkpoints.load_tokenizer(str(LLAMA3))
    assert chatml.encode("Add 2 and 13.") == [389, 220, 17, 388, 220, 16, 18, 13]  # Add Ġ 2 Ġand Ġ 1 3 .
    assert llama3.encode("Add 2 and 13.") == [BEGIN, 402, 220, 17, 401, 220, 448, 13]  # digits in threes: 13
    assert (len(chatml), chatml.eos_token_id, chatml.pad_token_id, chatml.bos_token_id) == (1000, ENDOFTEXT,
                                                                                          ENDOFTEXT, None)
    assert (len(llama3), llama3.eos_token_id, llama3.bos_token_id) == (1017, END_OF_TEXT, BEGIN)
    assert json.loads((CHATML / "config.json").read_text())["model_type"] == "qwen3_moe"


# ----------------------------------------------------------------------------
# The end-of-turn rule

def test_stop_ids_are_the_end_of_turn_then_eos_then_generation_config(chatml, llama3):
    """The response's end token is the first special token the template writes after an assistant turn; then
    the tokenizer's EOS and every eos id of generation_config.json (Llama 3.1 lists several)."""
    assert sampling.stop_ids(chatml) == [IM_END, ENDOFTEXT]        # <|im_end|> from the template alone
    assert sampling.stop_ids(llama3) == [EOT, END_OF_TEXT, EOM]    # <|eom_id|> from generation_config alone
    plain = checkpoints.load_tokenizer(str(CHATML))
    data.set_template(plain, "alpaca")
    assert sampling.stop_ids(plain) == [ENDOFTEXT]                 # the paper's template: EOS, as before


def test_end_of_turn_rule_errors(tmp_path):
    shutil.copytree(CHATML_STUDENT, tmp_path / "m")
    tok = checkpoints.load_tokenizer(str(tmp_path / "m"))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(errors.MoekdError, match=r"^--template chat: the chat template of --model .*m writes "
                                               r"no special token after an assistant turn"):
        data.set_template(tok, "chat")
    with pytest.raises(errors.MoekdError, match=r"^--template chat: --model .*tiny_moe/student has no chat "
                                               r"template"):
        data.set_template(checkpoints.load_tokenizer(str(ROOT / "tiny_moe" / "student")), "chat")
    (tmp_path / "m" / "generation_config.json").write_text('{"eos_token_id": "</s>"}')
    with pytest.raises(errors.MoekdError, match=r"generation_config.json: eos_token_id must be an id or a "):
        data.set_template(checkpoints.load_tokenizer(str(tmp_path / "m")), "chat")


# ----------------------------------------------------------------------------
# Conversations through the chat template: prompt, response, labels

def test_chatml_conversation_token_ids(chatml):
    """The prompt is every turn before the last assistant turn + the generation prompt; the response is that
    turn (its spaces kept: ChatML does not trim) through <|im_end|>, never EOS, without the "\\n" after it."""
    ex = data.chat_example(CONVERSATION, where="t", template="chat")
    text = data.prompt_and_response(chatml, ex)
    item = moekd.tokenize_example(chatml, *text, max_prompt_len=64, max_len=80)
    prompt = [IM_START, 329, 198, 33, 68, 299, 81, 72, 68, 69, 13, IM_END, 198,      # system\nBe brief.
              IM_START, 281, 198, 389, 220, 17, 388, 220, 16, 18, 13, IM_END, 198,   # user\nAdd 2 and 13.
              IM_START, 278, 198, 16, 20, IM_END, 198,                               # assistant\n15 (earlier)
              IM_START, 281, 198, 369, 517, 13, IM_END, 198,                         # user\nSpell cup.
              IM_START, 278, 198]                                                    # assistant\n
    response = [285, 675, 564, 220, IM_END]                                          # Ġc -u -p Ġ <|im_end|>
    assert item["input_ids"] == prompt + response
    assert item["labels"] == [-100] * len(prompt) + response
    assert item["prompt_ids"] == prompt and item["prefix_ok"]


def test_llama3_conversation_token_ids(llama3):
    """One BOS (the template's; encode() adds none in training), the response trimmed by the template and
    ended by <|eot_id|>."""
    ex = data.chat_example(CONVERSATION, where="t", template="chat")
    text = data.prompt_and_response(llama3, ex)
    item = moekd.tokenize_example(llama3, *text, max_prompt_len=64, max_len=80)
    prompt = [BEGIN, START_HEADER, 343, END_HEADER, 268, 33, 68, 327, 81, 72, 68, 69, 13, EOT,  # system ...
              START_HEADER, 291, END_HEADER, 268, 402, 220, 17, 401, 220, 448, 13, EOT,  # user Add 2 and 13.
              START_HEADER, 285, END_HEADER, 268, 461, EOT,                              # assistant 15
              START_HEADER, 291, END_HEADER, 268, 384, 537, 13, EOT,                     # user Spell cup.
              START_HEADER, 285, END_HEADER, 268]                                        # assistant \n\n
    response = [66, 708, 584, EOT]                                                       # c -u -p
    assert item["input_ids"] == prompt + response
    assert item["labels"] == [-100] * len(prompt) + response


def test_rows_without_the_prefix_property_are_counted_and_dropped(chatml, capsys):
    """A template whose generation prompt differs from how it writes the assistant turn (an empty think block
    when there is no system turn, as Qwen3's with thinking off) cannot split prompt from response: those rows
    are dropped and counted, the others kept; with none left the error says why."""
    chatml.chat_template = chatml.chat_template.replace(
        "'<|im_start|>assistant\\n' }}",
        "'<|im_start|>assistant\\n' }}{%- if messages[0]['role'] != 'system' %}"
        "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}")
    long = [CONVERSATION[3], {"role": "assistant", "content": "c-u-p, and again: c-u-p"}]  # > the think block
    rows = [data.chat_example(m, where="t", template="chat") for m in (CONVERSATION, CONVERSATION[1:3], long)]
    cfg = moekd.Config(max_prompt_len=64, max_len=80)
    items = moekd.tokenize_examples(chatml, rows, cfg, name="train")
    assert [it["input_ids"][-5:] for it in items] == [[285, 675, 564, 220, IM_END]]  # the one with a system
    assert "2 dropped whose chat template renders their prompt other than as the start of the conversation" \
        in capsys.readouterr().out
    with pytest.raises(errors.MoekdError, match=r"no examples left .* 2 not split by the chat template"):
        moekd.tokenize_examples(chatml, rows[1:], cfg, name="dev")


# ----------------------------------------------------------------------------
# Where generation stops: on-policy sampling, dev and eval generation, response_through_eos, padding

def test_response_through_eos_honours_every_stop_id():
    stops = [EOT, END_OF_TEXT, EOM]
    assert moekd.response_through_eos([5, EOM, 7, EOT], stops) == [5, EOM]
    assert moekd.response_through_eos([5, END_OF_TEXT], stops) == [5, END_OF_TEXT]
    assert moekd.response_through_eos([5, 6, 7], stops) == [5, 6, EOT]  # never stopped: end of turn forced
    assert moekd.response_through_eos([5, 2, 7], 2) == [5, 2]             # one id, as before


class CannedStudent(torch.nn.Module):
    """generate() returns canned continuations, so where responses stop is tested without a model."""

    def __init__(self, continuations):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.continuations, self.seen = continuations, None

    def generate(self, input_ids, attention_mask, generation_config):
        self.seen = (input_ids.clone(), generation_config)
        return torch.tensor([input_ids[i].tolist() + c for i, c in enumerate(self.continuations)])


def test_on_policy_samples_end_at_the_end_of_turn(llama3):
    stub = CannedStudent([[5, EOM, 9, 9], [7, 8, 9, 4]])  # <|eom_id|> ends row 0; row 1 never stops
    cfg = moekd.Config(max_prompt_len=4, max_len=8)
    items = moekd.generate_on_policy(stub, [{"prompt_ids": [10, 11]}, {"prompt_ids": [12]}], llama3, cfg)
    assert items[0] == {"input_ids": [10, 11, 5, EOM], "labels": [-100, -100, 5, EOM]}
    assert items[1] == {"input_ids": [12, 7, 8, 9, EOT], "labels": [-100, 7, 8, 9, EOT]}
    assert stub.seen[1].eos_token_id == [EOT, END_OF_TEXT, EOM]


def test_dev_and_eval_responses_are_cut_at_the_end_of_turn(chatml, tmp_path):
    """sample_responses (dev ROUGE-L, eval.py) stops at <|im_end|> although EOS is <|endoftext|>; eval.py with
    --template chat renders the instruction and input as one user turn with the generation prompt."""
    import eval as moe_eval
    seq = [285, 675, 564]                                            # " c-u-p"
    stub = CannedStudent([seq + [IM_END, 389, 220], seq + [IM_END, ENDOFTEXT, ENDOFTEXT]])
    texts = sampling.sample_responses(stub, chatml, [[1, 2], [3]], max_new_tokens=5, batch_size=2, seed=1)
    assert texts == ["c-u-p", "c-u-p"] and stub.seen[1].eos_token_id == [IM_END, ENDOFTEXT]
    path = write_jsonl(tmp_path / "valid.jsonl", [{"instruction": "Spell cup.", "input": "", "prompt": "P",
                                                   "output": "c-u-p"}])
    examples = moe_eval.load_set(path, None, "chat")
    args = moe_eval.parse_args(["--model", "x", "--template", "chat"])
    args.amp_dtype = torch.float32
    stub = CannedStudent([seq + [IM_END, 389]])
    assert moe_eval.generate(stub, chatml, examples, 10, args, desc="t") == ["c-u-p"]
    assert stub.seen[0].tolist() == [[IM_START, 281, 198, 369, 517, 13, IM_END, 198, IM_START, 278, 198]]
    assert moe_eval.chat_prompt_ids(chatml, examples, 4) == [[198, IM_START, 278, 198]]  # the end is kept
    llama3 = chat_tokenizer(LLAMA3)  # the template's BOS only, not encode()'s too
    assert moe_eval.chat_prompt_ids(llama3, examples, 64) == [
        [BEGIN, START_HEADER, 291, END_HEADER, 268, 384, 537, 13, EOT, START_HEADER, 285, END_HEADER, 268]]


def test_eval_py_with_the_chat_template(tmp_path, capsys):
    """eval.py --template chat end to end on the tiny chat models: ROUGE-L of conversations (the template
    in the recorded protocol, the prompt the last user turn) and the gate-mass analysis on their gold
    responses."""
    import eval as moe_eval
    sets = f"chat={CHAT / 'conversations.jsonl'}"
    common = ["--template", "chat", "--sets", sets, "--seeds", "10", "--max-examples", "4",
              "--max-new-tokens", "8", "--no-plots"]
    moe_eval.main(["--model", str(CHATML_STUDENT), "--out", str(tmp_path / "rouge"), *common])
    protocol = json.loads((tmp_path / "rouge" / "eval.json").read_text())["protocol"]
    first = json.loads((tmp_path / "rouge" / "generations.jsonl").read_text().splitlines()[0])
    assert protocol["template"] == "chat" and first["prompt"] == "Add the two numbers.\n\n15 and 16"
    result = moe_eval.main(["--model", str(CHATML), "--analysis", "gate-mass", "--out", str(tmp_path / "gm"),
                            *common])
    assert len(result["mass"]) == 2 and all(abs(m[-1] - 1) < 1e-5 for m in result["mass"])
    assert "a response ends with <|im_end|>" in capsys.readouterr().out


def test_the_sampler_stops_rows_at_any_stop_id_and_pads_after(llama3):
    """moekd's sampler and generate() end each row at its first stop id of the list, whichever it is (here
    the list's second ends the row that stops first), and pad it afterwards."""
    model = checkpoints.load_model(str(LLAMA3))
    prompts = [llama3.encode("Spell cup.", add_special_tokens=False), llama3.encode("Add 2 and 13.")]
    kw = dict(pad_id=llama3.pad_token_id, max_new_tokens=12, batch_size=2, seeds=[3, 4])
    free = sampling.sample_tokens(model, prompts, eos_id=-1, **kw)
    a, b = free[0][2], free[1][6]  # row 0 stops at step 2, row 1 at step 6 (tokens new to their rows)
    assert a not in free[0][:2] + free[1][:7] and b not in free[0][:3] + free[1][:6]
    for sampler in ("moekd", "generate"):
        rows = sampling.sample_tokens(model, prompts, eos_id=[b, a], sampler=sampler, **kw)
        assert rows == [free[0][:3] + [llama3.pad_token_id] * 4, free[1][:7]], sampler


# ----------------------------------------------------------------------------
# Teacher and student render one template

def test_teacher_and_student_must_render_one_chat_template(tmp_path):
    other = shutil.copytree(CHATML, tmp_path / "teacher")
    config = json.loads((other / "tokenizer_config.json").read_text())
    template = config["chat_template"]
    config["chat_template"] = template.replace("<|im_start|>' + message['role'] + '\\n'",
                                                              "<|im_start|>' + message['role'] + ':\\n'")
    assert config["chat_template"] != template
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    args = ["--tiny", "--template", "chat", "--method", "gkd", "--model", str(CHATML_STUDENT),
            "--data", str(CHAT / "conversations.jsonl"), "--dev-size", "32", "--out", str(tmp_path / "run")]
    with pytest.raises(errors.MoekdError, match=rf"^--template chat: --teacher {other} and --model "
                                               rf"{CHATML_STUDENT} render different chat templates \(e.g. "):
        moekd.main(args + ["--teacher", str(other)])
    config.pop("chat_template")
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(errors.MoekdError, match=r"render different chat templates \(the teacher has none\)"):
        moekd.main(args + ["--teacher", str(other)])


# ----------------------------------------------------------------------------
# Rows: conversations, instructions as one user turn, bad rows

def test_instruction_rows_become_one_user_turn_under_chat():
    dolly = {"instruction": "Spell the word.", "context": "cup", "response": "c-u-p", "category": "x"}
    minillm = {"instruction": "Add.", "input": "", "prompt": "Below is ...", "output": ["3", "three"]}
    assert data.to_example(dolly, where="t", template="chat")["messages"] == [
        {"role": "user", "content": "Spell the word.\n\ncup"}, {"role": "assistant", "content": "c-u-p"}]
    ex = data.to_example(minillm, where="t", template="chat")
    assert ex["messages"][0] == {"role": "user", "content": "Add."} and ex["responses"] == ["3", "three"]
    assert data.to_example(minillm, where="t") == {"prompt": "Below is ...", "responses": ["3", "three"]}


@pytest.mark.parametrize("row,template,pattern", [
    ({"messages": CONVERSATION}, "alpaca", r"/c\.jsonl:1: 'messages': a conversation needs --template chat"),
    ({"messages": "hi"}, "chat", r"/c\.jsonl:1: 'messages': must be a non-empty list of turns"),
    ({"messages": [{"role": "user"}]}, "chat",
     r"/c\.jsonl:1: 'messages'\[0\]: a turn needs a string 'role' and a string 'content', "
     r"got \{\"role\": \"user\"\}"),
    ({"messages": CONVERSATION[:2]}, "chat", r"/c\.jsonl:1: 'messages': no assistant turn, nothing to learn"),
    ({"messages": CONVERSATION[2:3]}, "chat", r"/c\.jsonl:1: 'messages': the assistant turn comes first"),
    ({"question": "q"}, "chat", r"/c\.jsonl:1: need fields .* or messages \(a conversation\), or name them "
                                r"with --prompt-column/--response-column; got \['question'\]"),
])
def test_bad_conversations_are_one_line_errors(tmp_path, row, template, pattern):
    with pytest.raises(errors.MoekdError, match=pattern):
        data.read_jsonl(write_jsonl(tmp_path / "c.jsonl", [row]), template=template)


def test_turns_after_the_last_assistant_turn_are_left_out():
    ex = data.chat_example(CONVERSATION[1:4], where="t", template="chat")
    assert ex["messages"] == CONVERSATION[1:3] and ex["responses"] == ["15"]


# ----------------------------------------------------------------------------
# Any dataset by column, through `datasets`

ROWS = [{"question": f"q{i}", "answer": f"a{i}", "extra": i} for i in range(4)]


def dataset_files(tmp_path: Path) -> dict[str, Path]:
    """The same rows as jsonl, parquet, csv, an arrow file and a DatasetDict folder, written by `datasets`."""
    import datasets
    table = datasets.Dataset.from_list(ROWS)
    files = {"jsonl": tmp_path / "d.jsonl", "parquet": tmp_path / "d.parquet", "csv": tmp_path / "d.csv"}
    table.to_json(files["jsonl"])
    table.to_parquet(files["parquet"])
    table.to_csv(files["csv"], index=False)
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(tmp_path / "saved")
    files["saved"] = tmp_path / "saved"
    table.save_to_disk(tmp_path / "single")
    files["arrow"] = next((tmp_path / "single").glob("*.arrow"))
    return files


def test_any_table_by_column(tmp_path, capsys):
    """Every format gives the same examples (the prompt column as the instruction of the Alpaca template, or
    one user turn under chat); the data log names the columns; --dev-split takes dev from a split."""
    files = dataset_files(tmp_path)
    for kind, path in files.items():
        cfg = moekd.Config(data=str(path), prompt_column="question", response_column="answer", dev_size=1)
        train, dev = data.load_splits(cfg)
        assert dev == [{"prompt": data.format_prompt("q0"), "responses": ["a0"]}], kind
        assert [ex["responses"] for ex in train] == [["a1"], ["a2"], ["a3"]], kind
        assert f"data --data {path}: 4 rows read by columns 'question' (prompt) and 'answer' (response); " \
               f"template alpaca" in capsys.readouterr().out, kind
    cfg = moekd.Config(data=str(files["saved"]), prompt_column="question", response_column="answer",
                       dev_split="test", template="chat")
    train, dev = data.load_splits(cfg)
    assert len(train) == 4 and dev == [{"messages": [{"role": "user", "content": "q0"},
                                                     {"role": "assistant", "content": "a0"}],
                                        "responses": ["a0"], "where": "(one user turn)"}]
    assert "data --data " + str(files["saved"]) + " split test: 1 rows" in capsys.readouterr().out


def test_trl_conversational_prompt_completion_columns(tmp_path):
    """TRL's conversational prompt/completion rows: the prompt's turns, then the completion's."""
    row = {"prompt": CONVERSATION[:4], "completion": [CONVERSATION[4]]}
    path = write_jsonl(tmp_path / "pc.jsonl", [row])
    ex, = data.read_jsonl(path, template="chat", columns=("prompt", "completion"))
    assert ex["messages"] == CONVERSATION and ex["responses"] == [" c-u-p "]


def test_conversations_from_parquet(tmp_path, chatml):
    """messages columns survive parquet (lists of structs) and tokenize as the jsonl rows do."""
    import datasets
    datasets.Dataset.from_list([{"messages": CONVERSATION}] * 3).to_parquet(tmp_path / "c.parquet")
    train, dev = data.load_splits(moekd.Config(data=str(tmp_path / "c.parquet"), template="chat", dev_size=1))
    item, = moekd.tokenize_examples(chatml, dev, moekd.Config(max_prompt_len=64, max_len=80), name="dev")
    assert item["input_ids"][-5:] == [285, 675, 564, 220, IM_END] and len(train) == 2


@pytest.mark.parametrize("flags,pattern", [
    (["--prompt-column", "questio", "--response-column", "answer"],
     r"^--data {parquet}: no column 'questio' \(--prompt-column\); its columns: question, answer, extra$"),
    (["--data", "{jsonl}", "--prompt-column", "question", "--response-column", "answr"],
     r"^{jsonl}:1: no column 'answr' \(--response-column\); the row has answer, extra, question$"),
    (["--data", "{saved}", "--data-split", "validation"],
     r"^--data {saved}: no split 'validation' \(--data-split; its splits: train, test\)$"),
    (["--data", "{saved}", "--dev-split", "validation", "--prompt-column", "question",
      "--response-column", "answer"],
     r"^--data {saved}: no split 'validation' \(--dev-split; its splits: train, test\)$"),
    (["--data-split", "test"],
     r"^--data {parquet}: one table without splits, so no split 'test' \(--data-split\)$"),
    (["--data", "{jsonl}", "--dev-split", "test", "--prompt-column", "question",
      "--response-column", "answer"],
     r"^--data {jsonl}: a jsonl file has no splits, so no split 'test' \(--dev-split\)$"),
    (["--prompt-column", "question"], r"^--prompt-column and --response-column go together$"),
    (["--data", "{saved}/nothing.parquet"], r"^--data {saved}/nothing.parquet: no such file or folder"),
])
def test_missing_column_or_split_is_one_line_error(tmp_path, capsys, flags, pattern):
    files = {k: str(v) for k, v in dataset_files(tmp_path).items()}
    capsys.readouterr()  # what writing the files printed
    argv = ["--tiny", "--data", files["parquet"], *[f.format(**files) for f in flags],
            "--out", str(tmp_path / "r")]
    code = errors.run_cli(lambda: moekd.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    pattern = pattern.format(**{k: re.escape(v) for k, v in files.items()})
    assert code == 2 and len(err) == 1 and re.search(pattern, err[0].removeprefix("error: ")), err


# ----------------------------------------------------------------------------
# The README's chat distillation, run as written (on the tiny models it names)

README = ROOT / "README.md"
COMMAND_MARKER = "<!-- command: chat-distill -->"


def readme_commands() -> list[list[str]]:
    """The ```bash block right after the marker: its `python moekd.py ...` commands joined by &&."""
    text = README.read_text()
    assert text.count(COMMAND_MARKER) == 1, f"README.md needs exactly one {COMMAND_MARKER}"
    match = re.match(r"\s*```bash\n(.*?)\n```", text.split(COMMAND_MARKER, 1)[1], re.S)
    assert match, f"README.md: no ```bash block right after {COMMAND_MARKER}"
    return [shlex.split(c) for c in match.group(1).replace("\\\n", " ").split("&&")]


def test_readme_chat_distillation_runs(tmp_path, monkeypatch, capsys):
    """KA and SAR from the tiny Qwen3-MoE teacher on conversations, as the README says (its --out moved to
    tmp_path): both finish, under the chat template, and the on-policy samples end with <|im_end|>."""
    monkeypatch.chdir(ROOT)
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["python", "moekd.py"]] * 2
    methods = [c[c.index("--method") + 1] for c in commands]
    assert methods == ["ka", "sar"] and all(c[c.index("--template") + 1] == "chat" for c in commands)
    ends = Counter()
    real = moekd.generate_on_policy
    monkeypatch.setattr(moekd, "generate_on_policy", lambda *a, **kw: [
        ends.update([it["input_ids"][-1]]) or it for it in real(*a, **kw)])
    for command in commands:
        argv = command[2:]
        argv[argv.index("--out") + 1] = str(tmp_path / Path(argv[argv.index("--out") + 1]).name)
        teacher = argv[argv.index("--teacher") + 1]
        assert json.loads((ROOT / teacher / "config.json").read_text())["model_type"] == "qwen3_moe"
        result = moekd.main(argv)
        assert result["finished"] and result["step"] == result["total_steps"] > 0
        run = json.loads((tmp_path / Path(argv[argv.index("--out") + 1]).name / "run.json").read_text())
        assert run["template"] == "chat"
    out = capsys.readouterr().out
    assert "a response ends with <|im_end|>, generation stops at <|im_end|> (999), <|endoftext|> (997)" in out
    assert "rows read by messages (240 rows); template chat" in out
    assert set(ends) <= {IM_END, ENDOFTEXT} and ends[IM_END] > 0  # forced ends too: never stopped, never EOS
