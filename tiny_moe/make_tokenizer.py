"""Train tiny_moe's two tokenizers and write them beside the tiny models. Deterministic:
re-running it reproduces the committed files.

    python tiny_moe/make_tokenizer.py            # corpus: synthetic set + ../shared Dolly dev

- tiny_moe/ and tiny_moe/student/: a byte-level BPE (GPT-2 style) with LLaMA's special ids.
- tiny_moe/sp/ and tiny_moe/sp/student/: a LLaMA-like SentencePiece-style BPE: a "▁" prefix on the
  first word of a text (Metaspace, prepend_scheme "first"), newlines isolated, byte fallback to
  <0x00>..<0xFF> (ids 3-258, as LLaMA) for characters outside the vocabulary, <s> added, no pad token.
  "Paris" after "### Response:\n" is then `Paris`, but `▁Paris` when tokenized on its own: the
  case that tells joint prompt+response tokenization (the official one) from separate tokenization.

The corpus is the built-in synthetic instruction set (synthetic.synthetic_rows, rendered with the
paper's template) plus, when present, the MiniLLM Dolly dev split, so Dolly text tokenizes
into words rather than bytes. Special ids follow LLaMA: <unk>=0, <s>=1, </s>=2; encode() adds
<s> like LLaMA's tokenizer (training code passes add_special_tokens=False, eval does not).
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from tiny_moe import synthetic  # noqa: E402

VOCAB_SIZE = 2039  # odd on purpose: shape bugs can't hide behind powers of two
SP_VOCAB_SIZE = 1543
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]


def corpus(dolly: Path | None) -> list[str]:
    texts = []
    for seed in range(4):
        for row in synthetic.synthetic_rows(2000, seed=seed):
            texts.append(data.format_prompt(row["instruction"], row["context"]) + row["response"])
    if dolly is not None:
        for line in dolly.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts.append(row["prompt"] + row["output"])
    return texts


def train(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def train_sentencepiece_like(texts: list[str]):
    """LLaMA-like tokenizer: BPE over Metaspace words, specials 0-2, byte tokens 3-258, then merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                   pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                            split=True)])
    # learn merges on the words, without "\n" in the alphabet (LLaMA spells it as <0x0A>)
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre
    n_words = SP_VOCAB_SIZE - len(SPECIALS) - len(BYTES)
    learner.train_from_iterator([t.replace("\n", " ") for t in texts],
                                trainers.BpeTrainer(vocab_size=n_words, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    words = sorted(learned["vocab"], key=learned["vocab"].get)[:n_words]
    vocab = {t: i for i, t in enumerate(SPECIALS + BYTES + words)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dolly", default=str(ROOT.parent / "shared" / "data" / "dolly" / "dev.jsonl"),
                        help="MiniLLM Dolly jsonl added to the corpus ('' to leave it out)")
    parser.add_argument("--out", nargs="+",
                        default=[str(ROOT / "tiny_moe"), str(ROOT / "tiny_moe" / "student")])
    parser.add_argument("--sp-out", nargs="+", default=[str(ROOT / "tiny_moe" / "sp"),
                                                        str(ROOT / "tiny_moe" / "sp" / "student")])
    args = parser.parse_args(argv)
    dolly = Path(args.dolly) if args.dolly else None
    if dolly is not None and not dolly.is_file():
        sys.exit(f"error: --dolly {dolly}: no such file (pass --dolly '' to train on synthetic text only)")
    texts = corpus(dolly)
    for tokenizer, size, outs in ((train(texts), VOCAB_SIZE, args.out),
                                  (train_sentencepiece_like(texts), SP_VOCAB_SIZE, args.sp_out)):
        assert len(tokenizer) == size, len(tokenizer)
        for out in outs:
            tokenizer.save_pretrained(out)
            print(f"wrote {out} (vocab {len(tokenizer)})")


if __name__ == "__main__":
    main()
