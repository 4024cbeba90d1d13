"""repro.py: the paper's whole pipeline (Table 1) at CPU scale, over several training seeds, in one
resumable command.

    python repro.py                                  # preset synthetic, training seeds 10, 20, 30
    python repro.py --train-seeds 5                  # the published tables: seeds 10, 20, 30, 40, 50
    python repro.py --train-seeds 40,50              # just those seeds (e.g. the rest, in another session)
    python repro.py --assemble                       # the tables from the per-seed files that exist
    python repro.py --summary                        # the README's table over the assembled presets
    python repro.py --preset dolly-mini --data-dir ../shared/data
    python repro.py --preset capacity                # a teacher with much more capacity than its student

Per training seed s, each stage a moekd.py / eval.py run in its own folder under --out/seed-<s>/:
  1. SFT a small Llama-MoE teacher and a small dense student (the student init) from weights initialised
     from s (teacher) and s + 1 (student), trained with --seed s;
  2. distill the student from that teacher and init with kd, gkd, all, ka and sar (--seed s);
  3. evaluate every row (teacher, SFT student, each method) with eval.py's protocol over --seeds;
  4. for training seed --k-sweep-seed (10) only: the student side of the paper's Fig. 2, kd with the teacher's
     top-k swept;
  5. write the seed's table.md and results.json (and, for the synthetic presets, experts.csv/png), and copy
     the results.json to --publish as seed-<s>.json.
The data (training rows, dev rows, test sets) is made once under --out/data and is the same for every training
seed: seeds differ only in training randomness (initialisation, data order, gate noise, sampling).
Then the per-seed files that exist in --publish are assembled (stats.py): results.md (mean ± 95% t-interval
over training seeds per row, paired differences to GKD and KD, and of KA and SAR to ALL, with verdicts),
results.json, results.png.
A stage whose output is complete is skipped, an interrupted training run continues from its checkpoint
(--resume), so a killed pipeline picks up where it stopped. Everything is deterministic by the training seed.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch

import checkpoints
import eval as moe_eval
import data
import moekd
import stats
from errors import MoekdError, run_cli
from tiny_moe import synthetic

HERE = Path(__file__).resolve().parent
METHODS = ("kd", "gkd", "all", "ka", "sar")
FIRST_SEED, SEED_STEP, MAX_COUNT = 10, 10, 20  # --train-seeds N: seeds 10, 20, ..., 10 N
DATA_SEED = 10  # the synthetic training rows (dev: DATA_SEED + 1), the same for every training seed

# Model sizes: the teacher has the capacity to memorise the fact table and its experts room to
# specialise; the student is a quarter of its size, so distillation has something to transfer.
TEACHER = dict(vocab_size=2039, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
               num_attention_heads=4, num_experts=8, num_selects=2, score_scale_factor=4.0,
               max_position_embeddings=512)
STUDENT = dict(vocab_size=2039, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, max_position_embeddings=512)
# The capacity preset's student: hidden 8, one head, 0.04M parameters (the teacher has 13x as many), so that
# the facts it must memorise are beyond it and within the teacher's reach.
SMALL_STUDENT = {**STUDENT, "hidden_size": 8, "num_attention_heads": 1}

SYNTHETIC_TRAINING = dict(
    lengths=["--max-prompt-len", "96", "--max-len", "128"],
    sft=["--lr", "3e-3", "--epochs", "10", "--warmup-steps", "20", "--dev-num", "100"],
    distill=["--lr", "3e-4", "--epochs", "2", "--dev-num", "100"],
    sar=["--router-lr", "3e-4"],  # flags of one method only
    eval=["--max-prompt-len", "96", "--max-new-tokens", "32", "--batch-size", "64"],
    test_examples=100,
)
PRESETS = {
    "synthetic": dict(
        SYNTHETIC_TRAINING, teacher=TEACHER, student=STUDENT, k_sweep=list(range(2, 9)),
        teacher_sft=["--weight-decay", "0.1"],
        synthetic=dict(families=synthetic.DEFAULT_FAMILIES, n_facts=240, train=4000, dev=200),
    ),
    # Closed-book facts only: 200 people x 3 attributes (city, colour, password), each seen about 6-7 times an
    # epoch; the synthetic preset's teacher, a student of a fourth of the synthetic student's width. Its SFT
    # teacher beat its SFT student by 25.9 ± 9.1 (sample std 3.7) over training seeds 10, 20, 30
    # (docs/repro.md).
    "capacity": dict(
        SYNTHETIC_TRAINING, teacher=TEACHER, student=SMALL_STUDENT, k_sweep=[2, 4, 8],
        teacher_sft=["--weight-decay", "0.1"],
        synthetic=dict(families=("color", "fact", "password"), n_facts=200, train=4000, dev=200),
    ),
    "dolly-mini": dict(
        teacher=TEACHER, student=STUDENT, k_sweep=list(range(2, 9)), teacher_sft=["--weight-decay", "0.1"],
        data=["--dev-size", "100"],  # --data is the Dolly dev file of --data-dir (or the hub when reachable)
        lengths=["--max-prompt-len", "128", "--max-len", "192"],
        sft=["--lr", "2e-3", "--epochs", "6", "--warmup-steps", "20", "--dev-num", "50"],
        distill=["--lr", "5e-4", "--epochs", "1", "--dev-num", "50"],
        sar=["--router-lr", "5e-4"],
        eval=["--max-prompt-len", "128", "--max-new-tokens", "64", "--batch-size", "64"],
        test_examples=None,  # the MiniLLM sets in full
    ),
}


def parse_train_seeds(value: str) -> list[int]:
    """'N' = the first N seeds of 10, 20, 30, ...; 'a,b,...' = those seeds ('30,' = seed 30 alone)."""
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise MoekdError(f"--train-seeds {value}: expected a count (3) or a comma-separated list "
                         f"(10,20,30)") from None
    if "," in value:
        seeds = numbers
    else:
        if not 1 <= numbers[0] <= MAX_COUNT:
            raise MoekdError(f"--train-seeds {value}: a count must be 1..{MAX_COUNT}; for the single seed "
                             f"{value} write --train-seeds {value},")
        seeds = [FIRST_SEED + SEED_STEP * i for i in range(numbers[0])]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise MoekdError(f"--train-seeds {value}: need distinct seeds >= 0")
    return seeds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="synthetic", choices=PRESETS)
    p.add_argument("--out", default=None,
                   help="results folder (default results/repro-<preset>); one seed-<s>/ per "
                        "training seed, data/ shared")
    p.add_argument("--data-dir", default=str(HERE.parent / "shared" / "data"),
                   help="MiniLLM sets (dolly-mini)")
    p.add_argument("--train-seeds", default="3",
                   help=f"training seeds: a count N (seeds {FIRST_SEED}, {FIRST_SEED + SEED_STEP}, ... "
                        f"{FIRST_SEED} + {SEED_STEP}(N-1)) or a comma-separated list ('30,' = seed 30 alone)")
    p.add_argument("--seed", default=None, help=argparse.SUPPRESS)  # the old single training seed
    p.add_argument("--seeds", default="10,20,30", help="evaluation seeds (>= 3 for a std)")
    p.add_argument("--methods", default=",".join(METHODS), help="distillation rows")
    p.add_argument("--max-steps", type=int, default=None,
                   help="cap every training run, and its dev ROUGE-L at 4 examples (smoke tests)")
    p.add_argument("--test-examples", type=int, default=None,
                   help="examples per evaluation set (synthetic presets: 100; dolly-mini: the full MiniLLM "
                        "sets)")
    p.add_argument("--no-k-sweep", action="store_true", help="skip the student-side k sweep")
    p.add_argument("--k-sweep-seed", type=int, default=FIRST_SEED,
                   help="the training seed that also runs the student-side k sweep (when among "
                        "--train-seeds)")
    p.add_argument("--publish", default=None,
                   help="folder of the per-seed files seed-<s>.json and the assembled tables (default "
                        "docs/repro/<preset> for a full-protocol run, else <out>/published)")
    p.add_argument("--assemble", action="store_true", help="only assemble the tables from the per-seed files")
    p.add_argument("--summary", action="store_true",
                   help="print the one-table summary over every preset assembled under docs/repro/ (the "
                        "README's)")
    args = p.parse_args(argv)
    if args.seed is not None:
        raise MoekdError(f"--seed: replaced by --train-seeds (the single seed {args.seed}: --train-seeds "
                         f"{args.seed},)")
    args.train_seeds = parse_train_seeds(args.train_seeds)
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise MoekdError(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(METHODS)}")
    args.out = Path(args.out or HERE / "results" / f"repro-{args.preset}")
    full = args.max_steps is None and args.test_examples is None and args.methods == list(METHODS)
    args.publish = Path(args.publish
                        or (HERE / "docs" / "repro" / args.preset if full else args.out / "published"))
    return args


# ----------------------------------------------------------------------------
# Inputs: seeded model directories, the shared training data and evaluation sets

def write_model_dir(path: Path, config: dict, *, moe: bool, seed: int) -> Path:
    """A config-only model directory that checkpoints.load_model initialises from `seed`."""
    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    base = {"model_type": "llama_moe", "gate_network": "mlp",
            "gate_add_noise": True} if moe else {"model_type": "llama"}
    (path / "config.json").write_text(json.dumps({**base, **config, "moekd_init_seed": seed,
                                                  "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
                                                  indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(HERE / "tiny_moe" / name, path / name)
    return path


def write_jsonl_once(path: Path, rows: list[dict]) -> None:
    """Write rows unless the file exists, which then must hold the same rows.
    The data never changes under a run."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.exists():
        if path.read_text() != text:
            raise MoekdError(f"--out: {path} holds other data than this preset makes; pass another --out")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def synthetic_training_data(folder: Path, spec: dict) -> Path:
    """train.jsonl and dev.jsonl of a synthetic preset (moekd's folder form), seeded by DATA_SEED.
    Not by the training seed: every training seed trains on the same rows."""
    kind = dict(families=tuple(spec["families"]), n_facts=spec["n_facts"])
    write_jsonl_once(folder / "train.jsonl", synthetic.synthetic_rows(spec["train"], seed=DATA_SEED, **kind))
    write_jsonl_once(folder / "dev.jsonl", synthetic.synthetic_rows(spec["dev"], seed=DATA_SEED + 1, **kind))
    return folder


def synthetic_test_sets(folder: Path, n_per_family: int, seed: int = 12345, *,
                        families=synthetic.DEFAULT_FAMILIES, n_facts: int = 240) -> dict[str, Path]:
    """One MiniLLM-format test file per synthetic task family (a seed no training split uses)."""
    rows = synthetic.synthetic_rows(n_per_family * 4 * len(families), seed=seed, families=tuple(families),
                                    n_facts=n_facts)
    sets = {}
    for family in sorted({r["category"] for r in rows}):
        chosen = [r for r in rows if r["category"] == family][:n_per_family]
        write_jsonl_once(folder / f"{family}.jsonl",
                         [{"prompt": data.format_prompt(r["instruction"], r["context"]),
                           "output": r["response"]} for r in chosen])
        sets[family] = folder / f"{family}.jsonl"
    return sets


def eval_sets(args) -> dict[str, Path]:
    spec = PRESETS[args.preset].get("synthetic")
    if spec is not None:
        n = args.test_examples or PRESETS[args.preset]["test_examples"]
        return synthetic_test_sets(args.out / "data" / "test", n, families=spec["families"],
                                   n_facts=spec["n_facts"])
    sets = {name: Path(args.data_dir) / rel for name, rel in moe_eval.SETS.items()}
    return {name: path for name, path in sets.items() if path.is_file()}


def training_data_flags(args) -> list[str]:
    spec = PRESETS[args.preset].get("synthetic")
    if spec is not None:
        return ["--data", str(synthetic_training_data(args.out / "data" / "train", spec))]
    return [*PRESETS[args.preset]["data"], "--data", str(Path(args.data_dir) / "dolly" / "dev.jsonl")]


def check_settings(args) -> None:
    """--out holds one protocol: a folder made with other evaluation settings is not mixed into."""
    settings = {"preset": args.preset, "eval_seeds": args.seeds, "test_examples": args.test_examples,
                "max_steps": args.max_steps}
    path = args.out / "repro.json"
    if path.exists():
        saved = json.loads(path.read_text())
        differ = [k for k in settings if saved.get(k) != settings[k]]
        if differ:
            raise MoekdError(f"--out {args.out}: holds a repro run with other settings ({', '.join(differ)} "
                             f"differ); pass another --out")
    elif args.out.exists() and any(args.out.glob("seed-*")):
        raise MoekdError(f"--out {args.out}: has seed folders but no repro.json; pass another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


# ----------------------------------------------------------------------------
# Stages of one training seed (each skipped when complete, resumed when interrupted)

def train(args, run_args, name: str, flags: list[str]) -> Path:
    """One moekd.py run in <seed>/runs/<name>; returns the model it hands on.
    --select: best dev ROUGE-L for SFT and KD, the last model for the on-policy methods, as the official
    scripts."""
    run = run_args.dir / "runs" / name
    tag = f"seed {run_args.seed} {name}"
    if (run / "final").exists():
        print(f"[repro] {tag}: done, skipped")
        return Path(json.loads((run / "metrics.json").read_text())["model"])
    preset = PRESETS[args.preset]
    argv = [*run_args.data, *preset["lengths"], *flags, "--out", str(run), "--seed", str(run_args.seed),
            "--log-every", "50"]
    if args.max_steps is not None:  # a smoke run: short training, a short dev evaluation
        argv += ["--max-steps", str(args.max_steps), "--dev-num", "4"]
    if checkpoints.latest_checkpoint(run) is not None:
        print(f"[repro] {tag}: resuming")
        argv.append("--resume")
    else:
        argv.append("--overwrite")  # a folder without a checkpoint holds nothing worth keeping
        print(f"[repro] {tag}: training")
    return Path(moekd.main(argv)["model"])


def evaluate(args, run_args, name: str, model: Path, sets: dict[str, Path], extra: list[str] = ()) -> dict:
    """eval.py's result for one row, with "examples": per set, each example's ROUGE-L over the eval seeds.
    Averaged and rounded to 0.01, for the hierarchical bootstrap."""
    out = run_args.dir / "eval" / name
    if (out / "results.json").exists():
        print(f"[repro] seed {run_args.seed} eval {name}: done, skipped")
    else:
        spec = ",".join(f"{k}={v}" for k, v in sets.items())
        limit = ["--max-examples", str(args.test_examples)] if args.test_examples else []
        # goes on if cut
        moe_eval.main(["--model", str(model), "--sets", spec, "--seeds", args.seeds, "--out", str(out),
                       "--label", name, *PRESETS[args.preset]["eval"], *limit, *extra])
    result = json.loads((out / "results.json").read_text())
    eval_seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    result["examples"] = {}
    for set_name in result["sets"]:
        pairs = [json.loads((out / "pairs" / f"{set_name}-seed{seed}.json").read_text())["generations"]
                 for seed in eval_seeds]
        result["examples"][set_name] = [round(sum(g["rougeL"] for g in column) / len(column), 2)
                                        for column in zip(*pairs, strict=True)]
    return result


def run_seed(args, seed: int, sets: dict[str, Path], data_flags: list[str], *, k_sweep: bool) -> dict:
    """The whole pipeline for one training seed, in --out/seed-<seed>; returns its small summary."""
    run_args = argparse.Namespace(seed=seed, dir=args.out / f"seed-{seed}", data=data_flags)
    preset = PRESETS[args.preset]
    models = run_args.dir / "models"
    teacher_init = write_model_dir(models / "teacher-init", preset["teacher"], moe=True, seed=seed)
    student_init = write_model_dir(models / "student-init", preset["student"], moe=False, seed=seed + 1)
    sft = preset["sft"]
    teacher = train(args, run_args, "sft-teacher",
                    ["--method", "sft", "--model", str(teacher_init), *preset["teacher_sft"], *sft])
    student = train(args, run_args, "sft-student", ["--method", "sft", "--model", str(student_init), *sft])
    distill = ["--model", str(student), "--teacher", str(teacher), *preset["distill"]]
    rows = {"teacher (SFT)": teacher, "student (SFT)": student}
    for method in args.methods:
        rows[method.upper()] = train(args, run_args, method,
                                     ["--method", method, *distill, *preset.get(method, [])])
    results = {label: evaluate(args, run_args, label.split()[0].lower() + ("-sft" if "SFT" in label else ""),
                               model, sets) for label, model in rows.items()}
    sweep = {}
    if k_sweep:  # Fig. 2, student side: KD on gold data with the teacher's top-k set to each preset k
        for k in preset["k_sweep"]:
            model = train(args, run_args, f"kd-k{k}", ["--method", "kd", "--teacher-k", str(k), *distill])
            sweep[k] = evaluate(args, run_args, f"kd-k{k}", model, sets)
    experts = expert_specialisation(teacher, args) if "synthetic" in preset else None
    return seed_report(args, run_args, results, list(sets), sweep, experts)


def run_pipeline(args) -> dict:
    check_settings(args)
    data_flags, sets = training_data_flags(args), eval_sets(args)
    for seed in args.train_seeds:
        k_sweep = seed == args.k_sweep_seed and not args.no_k_sweep
        summary = run_seed(args, seed, sets, data_flags, k_sweep=k_sweep)
        publish(args, seed, summary)
    return assemble(args)


@torch.no_grad()
def expert_specialisation(teacher_dir: Path, args) -> list[list[list[float]]]:
    """Per layer, the share of each task family's response tokens whose top-1 expert is e: [L][F][E]."""
    spec = PRESETS[args.preset]["synthetic"]
    model = checkpoints.load_model(str(teacher_dir))
    tokenizer = checkpoints.load_tokenizer(str(teacher_dir))
    rows = synthetic.synthetic_rows(800, seed=777, families=tuple(spec["families"]), n_facts=spec["n_facts"])
    families = sorted({r["category"] for r in rows})
    counts = None
    for family_index, family in enumerate(families):
        items = [moekd.tokenize_example(tokenizer, data.format_prompt(r["instruction"], r["context"]),
                                        r["response"],
                                        max_prompt_len=96, max_len=128)
                                        for r in rows if r["category"] == family]
        batch = moekd.collate(items, tokenizer.pad_token_id)
        with moekd.record_router_logits(model) as records:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = (batch["labels"] != -100).reshape(-1)
        if counts is None:
            counts = torch.zeros(len(records), len(families), records[0].shape[1])
        for layer, logits in enumerate(records):
            top1 = logits[mask].argmax(-1)
            counts[layer, family_index] = \
                torch.bincount(top1, minlength=logits.shape[1]).float() / max(len(top1), 1)
    args.families = families
    return counts.tolist()


# ----------------------------------------------------------------------------
# One training seed's report, and its publication

def small(result: dict, examples: bool = True) -> dict:
    """An eval.py result reduced to what the tables need.
    Per set the mean, std and per-eval-seed ROUGE-L, and (for the bootstrap) the per-example scores."""
    return {"avg": result["avg"], "sets": result["sets"],
            **({"examples": result["examples"]} if examples else {})}


def seed_report(args, run_args, results: dict[str, dict], set_names: list[str], sweep: dict, experts) -> dict:
    out = run_args.dir
    table = moe_eval.markdown_table(results, set_names)
    lines = [f"# Reproduction, preset {args.preset}, training seed {run_args.seed}", "", table]
    gap = results["teacher (SFT)"]["avg"] - results["student (SFT)"]["avg"]
    lines.append(f"Teacher - student gap (SFT rows, Avg): {gap:+.2f}")
    bits = None
    if experts:
        bits = specialisation_bits(torch.tensor(experts))
        lines.append(f"\nExpert specialisation, I(task family; top-1 expert) per teacher layer: "
                     f"{', '.join(f'{b:.2f}' for b in bits)} bits (0 = routing ignores the family, "
                     f"log2 {len(args.families)} = {math.log2(len(args.families)):.2f} = the family decides "
                     f"the expert)")
        plot_experts(args, out, experts)
    if sweep:
        lines += ["", "## Student side of Fig. 2 (kd, teacher top-k)", "",
                  moe_eval.markdown_table({f"kd, k={k}": r for k, r in sweep.items()}, set_names)]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    summary = {"preset": args.preset, "train_seed": run_args.seed, "eval_seeds": args.seeds,
               "sets": set_names,
               "protocol": {"test_examples": args.test_examples, "max_steps": args.max_steps},
               "rows": {label: small(r) for label, r in results.items()}, "teacher_student_gap": gap,
               "k_sweep": {str(k): small(r, examples=False) for k, r in sweep.items()}, "expert_bits": bits,
               "expert_top1_share": experts, "families": getattr(args, "families", None)}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))
    return summary


def publish(args, seed: int, summary: dict) -> Path:
    """Copy a finished seed's results.json to --publish/seed-<seed>.json (never over other results)."""
    path = args.publish / f"seed-{seed}.json"
    text = json.dumps(summary, indent=1) + "\n"
    if path.exists() and path.read_text() != text:
        raise MoekdError(f"--publish {args.publish}: seed-{seed}.json holds other results than this run's "
                         f"({args.out / f'seed-{seed}'}); move it away or pass another --publish")
    args.publish.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"[repro] seed {seed}: results -> {path}")
    return path


def specialisation_bits(share: torch.Tensor) -> list[float]:
    """Mutual information (bits) between task family (uniform) and top-1 expert, per layer.
    share is P(expert | family) [L, F, E]."""
    p_e = share.mean(1, keepdim=True)                                   # [L, 1, E]
    ratio = torch.where(share > 0, share / p_e.clamp_min(1e-12), torch.ones_like(share))
    return (share * ratio.log2()).sum(-1).mean(-1).tolist()


def plot_experts(args, out: Path, experts) -> None:
    plt = moe_eval.pyplot()
    share = torch.tensor(experts)  # [L, F, E]
    fig, axes = plt.subplots(1, share.shape[0], figsize=(3.2 * share.shape[0], 3.6), sharey=True)
    for layer, ax in enumerate(axes):
        ax.imshow(share[layer].numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set(title=f"layer {layer}", xlabel="top-1 expert", 
               xticks=range(0, share.shape[2], max(1, share.shape[2] // 8)))
    axes[0].set(yticks=range(len(args.families)), yticklabels=args.families)
    fig.suptitle("Teacher routing by task family: share of response tokens per top-1 expert")
    moe_eval.save_fig(fig, out / "experts.png")
    with (out / "experts.csv").open("w") as f:
        f.write("layer,family," + ",".join(f"expert_{e}" for e in range(share.shape[2])) + "\n")
        for layer in range(share.shape[0]):
            for fi, family in enumerate(args.families):
                f.write(f"{layer},{family}," + ",".join(f"{v:.4f}" for v in share[layer, fi].tolist()) + "\n")


# ----------------------------------------------------------------------------
# Assembly over training seeds (stats.py)

# Each baseline and the rows compared with it: every row with GKD and KD; KA and SAR also with ALL (the
# paper's ablation: do the MoE-specific methods add anything to simply activating every expert?).
BASELINES = {"GKD": None, "KD": None, "ALL": ("KA", "SAR")}


def load_seed_files(folder: Path) -> dict[int, dict]:
    """Every seed-<s>.json in folder, checked to share one protocol (preset, eval seeds, sets)."""
    files = sorted((p for p in folder.glob("seed-*.json") if p.stem[5:].isdigit()),
                   key=lambda p: int(p.stem[5:]))
    if not files:
        raise MoekdError(f"--publish {folder}: no seed-<s>.json files to assemble; run some training seeds "
                         f"first")
    seeds = {}
    for path in files:
        summary = json.loads(path.read_text())
        first = next(iter(seeds.values()), summary)
        differ = [k for k in ("preset", "eval_seeds", "sets", "protocol") if summary.get(k) != first.get(k)]
        if differ:
            raise MoekdError(f"--publish {folder}: {path.name} differs from the other seed files in "
                             f"{', '.join(differ)}; assemble one protocol at a time")
        seeds[summary["train_seed"]] = summary
    return seeds


def assemble_stats(seeds: dict[int, dict]) -> dict:
    """The statistics assembled over training seeds.
    Mean ± 95% t-interval per row and set, the paired differences of every row to GKD and KD with verdicts,
    the teacher-student gap, the k sweep and the expert specialisation."""
    first = next(iter(seeds.values()))
    set_names = first["sets"]
    labels = [label for label in first["rows"] if all(label in s["rows"] for s in seeds.values())]
    missing = sorted({label for s in seeds.values() for label in s["rows"]} - set(labels))
    per_seed_avg = {label: {seed: s["rows"][label]["avg"] for seed, s in seeds.items()} for label in labels}
    rows = {label: {"avg": stats.mean_ci(list(per_seed_avg[label].values())),
                    "per_seed_avg": per_seed_avg[label],
                    "sets": {name: stats.mean_ci([s["rows"][label]["sets"][name]["mean"]
                                                  for s in seeds.values()])
                             for name in set_names}} for label in labels}
    comparisons = []
    for base, compared in BASELINES.items():
        if base not in per_seed_avg:
            continue
        for label in labels:
            if label not in (base, "teacher (SFT)") and (compared is None or label in compared):
                diff = stats.paired_difference(per_seed_avg[label], per_seed_avg[base])
                comparisons.append({"row": label, "baseline": base, **diff, "verdict": stats.verdict(diff),
                                    "bootstrap": bootstrap(seeds, label, base)})
    gap = stats.mean_ci([s["teacher_student_gap"] for s in seeds.values()])
    gap["three_sd_met"] = None if gap["sd"] is None else gap["mean"] > 0 and gap["mean"] >= 3 * gap["sd"]
    sweep_seeds = [s for s in seeds.values() if s.get("k_sweep")]
    sweep = {k: {**stats.mean_ci([s["k_sweep"][k]["avg"] for s in sweep_seeds if k in s["k_sweep"]]),
                 "train_seeds": [s["train_seed"] for s in sweep_seeds if k in s["k_sweep"]]}
             for k in (sweep_seeds[0]["k_sweep"] if sweep_seeds else {})}
    bits = [s["expert_bits"] for s in seeds.values() if s.get("expert_bits")]
    return {"preset": first["preset"], "train_seeds": list(seeds), "eval_seeds": first["eval_seeds"],
            "sets": set_names, "protocol": first["protocol"], "method": stats.METHOD, "rows": rows,
            "missing_rows": missing, "comparisons": comparisons, "teacher_student_gap": gap, "k_sweep": sweep,
            "expert_bits": [stats.mean_ci(list(layer)) for layer in zip(*bits)] if bits else None}


def bootstrap(seeds: dict[int, dict], label: str, base: str) -> dict | None:
    """stats.hierarchical_bootstrap of label - base, when every seed file has the per-example scores."""
    if not all("examples" in s["rows"][label] and "examples" in s["rows"][base] for s in seeds.values()):
        return None
    return stats.hierarchical_bootstrap({seed: s["rows"][label]["examples"] for seed, s in seeds.items()},
                                        {seed: s["rows"][base]["examples"] for seed, s in seeds.items()})


def assembled_markdown(result: dict) -> str:
    n, sets = len(result["train_seeds"]), result["sets"]
    seeds = ", ".join(map(str, result["train_seeds"]))
    lines = [f"# Reproduction, preset {result['preset']}: {n} training seed{'s' * (n != 1)} ({seeds})", "",
             f"ROUGE-L; each cell: mean over training seeds ± the half-width of its 95% t-interval (the "
             f"interval is mean ± half-width); inside a training seed, the mean over eval seeds "
             f"{result['eval_seeds']}.",
             "", "| Model | " + " | ".join(moe_eval.PAPER_NAMES.get(s, s) for s in sets) + " | Avg |",
             "|" + "---|" * (len(sets) + 2)]
    for label, row in result["rows"].items():
        cells = [stats.fmt(row["sets"][s]) for s in sets] + [stats.fmt(row["avg"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if result["missing_rows"]:
        lines += ["", f"Rows not in every seed file (left out): {', '.join(result['missing_rows'])}."]
    lines += ["", "## Paired differences", "",
              f"Method: {result['method']}. The verdict reads the t-interval. "
              f"Also shown: {stats.BOOTSTRAP_METHOD}.", "",
              "| Row | vs | mean difference of Avg | 95% t-interval | verdict | bootstrap 95% (seeds, then "
              "examples) |",
              "|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        interval = "-" if c["half"] is None else f"[{c['lo']:+.2f}, {c['hi']:+.2f}]"
        boot = "-" if c["bootstrap"] is None else \
            f"[{c['bootstrap']['lo']:+.2f}, {c['bootstrap']['hi']:+.2f}]"
        lines.append(f"| {c['row']} | {c['baseline']} | {c['mean']:+.2f} | {interval} | {c['verdict']} | "
                     f"{boot} |")
    gap = result["teacher_student_gap"]
    lines += ["", f"Teacher - student gap (SFT rows, Avg), over training seeds: {stats.fmt(gap)}"
              + ("" if gap["sd"] is None else f"; sample std {gap['sd']:.2f}, gap / std = "
                 f"{gap['mean'] / gap['sd'] if gap['sd'] > 0 else math.inf:.1f} (capacity criterion, gap >= "
                 f"3 std: {'met' if gap['three_sd_met'] else 'not met'})")]
    if result["expert_bits"]:
        lines.append("Expert specialisation, I(task family; top-1 expert) per teacher layer (bits): "
                     + ", ".join(stats.fmt(b) for b in result["expert_bits"]))
    if result["k_sweep"]:
        used = sorted({s for v in result["k_sweep"].values() for s in v["train_seeds"]})
        lines += ["", f"## Student side of Fig. 2 (kd, teacher top-k; training seed{'s' * (len(used) != 1)} "
                      f"{', '.join(map(str, used))})", "", "| k | Avg |", "|---|---|"]
        lines += [f"| {k} | {stats.fmt(v)} |" for k, v in result["k_sweep"].items()]
    return "\n".join(lines) + "\n"


SUMMARY = [("GKD", "KD"), ("ALL", "GKD"), ("KA", "GKD"), ("SAR", "GKD"), ("KA", "ALL"), ("SAR", "ALL")]


def summary_markdown(root: Path) -> str:
    """One table over the presets assembled under root (<preset>/results.json).
    The SFT rows' Avg, the teacher-student gap and the paired differences behind the paper's ordering
    (KA, SAR > ALL > GKD > KD), each a 95% t-interval over training seeds with its verdict."""
    results = {p: json.loads((root / p / "results.json").read_text()) for p in PRESETS
               if (root / p / "results.json").is_file()}
    if not results:
        raise MoekdError(f"--summary: no <preset>/results.json under {root}; run or --assemble a preset "
                         f"first")

    def interval(c: dict) -> str:
        return f"{c['mean']:+.2f}" + ("" if c["half"] is None else f" [{c['lo']:+.2f}, {c['hi']:+.2f}]")

    head = ["ROUGE-L Avg (95% t-interval over training seeds)",
            *(f"{p} ({len(r['train_seeds'])} seed{'s' * (len(r['train_seeds']) != 1)})"
              for p, r in results.items())]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in ("teacher (SFT)", "student (SFT)"):
        lines.append(f"| {label} | " + " | ".join(stats.fmt(r["rows"][label]["avg"])
                                                  for r in results.values()) + " |")
    gaps = []
    for r in results.values():
        g = r["teacher_student_gap"]
        gaps.append(interval(g) + ("" if not g["sd"] else f", {g['mean'] / g['sd']:.1f} stds"))
    lines.append("| teacher - student (SFT) | " + " | ".join(gaps) + " |")
    for row, base in SUMMARY:
        cells = []
        for r in results.values():
            c = next((c for c in r["comparisons"] if (c["row"], c["baseline"]) == (row, base)), None)
            cells.append("-" if c is None else f"{interval(c)}: {c['verdict']}")
        lines.append(f"| {row} - {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def assemble(args) -> dict:
    """results.md, results.json and results.png in --publish, from the seed files found there."""
    result = assemble_stats(load_seed_files(args.publish))
    markdown = assembled_markdown(result)
    (args.publish / "results.md").write_text(markdown)
    (args.publish / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_assembled(result, args.publish / "results.png")
    print(markdown)
    return result


def plot_assembled(result: dict, path: Path) -> None:
    """The assembled result's figure, saved to `path`.
    Left: each row's Avg, mean and 95% t-interval over training seeds (dots: the seeds). Right: paired
    differences to GKD, KD and ALL with their intervals. Third panel, when there is one: the k sweep."""
    plt = moe_eval.pyplot()
    sweep = result["k_sweep"]
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(18 if sweep else 13, 4.8),
                             gridspec_kw={"width_ratios": [3, 3, 1.6] if sweep else [1, 1]})
    left, right = axes[0], axes[1]
    labels = list(result["rows"])
    for i, label in enumerate(labels):
        row = result["rows"][label]
        left.errorbar([i], [row["avg"]["mean"]], yerr=[[row["avg"]["half"] or 0]], fmt="o", capsize=5,
                      color="0.3" if "SFT" in label else f"C{i}")
        left.scatter([i] * len(row["per_seed_avg"]), list(row["per_seed_avg"].values()), s=10, color="0.6",
                     zorder=3)
    left.set(xticks=range(len(labels)),
             title=f"Avg ROUGE-L ({result['preset']}, {len(result['train_seeds'])} "
             f"training seeds; bars: 95% t-interval)", ylabel="ROUGE-L")
    left.set_xticklabels(labels, rotation=20)
    comps = result["comparisons"]
    for j, c in enumerate(comps):
        right.errorbar([j], [c["mean"]], yerr=[[c["half"] or 0]], fmt="o", capsize=5,
                       color=f"C{list(BASELINES).index(c['baseline'])}")
    right.axhline(0, color="0.5", lw=0.8)
    right.set(xticks=range(len(comps)),
              title="Paired difference of Avg (blue: vs GKD, orange: vs KD, green: vs ALL)",
              ylabel="ROUGE-L difference")
    right.set_xticklabels([f"{c['row'].split()[0]}-{c['baseline']}" for c in comps], rotation=40, fontsize=8)
    if sweep:
        ks = list(sweep)
        axes[2].errorbar([int(k) for k in ks], [sweep[k]["mean"] for k in ks], marker="o", capsize=3,
                         yerr=[sweep[k]["half"] or 0 for k in ks])
        axes[2].set(title="KD vs the teacher's top-k", xlabel="k", ylabel="Avg ROUGE-L",
                    xticks=[int(k) for k in ks])
    moe_eval.save_fig(fig, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.summary:
        markdown = summary_markdown(HERE / "docs" / "repro")
        print(markdown, end="")
        return {"summary": markdown}
    if args.assemble:
        return assemble(args)
    if args.preset == "dolly-mini" and not (Path(args.data_dir) / "dolly" / "dev.jsonl").is_file():
        raise MoekdError(f"--data-dir {args.data_dir}: no dolly/dev.jsonl for the dolly-mini preset")
    return run_pipeline(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
