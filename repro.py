"""repro.py: the paper's whole pipeline (Table 1) at CPU scale, in one resumable command.

    python repro.py                                  # preset synthetic: offline, about 15-20 minutes on 2 cores
    python repro.py --preset dolly-mini --data-dir ../shared/data

Stages, each a moekd.py / eval.py run in its own folder under --out:
  1. SFT a small Llama-MoE teacher and a small dense student (the student init) from seeded random weights;
  2. distill the student from that teacher and init with kd, gkd, all, ka and sar;
  3. evaluate every row (teacher, SFT student, each method) with eval.py's protocol over --seeds;
  4. the student side of the paper's Fig. 2: kd with the teacher's top-k swept from its native k to N;
  5. write table.md (Table 1's shape), results.json, results.png (bars with seed std), k_sweep.png,
     and experts.csv/png (how the teacher's experts specialise by task family).
A stage whose output is complete is skipped, an interrupted training run continues from its checkpoint
(--resume), so a killed pipeline picks up where it stopped. Everything is deterministic by --seed.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch

import eval as moe_eval
import data
import moekd
from moekd import MoekdError
from tiny_moe import synthetic

HERE = Path(__file__).resolve().parent
METHODS = ("kd", "gkd", "all", "ka", "sar")

# Model sizes: the teacher has the capacity to memorise the fact table and its experts room to
# specialise; the student is a quarter of its size, so distillation has something to transfer.
TEACHER = dict(vocab_size=2039, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
               num_experts=8, num_selects=2, score_scale_factor=4.0, max_position_embeddings=512)
STUDENT = dict(vocab_size=2039, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=512)

PRESETS = {
    "synthetic": dict(
        data=["--data", "synthetic", "--synthetic-train", "4000", "--synthetic-dev", "200"],
        lengths=["--max-prompt-len", "96", "--max-len", "128"],
        sft=["--lr", "3e-3", "--epochs", "10", "--warmup-steps", "20", "--dev-num", "100"],
        distill=["--lr", "3e-4", "--epochs", "2", "--dev-num", "100"],
        sar=["--router-lr", "3e-4"],  # flags of one method only
        eval=["--max-prompt-len", "96", "--max-new-tokens", "32", "--batch-size", "64"],
        test_examples=100,
    ),
    "dolly-mini": dict(
        data=["--dev-size", "100"],  # --data is the Dolly dev file of --data-dir (or the hub when reachable)
        lengths=["--max-prompt-len", "128", "--max-len", "192"],
        sft=["--lr", "2e-3", "--epochs", "6", "--warmup-steps", "20", "--dev-num", "50"],
        distill=["--lr", "5e-4", "--epochs", "1", "--dev-num", "50"],
        sar=["--router-lr", "5e-4"],
        eval=["--max-prompt-len", "128", "--max-new-tokens", "64", "--batch-size", "64"],
        test_examples=None,  # the MiniLLM sets in full
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="synthetic", choices=PRESETS)
    p.add_argument("--out", default=None, help="results folder (default results/repro-<preset>)")
    p.add_argument("--data-dir", default=str(HERE.parent / "shared" / "data"), help="MiniLLM sets (dolly-mini)")
    p.add_argument("--seed", type=int, default=10, help="training seed of every run")
    p.add_argument("--seeds", default="10,20,30", help="evaluation seeds (>= 3 for a std)")
    p.add_argument("--methods", default=",".join(METHODS), help="distillation rows")
    p.add_argument("--max-steps", type=int, default=None, help="cap every training run (smoke tests)")
    p.add_argument("--test-examples", type=int, default=None,
                   help="examples per evaluation set (synthetic: 100; dolly-mini: the full MiniLLM sets)")
    p.add_argument("--no-k-sweep", action="store_true", help="skip the student-side k sweep")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise MoekdError(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(METHODS)}")
    args.out = Path(args.out or HERE / "results" / f"repro-{args.preset}")
    return args


# ----------------------------------------------------------------------------
# Inputs: seeded model directories and evaluation sets

def write_model_dir(path: Path, config: dict, *, moe: bool, seed: int) -> Path:
    """A config-only model directory that moekd.load_model initialises from `seed`."""
    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    base = {"model_type": "llama_moe", "gate_network": "mlp", "gate_add_noise": True} if moe else {"model_type": "llama"}
    (path / "config.json").write_text(json.dumps({**base, **config, "moekd_init_seed": seed,
                                                  "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(HERE / "tiny_moe" / name, path / name)
    return path


def synthetic_test_sets(folder: Path, n_per_family: int, seed: int = 12345) -> dict[str, Path]:
    """One MiniLLM-format test file per synthetic task family (a seed no training split uses)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = synthetic.synthetic_rows(n_per_family * 20, seed=seed)
    sets = {}
    for family in sorted({r["category"] for r in rows}):
        path = folder / f"{family}.jsonl"
        chosen = [r for r in rows if r["category"] == family][:n_per_family]
        path.write_text("".join(json.dumps({"prompt": data.format_prompt(r["instruction"], r["context"]),
                                            "output": r["response"]}) + "\n" for r in chosen))
        sets[family] = path
    return sets


def eval_sets(args) -> dict[str, Path]:
    if args.preset == "synthetic":
        return synthetic_test_sets(args.out / "data", args.test_examples or PRESETS["synthetic"]["test_examples"])
    sets = {name: Path(args.data_dir) / rel for name, rel in moe_eval.SETS.items()}
    return {name: path for name, path in sets.items() if path.is_file()}


# ----------------------------------------------------------------------------
# Stages (each skipped when complete, resumed when interrupted)

def train(args, name: str, flags: list[str]) -> Path:
    """One moekd.py run in out/runs/<name>; returns the model it hands on (--select: best dev ROUGE-L for
    SFT and KD, the last model for the on-policy methods, as the official scripts)."""
    run = args.out / "runs" / name
    if (run / "final").exists():
        print(f"[repro] {name}: done, skipped")
        return Path(json.loads((run / "metrics.json").read_text())["model"])
    preset = PRESETS[args.preset]
    data = preset["data"] + (["--data", str(Path(args.data_dir) / "dolly" / "dev.jsonl")]
                             if args.preset == "dolly-mini" else [])
    argv = [*data, *preset["lengths"], *flags, "--out", str(run), "--seed", str(args.seed), "--log-every", "50"]
    if args.max_steps is not None:
        argv += ["--max-steps", str(args.max_steps)]
    if moekd.latest_checkpoint(run) is not None:
        print(f"[repro] {name}: resuming")
        argv.append("--resume")
    else:
        argv.append("--overwrite")  # a folder without a checkpoint holds nothing worth keeping
        print(f"[repro] {name}: training")
    return Path(moekd.main(argv)["model"])


def evaluate(args, name: str, model: Path, sets: dict[str, Path], extra: list[str] = ()) -> dict:
    out = args.out / "eval" / name
    if (out / "results.json").exists():
        print(f"[repro] eval {name}: done, skipped")
        return json.loads((out / "results.json").read_text())
    spec = ",".join(f"{k}={v}" for k, v in sets.items())
    limit = ["--max-examples", str(args.test_examples)] if args.test_examples else []
    moe_eval.main(["--model", str(model), "--sets", spec, "--seeds", args.seeds, "--out", str(out),  # goes on if cut
                   "--label", name, *PRESETS[args.preset]["eval"], *limit, *extra])
    return json.loads((out / "results.json").read_text())


def run_pipeline(args) -> dict:
    models = args.out / "models"
    teacher_init = write_model_dir(models / "teacher-init", TEACHER, moe=True, seed=args.seed)
    student_init = write_model_dir(models / "student-init", STUDENT, moe=False, seed=args.seed + 1)
    sft = PRESETS[args.preset]["sft"]
    teacher = train(args, "sft-teacher", ["--method", "sft", "--model", str(teacher_init), "--weight-decay", "0.1", *sft])
    student = train(args, "sft-student", ["--method", "sft", "--model", str(student_init), *sft])
    distill = ["--model", str(student), "--teacher", str(teacher), *PRESETS[args.preset]["distill"]]
    rows = {"teacher (SFT)": teacher, "student (SFT)": student}
    for method in args.methods:
        rows[method.upper()] = train(args, method, ["--method", method, *distill, *PRESETS[args.preset].get(method, [])])
    sets = eval_sets(args)
    results = {label: evaluate(args, label.split()[0].lower() + ("-sft" if "SFT" in label else ""), model, sets)
               for label, model in rows.items()}
    sweep = {} if args.no_k_sweep else k_sweep(args, teacher, distill, sets)
    experts = expert_specialisation(teacher, args) if args.preset == "synthetic" else None
    return report(args, results, list(sets), sweep, experts)


def k_sweep(args, teacher: Path, distill: list[str], sets: dict[str, Path]) -> dict[int, dict]:
    """Fig. 2, student side: KD on gold data with the teacher's top-k set to k = native ... N."""
    native, n = TEACHER["num_selects"], TEACHER["num_experts"]
    out = {}
    for k in range(native, n + 1):
        model = train(args, f"kd-k{k}", ["--method", "kd", "--teacher-k", str(k), *distill])
        out[k] = evaluate(args, f"kd-k{k}", model, sets)
    return out


@torch.no_grad()
def expert_specialisation(teacher_dir: Path, args) -> list[list[list[float]]]:
    """Per layer, the share of each task family's response tokens whose top-1 expert is e: [L][F][E]."""
    model = moekd.load_model(str(teacher_dir))
    tokenizer = moekd.load_tokenizer(str(teacher_dir))
    rows = synthetic.synthetic_rows(800, seed=777)
    families = sorted({r["category"] for r in rows})
    counts = None
    for family_index, family in enumerate(families):
        items = [moekd.tokenize_example(tokenizer, data.format_prompt(r["instruction"], r["context"]), r["response"],
                                        max_prompt_len=96, max_len=128) for r in rows if r["category"] == family]
        batch = moekd.collate(items, tokenizer.pad_token_id)
        with moekd.record_router_logits(model) as records:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = (batch["labels"] != -100).reshape(-1)
        if counts is None:
            counts = torch.zeros(len(records), len(families), records[0].shape[1])
        for layer, logits in enumerate(records):
            top1 = logits[mask].argmax(-1)
            counts[layer, family_index] = torch.bincount(top1, minlength=logits.shape[1]).float() / max(len(top1), 1)
    args.families = families
    return counts.tolist()


# ----------------------------------------------------------------------------
# Report

def report(args, results: dict[str, dict], set_names: list[str], sweep: dict, experts) -> dict:
    table = moe_eval.markdown_table(results, set_names)
    lines = [f"# Reproduction, preset {args.preset}", "", table]
    base = results.get("GKD")
    if base is not None:
        lines.append("| Row | Avg - GKD Avg | std of the Avg over eval seeds |")
        lines.append("|---|---|---|")
        for label, r in results.items():
            lines.append(f"| {label} | {r['avg'] - base['avg']:+.2f} | {avg_std(r):.2f} |")
        lines.append("")
    gap = results["teacher (SFT)"]["avg"] - results["student (SFT)"]["avg"]
    lines.append(f"Teacher - student gap (SFT rows, Avg): {gap:+.2f}")
    if experts:
        bits = [f"{b:.2f}" for b in specialisation_bits(torch.tensor(experts))]
        lines.append(f"\nExpert specialisation, I(task family; top-1 expert) per teacher layer: {', '.join(bits)} bits "
                     f"(0 = routing ignores the family, log2 {len(args.families)} = {math.log2(len(args.families)):.0f} "
                     f"= the family decides the expert)")
    if sweep:
        lines += ["", "## Student side of Fig. 2 (kd, teacher top-k)", "",
                  moe_eval.markdown_table({f"kd, k={k}": r for k, r in sweep.items()}, set_names)]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    summary = {"preset": args.preset, "seed": args.seed, "eval_seeds": args.seeds, "rows": results,
               "teacher_student_gap": gap, "k_sweep": {str(k): r for k, r in sweep.items()},
               "expert_top1_share": experts, "families": getattr(args, "families", None)}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(args, results, set_names, sweep, experts)
    print("\n".join(lines))
    return summary


def avg_std(result: dict) -> float:
    """Population std over eval seeds of the per-seed Avg (mean over sets): the seed noise of an Avg."""
    seeds = list(next(iter(result["sets"].values()))["scores"])
    per_seed = [sum(s["scores"][seed] for s in result["sets"].values()) / len(result["sets"]) for seed in seeds]
    mean = sum(per_seed) / len(per_seed)
    return math.sqrt(sum((v - mean) ** 2 for v in per_seed) / len(per_seed))


def specialisation_bits(share: torch.Tensor) -> list[float]:
    """Mutual information (bits) between task family (uniform) and top-1 expert, per layer: share is
    P(expert | family) [L, F, E]."""
    p_e = share.mean(1, keepdim=True)                                   # [L, 1, E]
    ratio = torch.where(share > 0, share / p_e.clamp_min(1e-12), torch.ones_like(share))
    return (share * ratio.log2()).sum(-1).mean(-1).tolist()


def plot(args, results, set_names, sweep, experts) -> None:
    plt = moe_eval.pyplot()
    labels = list(results)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    avg = [results[label]["avg"] for label in labels]
    err = [avg_std(results[label]) for label in labels]
    ax.bar(labels, avg, yerr=err, capsize=4, color=["0.4", "0.7"] + [f"C{i}" for i in range(len(labels) - 2)])
    ax.set(title=f"ROUGE-L, mean over {len(set_names)} sets ({args.preset}; error bars: std over eval seeds)",
           ylabel="ROUGE-L", ylim=(min(avg) - 3 * max(err) - 2, max(avg) + 3 * max(err) + 2))
    moe_eval.save_fig(fig, args.out / "results.png")
    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ks = list(sweep)
        ax.errorbar(ks, [sweep[k]["avg"] for k in ks], capsize=3, marker="o", yerr=[avg_std(sweep[k]) for k in ks])
        ax.set(title="Student ROUGE-L after KD vs the teacher's active experts k", xlabel="k", ylabel="ROUGE-L (avg)",
               xticks=ks)
        moe_eval.save_fig(fig, args.out / "k_sweep.png")
    if experts:
        share = torch.tensor(experts)  # [L, F, E]
        fig, axes = plt.subplots(1, share.shape[0], figsize=(3.2 * share.shape[0], 3.6), sharey=True)
        for layer, ax in enumerate(axes):
            ax.imshow(share[layer].numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set(title=f"layer {layer}", xlabel="top-1 expert", xticks=range(share.shape[2]))
        axes[0].set(yticks=range(len(args.families)), yticklabels=args.families)
        fig.suptitle("Teacher routing by task family: share of response tokens per top-1 expert")
        moe_eval.save_fig(fig, args.out / "experts.png")
        with (args.out / "experts.csv").open("w") as f:
            f.write("layer,family," + ",".join(f"expert_{e}" for e in range(share.shape[2])) + "\n")
            for layer in range(share.shape[0]):
                for fi, family in enumerate(args.families):
                    f.write(f"{layer},{family}," + ",".join(f"{v:.4f}" for v in share[layer, fi].tolist()) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.preset == "dolly-mini" and not (Path(args.data_dir) / "dolly" / "dev.jsonl").is_file():
        raise MoekdError(f"--data-dir {args.data_dir}: no dolly/dev.jsonl for the dolly-mini preset")
    args.out.mkdir(parents=True, exist_ok=True)
    return run_pipeline(args)


if __name__ == "__main__":
    sys.exit(moekd.run_cli(main))
