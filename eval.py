"""eval.py: the paper's ROUGE-L evaluation protocol and its MoE analyses.

    python eval.py --model runs/sar-4_16/final --data-dir ../shared/data --out results/sar-4_16
    python eval.py --model runs/tiny-sar/final --sets synthetic       # offline: the shipped synthetic set
    python eval.py --analysis gate-mass --model runs/sft-moe/best_rougeL                 # Fig. 1
    python eval.py --analysis k-sweep --model runs/sft-moe/best_rougeL                   # Fig. 2, teacher
    python eval.py --analysis router-shift --model runs/sft-moe/best_rougeL --routers runs/sar/final  # Fig. 5

Protocol (MiniLLM / MoEKD evaluate.py): MiniLLM-format sets (`prompt`, `output` = one reference or a list);
the prompt is encoded *with* special tokens (BOS), cut to its first 256 tokens and left-padded; responses
are sampled with top_k 0, top_p 1, temperature 1, no_repeat_ngram_size 6, at most 256 new tokens, under
seeds 10, 20, 30, 40, 50; ROUGE-L F (rouge-score, Porter stemming) against the best reference, mean x 100.
Per set: mean and population std over seeds; "Avg" = mean of the set means (= mean of all scores).
With --template chat (a chat model) each row's instruction and input are one user turn (or the row is a
conversation, `messages`), rendered by the model's chat template with its generation prompt and encoded
without added special tokens (the template writes its own); a longer prompt keeps its last N tokens (the
generation prompt), and generation stops at the template's end-of-turn token too (data.chat_stop_ids).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import re
import sys
from pathlib import Path

import torch

import checkpoints
import data
import moekd
import parallel
import sampling
from errors import MoekdError, RunStopped, run_cli

SETS = {"dolly": "dolly/valid.jsonl", "self-inst": "self-inst/valid.jsonl", "vicuna": "vicuna/valid.jsonl",
        "sinst": "sinst/11_/valid.jsonl", "uinst": "uinst/11_/valid.jsonl"}
# Sets shipped in the repository (not in --data-dir), evaluated only when named in --sets. "synthetic": the
# quick start's task families, made by tiny_moe/make_eval_set.py (its docstring: how and from which seed).
SHIPPED_SETS = {"synthetic": Path(__file__).resolve().parent / "tiny_moe" / "synthetic_test.jsonl"}
PAPER_NAMES = {"dolly": "Dolly", "self-inst": "SelfInst", "vicuna": "Vicuna", "sinst": "S-NI",
               "uinst": "UnNI", "synthetic": "Synthetic"}
ANALYSES = ("rouge", "gate-mass", "router-shift", "k-sweep")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; "(default: X)" after a flag's help only where X says something.
    The usage examples keep their lines; no default for None or False, nor where the help already gives
    "(default ...)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and not action.required
                and "(default" not in text and action.option_strings):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    examples = __doc__.split("\n\n")[1]
    p = argparse.ArgumentParser(prog="eval.py", formatter_class=HelpFormatter,
                                usage="eval.py --model M [--sets S] [--analysis A] ...",
                                description=f"{__doc__.split(chr(10))[0]}\n\nexamples:\n{examples}")
    p.add_argument("--model", required=True,
                   help="anything checkpoints.load_model loads: Llama-MoE dir, HF name or dir")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parent.parent / "shared" / "data"),
                   help="folder with the MiniLLM sets (dolly/valid.jsonl, self-inst/valid.jsonl, ...)")
    p.add_argument("--sets", default=None,
                   help=f"comma-separated set names, or name=path.jsonl for any other MiniLLM-format file "
                        f"(default: {','.join(SETS)}, all of which must exist in --data-dir; a missing set "
                        f"named here is listed as missing); {', '.join(SHIPPED_SETS)}: the set shipped in "
                        f"tiny_moe/, offline")
    p.add_argument("--seeds", default="10,20,30,40,50", help="comma-separated sampling seeds")
    p.add_argument("--template", default="alpaca", choices=data.TEMPLATES,
                   help="alpaca: the sets' prompts as they are (the paper's template); chat: the model's "
                        "chat template, the instruction and input as one user turn")
    p.add_argument("--analysis", default="rouge", choices=ANALYSES, help="what to run")
    p.add_argument("--out", default=None,
                   help="output folder (default results/<analysis>-<model folder>; a run's best_rougeL/ or "
                        "final/ adds its run: results/rouge-tiny-sar-final)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an existing --out written by eval.py (a rerun without it skips "
                        "finished pairs)")
    p.add_argument("--max-examples", type=int, default=None, help="first N examples of each set (quick runs)")
    p.add_argument("--batch-size", type=int, default=64, help="generation batch (official eval batch 64)")
    p.add_argument("--max-prompt-len", type=int, default=256, help="prompts are cut to their first N tokens")
    p.add_argument("--max-new-tokens", type=int, default=256, help="512 - 256 in the official protocol")
    p.add_argument("--no-repeat-ngram-size", type=int, default=6, help="the official evaluation's default")
    p.add_argument("--routing", default=None, choices=("topk", "all", "sample", "topp"),
                   help="evaluate an MoE under this routing (default: its native top-k)")
    p.add_argument("--num-selects", type=int, default=None, help="k for --routing topk/sample")
    p.add_argument("--sample-prob", type=float, default=None,
                   help="lambda for --routing sample (default: always the sampled set)")
    p.add_argument("--top-p", type=float, default=None,
                   help="P for --routing topp: per token the most probable experts until their softmax mass "
                        "exceeds P (the official gate's --moe-top-p; its gate-dump scripts use 0.6)")
    p.add_argument("--routed-mass", default="native", choices=("native", "literal"),
                   help="with --routing or the k-sweep, routers that do not renormalise their chosen "
                        "weights: native = scaled to the mass of their native top-k (as moekd.py's default), "
                        "literal = the family's rule as is")
    p.add_argument("--routers", default=None,
                   help="load SAR-trained routers (teacher_routers.safetensors or its dir)")
    p.add_argument("--label", default=None, help="row name in the table (default: from --model)")
    p.add_argument("--device", default="auto",
                   help="cuda, cpu, cuda:1, ... (auto: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="compute dtype of generation (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--no-plots", action="store_true", help="CSV only (no matplotlib needed)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise MoekdError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    if not args.seeds:
        raise MoekdError("--seeds: need at least one seed")
    for flag in ("max_examples", "batch_size", "max_prompt_len", "max_new_tokens", "num_selects"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise MoekdError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.no_repeat_ngram_size < 0:
        raise MoekdError(f"--no-repeat-ngram-size must be >= 0, got {args.no_repeat_ngram_size}")
    if args.sample_prob is not None and not 0.0 <= args.sample_prob <= 1.0:
        raise MoekdError(f"--sample-prob must be in [0, 1], got {args.sample_prob}")
    return args


# ----------------------------------------------------------------------------
# Data and generation

def resolve_sets(spec: str | None, data_dir: str | Path) -> dict[str, Path | None]:
    """Set name -> file.
    The default sets must all exist; a missing set named in --sets is None (reported and listed as missing,
    never silently dropped). Unknown names are errors."""
    if spec is None:
        if not Path(data_dir).is_dir():
            raise MoekdError(f"--data-dir {data_dir}: no such folder; fetch the sets with "
                             f"python fetch_data.py --out {data_dir}")
        missing = [f"{name} ({SETS[name]})" for name in SETS if not (Path(data_dir) / SETS[name]).is_file()]
        if missing:
            raise MoekdError(f"--data-dir {data_dir}: missing {', '.join(missing)}; name the sets to "
                             f"evaluate with --sets, or fetch them with python fetch_data.py --out "
                             f"{data_dir}")
    sets: dict[str, Path | None] = {}
    for item in (s.strip() for s in (spec or ",".join(SETS)).split(",") if s.strip()):
        name, _, path = item.partition("=")
        if not re.fullmatch(r"[\w.-]+", name):
            raise MoekdError(f"--sets: set name {name!r} may hold only letters, digits, '_', '.' and '-'")
        if path:
            sets[name] = Path(path)
        elif name in SETS:
            sets[name] = Path(data_dir) / SETS[name]
        elif name in SHIPPED_SETS:
            sets[name] = SHIPPED_SETS[name]
        else:
            raise MoekdError(f"--sets: unknown set {name!r}; known: {', '.join([*SETS, *SHIPPED_SETS])} "
                             f"(or name=path.jsonl)")
    for name, path in sets.items():
        if not path.is_file():
            print(f"warning: set {name}: {path} not found, listed as missing", file=sys.stderr)
            sets[name] = None
    if all(path is None for path in sets.values()):
        raise MoekdError("--sets: none of the requested sets exists")
    return sets


def load_set(path: Path, max_examples: int | None, template: str = "alpaca") -> list[dict]:
    """[{prompt, references}] from a MiniLLM-format jsonl (errors name the file and line).
    With --template chat also the conversation (messages, ending with the reference's turn), its prompt the
    last user turn."""
    rows = data.read_jsonl(path, template=template)
    return [{"prompt": r["prompt"], "references": r["responses"]} if "messages" not in r else
            {"prompt": r["messages"][-2]["content"], "references": r["responses"], "messages": r["messages"],
             "where": r["where"]} for r in rows[:max_examples]]


def encode_prompts(tokenizer, prompts: list[str], max_prompt_len: int) -> list[list[int]]:
    """With special tokens (BOS), as the official evaluation (training had none); first N tokens kept."""
    return [tokenizer.encode(p)[:max_prompt_len] for p in prompts]


def chat_prompt_ids(tokenizer, examples: list[dict], max_prompt_len: int) -> list[list[int]]:
    """Prompt ids: the conversations before their answers through the chat template (+ generation prompt).
    No added special tokens (the template writes its BOS); the last N tokens are kept, so the generation
    prompt survives."""
    texts = [data.render(tokenizer, e["messages"][:-1], generation_prompt=True, where=e["where"])
             for e in examples]
    return [tokenizer.encode(t, add_special_tokens=False)[-max_prompt_len:] for t in texts]


def clean_response(text: str) -> str:
    return text.split("<|endoftext|>")[0].strip()


def routing_context(model, args, seed: int):
    if args.routing is None:
        return contextlib.nullcontext()
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    return moekd.moe_routing(model, args.routing, k=args.num_selects, prob=args.sample_prob,
                             generator=generator, top_p=args.top_p, mass=args.routed_mass)


def generate(model, tokenizer, examples: list[dict], seed: int, args, *, desc: str) -> list[str]:
    device = next(model.parameters()).device
    prompts = chat_prompt_ids(tokenizer, examples, args.max_prompt_len) if args.template == "chat" else \
        encode_prompts(tokenizer, [e["prompt"] for e in examples], args.max_prompt_len)
    with routing_context(model, args, seed), moekd.autocast(device, args.amp_dtype):
        texts = sampling.sample_responses(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                          batch_size=args.batch_size, seed=seed, desc=desc,
                                          no_repeat_ngram_size=args.no_repeat_ngram_size)
    return [clean_response(t) for t in texts]


# ----------------------------------------------------------------------------
# ROUGE-L over sets and seeds

def summarize(scores: dict[str, dict[int, float] | None]) -> dict:
    """Per set mean and population std over seeds; Avg over the sets that were evaluated."""
    out = {"sets": {}, "missing": [name for name, s in scores.items() if s is None]}
    for name, per_seed in scores.items():
        if per_seed is None:
            continue
        values = list(per_seed.values())
        mean = sum(values) / len(values)
        out["sets"][name] = {"mean": mean,
                             "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)),
                             "scores": {str(k): v for k, v in per_seed.items()}}
    means = [s["mean"] for s in out["sets"].values()]
    out["avg"] = sum(means) / len(means) if means else None
    return out


def markdown_table(rows: dict[str, dict], set_names: list[str]) -> str:
    """Table 1's shape: one row per model, mean ± std per set, then Avg."""
    head = "| Model | " + " | ".join(PAPER_NAMES.get(n, n) for n in set_names) + " | Avg |"
    lines = [head, "|" + "---|" * (len(set_names) + 2)]
    for label, summary in rows.items():
        cells = []
        for name in set_names:
            s = summary["sets"].get(name)
            cells.append("missing" if s is None else f"{s['mean']:.2f} ± {s['std']:.2f}")
        avg = "-" if summary["avg"] is None else f"{summary['avg']:.2f}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines) + "\n"


def evaluate_rouge(model, tokenizer, sets: dict[str, list[dict] | None], args, out: Path, *, tag: str = "",
                   generations=None) -> dict:
    """ROUGE-L of `model` on every set and seed; appends every generation to `generations` if given.
    Each (set, seed) is saved to out/pairs/ as it finishes, and a pair saved by an earlier run of the
    same evaluation (eval.json) is read back instead of generated again."""
    scores: dict[str, dict[int, float] | None] = {}
    for name, examples in sets.items():
        if examples is None:
            scores[name] = None
            continue
        scores[name] = {}
        for seed in args.seeds:
            path = out / "pairs" / f"{tag}{name}-seed{seed}.json"
            if path.exists():
                pair = json.loads(path.read_text())
                print(f"{name} seed {seed}: ROUGE-L {pair['rougeL']:.2f} (finished before, {path})")
            else:
                responses = generate(model, tokenizer, examples, seed, args, desc=f"{name} seed {seed}")
                values = [moekd.rouge_l(r, e["references"]) for r, e in zip(responses, examples)]
                pair = {"rougeL": sum(values) / len(values), "generations": [
                    {"set": name, "seed": seed, "prompt": e["prompt"], "references": e["references"],
                     "response": r, "rougeL": v} for e, r, v in zip(examples, responses, values)]}
                with checkpoints.writing(path.parent):
                    path.parent.mkdir(exist_ok=True)
                checkpoints.write_json(path, pair)
                print(f"{name} seed {seed}: ROUGE-L {pair['rougeL']:.2f} ({len(values)} examples)")
            scores[name][seed] = pair["rougeL"]
            if generations is not None:
                generations.extend(pair["generations"])
    return summarize(scores)


def run_rouge(model, tokenizer, sets, args, out: Path) -> dict:
    generations: list[dict] = []
    summary = evaluate_rouge(model, tokenizer, sets, args, out, generations=generations)
    table = markdown_table({args.label: summary}, list(sets))
    with checkpoints.writing(out / "table.md"):
        (out / "table.md").write_text(table)
    checkpoints.write_json(out / "results.json", {"model": args.model, **protocol(args), **summary})
    path = out / "generations.jsonl"
    with checkpoints.writing(path), path.open("w", encoding="utf-8") as f:
        for g in generations:
            f.write(json.dumps(g, ensure_ascii=False) + "\n")
    print(table, end="")
    return summary


def protocol(args) -> dict:
    """The settings that make an evaluation (--template only when not the paper's: earlier folders match)."""
    keys = ("seeds", "max_examples", "max_prompt_len", "max_new_tokens", "no_repeat_ngram_size", "routing",
            "num_selects", "sample_prob", "top_p", "routed_mass", "routers")
    keys += ("template",) if args.template != "alpaca" else ()
    return {"protocol": {k: getattr(args, k) for k in keys}}


# ----------------------------------------------------------------------------
# MoE analyses

def gold_batches(tokenizer, name: str, examples: list[dict], args, batch_size: int = 16):
    """Batches of teacher-forced gold sequences (first reference) in the training format.
    Each with a mask of the response tokens."""
    cfg = moekd.Config(max_prompt_len=args.max_prompt_len, max_len=args.max_prompt_len + args.max_new_tokens)
    rows = [{"prompt": e["prompt"], "responses": e["references"]} if "messages" not in e else
            {"messages": e["messages"], "responses": e["references"], "where": e["where"]} for e in examples]
    items = moekd.tokenize_examples(tokenizer, rows, cfg, name=name)
    for start in range(0, len(items), batch_size):
        batch = moekd.collate(items[start:start + batch_size], tokenizer.pad_token_id)
        yield batch, batch["labels"] != -100


@torch.no_grad()
def router_probs_on_responses(model, batches) -> list[torch.Tensor]:
    """Per layer, the router softmax [n_response_tokens, E] (noise-free, eval) on response tokens."""
    device = next(model.parameters()).device
    per_layer: list[list[torch.Tensor]] = []
    for batch, mask in batches:
        with moekd.record_router_logits(model) as records:
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        for i, logits in enumerate(records):
            if len(per_layer) <= i:
                per_layer.append([])
            per_layer[i].append(logits.float().softmax(-1)[mask.reshape(-1).to(device)].cpu())
    return [torch.cat(chunks) for chunks in per_layer]


def activated_mass(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the probability mass of the k most probable experts, k = 1..E: [E]."""
    return probs.sort(dim=-1, descending=True).values.cumsum(-1).mean(0)


def router_kl(p_orig: torch.Tensor, p_new: torch.Tensor) -> tuple[torch.Tensor, int]:
    """KL(p_orig || p_new) per token, negative rounding clamped to 0 and counted (as the official script)."""
    kl = (p_orig * (p_orig.clamp_min(1e-30).log() - p_new.clamp_min(1e-30).log())).sum(-1)
    return kl.clamp_min(0.0), int((kl < 0).sum())


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with checkpoints.writing(path), path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def first_set(sets: dict[str, list[dict] | None]) -> tuple[str, list[dict]]:
    for name, examples in sets.items():
        if examples is not None:
            return name, examples
    raise MoekdError("--sets: none of the requested sets exists")


def run_gate_mass(model, tokenizer, sets, args, out: Path) -> dict:
    name, examples = first_set(sets)
    masses = [activated_mass(p)
              for p in router_probs_on_responses(model, gold_batches(tokenizer, name, examples, args))]
    E, k = masses[0].numel(), moekd.native_top_k(model)
    write_csv(out / "gate_mass.csv", ["layer"] + [f"k={j}" for j in range(1, E + 1)],
              [[i] + [f"{v:.6f}" for v in m.tolist()] for i, m in enumerate(masses)])
    if not args.no_plots:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 4.5))
        layers = list(range(len(masses)))
        for j in range(E):
            native = j + 1 == k
            ax.plot(layers, [m[j].item() for m in masses], lw=2.5 if native else 0.8,
                    color="C3" if native else "0.6",
                    label=f"top-{k} (native)" if native else ("top-1 ... top-%d" % E if j == 0 else None))
        ax.set(title=f"Router probability mass of the top-k experts ({name}, response tokens)",
               xlabel="layer", ylabel="mean probability mass", ylim=(0, 1.02), xticks=layers)
        ax.legend()
        save_fig(fig, out / "gate_mass.png")
    native = [m[k - 1].item() for m in masses]
    print("layer  mass of native top-%d: " % k + " ".join(f"{v:.3f}" for v in native))
    return {"set": name, "native_k": k, "mass": [m.tolist() for m in masses]}


def run_router_shift(model, tokenizer, sets, args, out: Path) -> dict:
    name, examples = first_set(sets)
    original = router_probs_on_responses(model, gold_batches(tokenizer, name, examples, args))
    moekd.load_routers(model, args.routers)
    shifted = router_probs_on_responses(model, gold_batches(tokenizer, name, examples, args))
    rows, stats = [], []
    for i, (p, q) in enumerate(zip(original, shifted)):
        kl, clamped = router_kl(p, q)
        stats.append(kl)
        rows.append([i, f"{kl.mean():.6g}", f"{kl.min():.6g}", f"{kl.max():.6g}", clamped, kl.numel()])
    write_csv(out / "router_shift.csv",
              ["layer", "mean_kl", "min_kl", "max_kl", "clamped_negative", "tokens"], rows)
    if not args.no_plots:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 4.5))
        layers, floor = list(range(len(stats))), 1e-12  # a log axis; exact zeros drawn at the floor
        ax.plot(layers, [max(s.mean().item(), floor) for s in stats], marker="o", label="mean")
        ax.fill_between(layers, [max(s.min().item(), floor) for s in stats],
                        [max(s.max().item(), floor) for s in stats], alpha=0.2, label="min-max over tokens")
        ax.set(title="Router shift after SAR: KL(p_original || p_SAR) per layer", xlabel="layer",
               ylabel="KL (nats, log scale)", yscale="log", xticks=layers)
        ax.legend()
        save_fig(fig, out / "router_shift.png")
        fig, ax = plt.subplots(figsize=(8, 4.5))
        bins = [10 ** (e / 10) for e in range(-90, 1)]  # 10^[-9, 0] in steps of 0.1, as the official script
        for i in sorted({0, len(stats) // 2, len(stats) - 1}):
            ax.hist(stats[i].clamp(1e-9, 1.0).numpy(), bins=bins, histtype="step", lw=1.5, label=f"layer {i}")
        ax.set(title="Per-token router KL after SAR", xlabel="KL(p_original || p_SAR), clamped to [1e-9, 1]",
               ylabel="tokens", xscale="log")
        ax.legend()
        save_fig(fig, out / "router_shift_hist.png")
    print("layer  mean KL: " + " ".join(f"{s.mean():.3g}" for s in stats))
    return {"set": name, "mean_kl": [s.mean().item() for s in stats]}


def run_k_sweep(model, tokenizer, sets, args, out: Path) -> dict:
    results = {}
    for k in range(moekd.native_top_k(model), moekd.num_experts(model) + 1):
        args.routing, args.num_selects = "topk", k
        print(f"k = {k}")
        results[k] = evaluate_rouge(model, tokenizer, sets, args, out, tag=f"k{k}-")
    names = [n for n, examples in sets.items() if examples is not None]
    write_csv(out / "k_sweep.csv", ["k"] + names + ["avg"],
              [[k] + [f"{r['sets'][n]['mean']:.4f}" for n in names] + [f"{r['avg']:.4f}"]
               for k, r in results.items()])
    with checkpoints.writing(out / "table.md"):
        (out / "table.md").write_text(markdown_table({f"k={k}": r for k, r in results.items()}, list(sets)))
    if not args.no_plots:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ks = list(results)
        ax.errorbar(ks, [results[k]["avg"] for k in ks], marker="o", capsize=3,
                    yerr=[sum(results[k]["sets"][n]["std"] for n in names) / len(names) for k in ks])
        ax.set(title="Teacher ROUGE-L vs number of active experts k", xlabel="k (active experts)",
               ylabel="ROUGE-L (avg over sets)", xticks=ks)
        save_fig(fig, out / "k_sweep.png")
    print(markdown_table({f"k={k}": r for k, r in results.items()}, list(sets)), end="")
    return {"k": {str(k): r for k, r in results.items()}}


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoekdError("plots need matplotlib (pip install matplotlib), or pass --no-plots") from None
    return plt


def save_fig(fig, path: Path) -> None:
    fig.tight_layout()
    with checkpoints.writing(path):
        fig.savefig(path, dpi=120)
    fig.clf()
    print(f"wrote {path}")


# ----------------------------------------------------------------------------
# Main

# Everything eval.py writes in --out (write_json's temporary files and the lock too); eval.json (the
# evaluation's settings, written first, with these keys) marks the folder as ours.
EVAL_FILES = {"eval.json", "pairs", "results.json", "table.md", "generations.jsonl", "gate_mass.csv",
              "gate_mass.png", "router_shift.csv", "router_shift.png", "router_shift_hist.png", "k_sweep.csv",
              "k_sweep.png", *(f"{a}.json" for a in ANALYSES)}
EVAL_NAMES = re.compile("|".join([re.escape(checkpoints.LOCK)]
                                 + [rf"(\.tmp-)?{re.escape(n)}" for n in EVAL_FILES]))
PAIR_NAMES = re.compile(r"(\.tmp-)?[\w.-]+-seed-?\d+\.json")
EVAL_KEYS = {"model", "analysis", "label", "dtype", "batch_size", "sets", "protocol"}


def check_out(out: Path, settings: dict, overwrite: bool) -> None:
    """Check that --out is new, empty, or an earlier run of the same evaluation.
    An earlier run is continued (finished pairs are kept); --overwrite starts over, in a folder eval.py
    wrote only."""
    if out.exists() and not out.is_dir():
        raise MoekdError(f"--out {out}: exists and is not a directory")
    if not checkpoints.busy(out):
        return
    if overwrite:
        checkpoints.check_own_folder(out, "eval.json", EVAL_NAMES, {"pairs": PAIR_NAMES}, EVAL_KEYS,
                                     EVAL_KEYS)
        return
    marker = out / "eval.json"
    if not marker.is_file():
        raise MoekdError(f"--out {out}: exists and is not empty; pass --overwrite or another --out")
    try:
        saved = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoekdError(f"{marker}: malformed JSON ({e}); pass --overwrite or another --out") from None
    if not isinstance(saved, dict):
        raise MoekdError(f"{marker}: not an evaluation's settings; pass another --out")
    differ = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if differ:
        raise MoekdError(f"--out {out}: holds an evaluation with other settings ({', '.join(differ)} "
                         f"differ); pass --overwrite or another --out")


def main(argv: list[str] | None = None) -> dict:
    """One evaluation; its --out locked while it runs (one process per folder)."""
    args = parse_args(argv)
    with checkpoints.RunLock() as lock:
        return _main(args, lock)


def _main(args: argparse.Namespace, lock: checkpoints.RunLock) -> dict:
    name = Path(args.model.rstrip("/")).name
    run_name = name if name not in ("best_rougeL", "final") else \
        f"{Path(args.model.rstrip('/')).parent.name}-{name}"
    out = Path(args.out or Path("results") / f"{args.analysis}-{run_name}")
    if (args.routing == "topp") != (args.top_p is not None):
        raise MoekdError("--top-p goes with --routing topp (and --routing topp needs --top-p)")
    if args.analysis == "router-shift" and args.routers is None:
        raise MoekdError("--analysis router-shift needs --routers (the SAR run's teacher_routers)")
    paths = resolve_sets(args.sets, args.data_dir)
    # bad files fail before any work
    sets = {name: None if path is None else load_set(path, args.max_examples, args.template)
            for name, path in paths.items()}
    args.label = args.label or (name if name not in ("best_rougeL", "final") else
                                f"{Path(args.model.rstrip('/')).parent.name}/{name}")
    args.label += (f" ({args.routing}{'' if args.num_selects is None else f', k={args.num_selects}'}"
                   f"{'' if args.top_p is None else f', p={args.top_p}'})" if args.routing else "")
    settings = {"model": args.model, "analysis": args.analysis, "label": args.label, "dtype": args.dtype,
                "batch_size": args.batch_size,
                "sets": {k: None if p is None else str(p) for k, p in paths.items()}, **protocol(args)}
    reads = {"--model": args.model, "--routers": args.routers,
             **{f"--sets {k}": None if p is None else str(p) for k, p in paths.items()}}
    checkpoints.check_out_apart(out, reads)
    checkpoints.check_writable(out)
    check_out(out, settings, args.overwrite)
    if out.is_dir():  # known to be ours (or empty): locked before anything is loaded
        lock.acquire(out)
    device = parallel.resolve_device(args.device)
    args.amp_dtype = parallel.resolve_dtype(args.dtype, device)
    model = checkpoints.load_model(args.model, device=device, dtype=args.amp_dtype)
    tokenizer = checkpoints.load_tokenizer(args.model)
    data.set_template(tokenizer, args.template)  # chat: generation stops at the end of turn too
    checkpoints.check_vocab(model, tokenizer)
    needs_moe = args.analysis != "rouge" or args.routing is not None or args.routers is not None
    if needs_moe and not moekd.is_moe(model):
        what = f"--analysis {args.analysis}" if args.analysis != "rouge" else "--routing/--routers"
        raise MoekdError(f"{what} needs an MoE model; --model {args.model} is a dense {type(model).__name__}")
    if needs_moe:  # an MoE family we cannot steer, or a k it does not have, is an error before any work
        try:
            with routing_context(model, args, 0):
                pass
            moekd.moe_routers(model)
        except ValueError as err:
            raise MoekdError(f"--model {args.model}: {err}") from None
    if args.routers is not None and args.analysis != "router-shift":
        moekd.load_routers(model, args.routers)
    with checkpoints.writing(out):
        out.mkdir(parents=True, exist_ok=True)
    lock.acquire(out)
    if args.overwrite:
        checkpoints.clear_folder(out)
    checkpoints.write_json(out / "eval.json", settings)
    run = {"rouge": run_rouge, "gate-mass": run_gate_mass, "router-shift": run_router_shift,
           "k-sweep": run_k_sweep}[args.analysis]
    try:
        result = run(model, tokenizer, sets, args, out)
        if args.analysis != "rouge":
            checkpoints.write_json(out / f"{args.analysis}.json", {"model": args.model, **result})
    except RunStopped as e:
        raise MoekdError(f"{e}; the evaluation stopped, the (set, seed) pairs it finished are in "
                         f"{out / 'pairs'} and a rerun of the same command continues from them") from None
    return {"out": str(out), **result}


if __name__ == "__main__":
    sys.exit(run_cli(main))
