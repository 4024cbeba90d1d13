"""Train tiny_moe's byte-level BPE tokenizer (LLaMA-style special tokens) and write it to
tiny_moe/ and tiny_moe/student/. Deterministic: re-running it reproduces the committed files.

    python tiny_moe/make_tokenizer.py            # corpus: synthetic set + ../shared Dolly dev

The corpus is the built-in synthetic instruction set (moekd.synthetic_rows, rendered with the
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
import moekd  # noqa: E402

VOCAB_SIZE = 2039  # odd on purpose: shape bugs can't hide behind powers of two


def corpus(dolly: Path | None) -> list[str]:
    texts = []
    for seed in range(4):
        for row in moekd.synthetic_rows(2000, seed=seed):
            texts.append(moekd.format_prompt(row["instruction"], row["context"]) + row["response"])
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dolly", default=str(ROOT.parent / "shared" / "data" / "dolly" / "dev.jsonl"),
                        help="MiniLLM Dolly jsonl added to the corpus ('' to leave it out)")
    parser.add_argument("--out", nargs="+", default=[str(ROOT / "tiny_moe"), str(ROOT / "tiny_moe" / "student")])
    args = parser.parse_args(argv)
    dolly = Path(args.dolly) if args.dolly else None
    if dolly is not None and not dolly.is_file():
        sys.exit(f"error: --dolly {dolly}: no such file (pass --dolly '' to train on synthetic text only)")
    tokenizer = train(corpus(dolly))
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    for out in args.out:
        tokenizer.save_pretrained(out)
        print(f"wrote {out} (vocab {len(tokenizer)})")


if __name__ == "__main__":
    main()
