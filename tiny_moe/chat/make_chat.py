"""Write tiny_moe/chat/: two tiny chat tokenizers with Jinja chat templates, the tiny chat models that use
the ChatML one, and a small conversational data set. Deterministic: re-running it reproduces the committed
files (a test checks).

    python tiny_moe/chat/make_chat.py            # --out DIR: somewhere else

- chatml/: a byte-level BPE like Qwen's (Qwen2's pre-tokenizer regex: digits one by one), its special tokens
  at the end of the vocabulary (<|endoftext|>, <|im_start|>, <|im_end|>), no BOS, and the ChatML template.
  eos_token is <|endoftext|>, as in a base model's tokenizer (Qwen3-*-Base): a turn ends with <|im_end|>,
  which only the template tells. chatml/ itself is a tiny Qwen3-MoE teacher, chatml/student/ a tiny dense
  Qwen3 student (config-only folders: weights drawn from moekd_init_seed).
- llama3/: a byte-level BPE like Llama 3's (its regex: digits in groups of up to three), special tokens at
  the end (<|begin_of_text|>, <|end_of_text|>, <|start_header_id|>, <|end_header_id|>, <|eom_id|>,
  <|eot_id|>), <|begin_of_text|> added by encode() *and* written by the template (Llama 3's double-BOS
  trap), eos_token <|end_of_text|>, and generation_config.json listing three eos ids as Llama 3.1 does.
  llama3/ itself is a tiny dense Llama student (config-only).
- conversations.jsonl: chat rows (`messages`) made from the synthetic instruction set (tiny_moe/synthetic.py):
  some with a system turn, some with an earlier question and answer before the last one.

The corpus is the synthetic set rendered through both templates, so the tiny vocabularies hold its words.
"""
import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from tiny_moe import synthetic  # noqa: E402

CHATML_VOCAB = 997      # words and bytes; + 3 special tokens = 1000
LLAMA3_VOCAB = 1011     # + 6 special tokens = 1017
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eom_id|>", "<|eot_id|>"]
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2.5's ChatML template without tools and without the default system turn (as Qwen3's)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Meta-Llama-3-8B-Instruct's template, verbatim
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

SYSTEM = "You are a concise assistant. Answer with the answer only."
SHAPE = dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=12,
             max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)


def conversations(n: int, seed: int) -> list[dict]:
    """Chat rows from the synthetic set: the last assistant turn is the answer to learn; a third of the rows
    have a system turn, a third an earlier question and answer."""
    rng = random.Random(seed)
    rows = synthetic.synthetic_rows(2 * n, seed=seed)
    out = []
    for i in range(n):
        turns = []
        for row in (rows[2 * i], rows[2 * i + 1])[(0 if i % 3 == 2 else 1):]:
            user = row["instruction"] + (f"\n\n{row['context']}" if row["context"] else "")
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": row["response"]}]
        if rng.random() < 1 / 3:
            turns.insert(0, {"role": "system", "content": SYSTEM})
        out.append({"messages": turns})
    return out


def train_bpe(texts: list[str], *, regex: str, size: int, specials: list[str]):
    """A byte-level BPE over the regex's pieces, its special tokens appended after the learned vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() == size, tok.get_vocab_size()
    tok.add_special_tokens(specials)
    return tok


def rendered_corpus(rows: list[dict], template: str, bos: str) -> list[str]:
    from jinja2 import Environment
    render = Environment().from_string(template).render
    return [render(messages=r["messages"], bos_token=bos, add_generation_prompt=False) for r in rows]


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def save_tokenizer(tok, folder: Path, config: dict) -> None:
    """tokenizer.json plus a tokenizer_config.json written by hand (the chat template inside it, as the
    hub's chat models ship it), so the files do not depend on the transformers version."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                  "model_max_length": 512, **config})


def main(argv=None) -> None:
    from tokenizers import processors
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE), help="folder to write (default: this script's)")
    out = Path(parser.parse_args(argv).out)
    rows = conversations(1200, seed=7)
    chatml = train_bpe(rendered_corpus(rows, CHATML_TEMPLATE, ""), regex=QWEN2_REGEX, size=CHATML_VOCAB,
                       specials=CHATML_SPECIALS)
    ids = {t: chatml.token_to_id(t) for t in CHATML_SPECIALS}
    for folder in (out / "chatml", out / "chatml" / "student"):
        save_tokenizer(chatml, folder, {"bos_token": None, "eos_token": "<|endoftext|>",
                                        "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE})
        write_json(folder / "generation_config.json", {"bos_token_id": ids["<|endoftext|>"],
                                                       "eos_token_id": ids["<|endoftext|>"]})
    common = dict(vocab_size=chatml.get_vocab_size(), bos_token_id=ids["<|endoftext|>"],
                  eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], **SHAPE)
    write_json(out / "chatml" / "config.json", {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "moekd_init_seed": 3, **common,
        "intermediate_size": 37, "moe_intermediate_size": 19, "num_experts": 5, "num_experts_per_tok": 2,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []})
    write_json(out / "chatml" / "student" / "config.json", {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "moekd_init_seed": 4, **common,
        "hidden_size": 24, "num_attention_heads": 2, "intermediate_size": 43})

    llama3 = train_bpe(rendered_corpus(rows, LLAMA3_TEMPLATE, "<|begin_of_text|>"), regex=LLAMA3_REGEX,
                       size=LLAMA3_VOCAB, specials=LLAMA3_SPECIALS)
    ids = {t: llama3.token_to_id(t) for t in LLAMA3_SPECIALS}
    llama3.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", ids["<|begin_of_text|>"])])
    save_tokenizer(llama3, out / "llama3", {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                             "chat_template": LLAMA3_TEMPLATE})
    write_json(out / "llama3" / "generation_config.json", {
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]})
    write_json(out / "llama3" / "config.json", {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "moekd_init_seed": 5,
        "vocab_size": llama3.get_vocab_size(), "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": ids["<|end_of_text|>"], **SHAPE, "intermediate_size": 43})

    with (out / "conversations.jsonl").open("w", encoding="utf-8") as f:
        for row in conversations(240, seed=8):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {out}: chatml ({chatml.get_vocab_size()} tokens), llama3 ({llama3.get_vocab_size()}), "
          f"conversations.jsonl (240 rows)")


if __name__ == "__main__":
    main()
