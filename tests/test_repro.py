"""repro.py and stats.py (the pipeline's smoke run, its flags, t quantiles, intervals, bootstrap, the
assembly) and bench.py (smoke runs, the GPU check's code path on CPU, the memory plan): the full runs are
commands."""
import json
import math
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import errors
import moekd
import sampling

from conftest import TINY, TINY_CFG, assert_close, ids_batch

pytestmark = pytest.mark.usefixtures("seeded")  # torch seeded 0 before each test


# ----------------------------------------------------------------------------
# repro.py and stats.py

def test_repro_pipeline_smoke_and_resume(tmp_path, capsys):
    """Two training seeds end to end: per-seed folders and files, the assembly, the data shared by the seeds
    (only the training randomness differs), and a finished pipeline redoes nothing."""
    import repro
    out = tmp_path / "r"
    args = ["--out", str(out), "--max-steps", "2", "--test-examples", "2", "--seeds", "10,20",
            "--methods", "gkd,ka", "--no-k-sweep", "--train-seeds", "2"]
    result = repro.main(args)
    assert result["train_seeds"] == [10, 20] and list(result["rows"]) == ["teacher (SFT)", "student (SFT)",
                                                                          "GKD", "KA"]
    assert [(c["row"], c["baseline"]) for c in result["comparisons"]] == [("student (SFT)", "GKD"),
                                                                          ("KA", "GKD")]
    for c in result["comparisons"]:
        assert c["bootstrap"]["lo"] <= c["mean"] + 1e-9 and c["mean"] - 1e-9 <= c["bootstrap"]["hi"]
    published = out / "published"  # not a full-protocol run: nothing goes to docs/repro
    for seed in (10, 20):
        summary = json.loads((published / f"seed-{seed}.json").read_text())
        assert summary == json.loads((out / f"seed-{seed}" / "results.json").read_text())
        assert summary["train_seed"] == seed and list(summary["rows"]) == list(result["rows"])
        assert set(summary["rows"]["KA"]["sets"]) == {"add", "count", "fact", "lookup", "reverse", "sequence",
                                                      "sort", "spell"}
        assert set(summary["rows"]["KA"]["sets"]["add"]["scores"]) == {"10", "20"}
        # per example, the mean over eval seeds
        for name, scores in summary["rows"]["KA"]["examples"].items():
            assert len(scores) == 2 and \
                sum(scores) / 2 == pytest.approx(summary["rows"]["KA"]["sets"][name]["mean"], abs=0.01)
        for name in ("table.md", "experts.png", "experts.csv"):
            assert (out / f"seed-{seed}" / name).stat().st_size > 0
        share = torch.tensor(summary["expert_top1_share"])  # [layers, families, experts], rows sum to 1
        assert_close(share.sum(-1), torch.ones(share.shape[:2]))
        assert result["rows"]["GKD"]["per_seed_avg"][seed] == summary["rows"]["GKD"]["avg"]
    # the same data, other training randomness: the run configs differ only in the seed and their own paths
    runs = {seed: json.loads((out / f"seed-{seed}" / "runs" / "sft-teacher" / "run.json").read_text())
            for seed in (10, 20)}
    differ = {k for k in runs[10] if runs[10][k] != runs[20][k]}
    assert differ == {"seed", "model", "out"} and runs[10]["data"] == str(out / "data" / "train")
    inits = [json.loads((out / f"seed-{s}" / "models" / "teacher-init" / "config.json").read_text())
             for s in (10, 20)]
    assert [c.pop("moekd_init_seed") for c in inits] == [10, 20] and inits[0] == inits[1]
    weights = [load_file(out / f"seed-{s}" / "runs" / "sft-teacher" / "final" / "model.safetensors")
               for s in (10, 20)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    table = (published / "results.md").read_text()
    assert "2 training seeds (10, 20)" in table and "| KA | GKD |" in table and "Student-t" in table
    assert (published / "results.png").stat().st_size > 0
    assert json.loads((published / "results.json").read_text())["comparisons"] == \
        json.loads(json.dumps(result["comparisons"]))
    capsys.readouterr()
    again = repro.main(args)  # a finished pipeline redoes nothing
    assert not re.search(r"\[repro\] seed \d+ \S+: (training|resuming)", capsys.readouterr().out)
    assert again["rows"] == result["rows"]
    # files that exist
    assert repro.main([*args[:-2], "--train-seeds", "20,", "--assemble"])["train_seeds"] == [10, 20]
    with pytest.raises(errors.MoekdError, match="--out .*other settings \\(eval_seeds differ\\)"):
        repro.main([*args[:7], "10", *args[8:]])


def test_repro_train_seeds_flag():
    import repro
    assert repro.parse_train_seeds("3") == [10, 20, 30] and repro.parse_train_seeds("5")[-1] == 50
    assert repro.parse_train_seeds("30,") == [30] and repro.parse_train_seeds("7,3") == [7, 3]
    for bad, message in (("30", "a count must be 1..20; for the single seed 30 write --train-seeds 30,"),
                         ("0", "a count must be"),
                         ("a,b", "expected a count \\(3\\) or a comma-separated list"),
                         ("10,10", "need distinct")):
        with pytest.raises(errors.MoekdError, match=f"--train-seeds {bad}: {message}"):
            repro.parse_train_seeds(bad)
    with pytest.raises(errors.MoekdError, match="--seed: replaced by --train-seeds"):
        repro.parse_args(["--seed", "10"])
    assert repro.parse_args([]).publish == repro.HERE / "docs" / "repro" / "synthetic"
    assert repro.parse_args(["--max-steps", "2", "--out", "x"]).publish == Path("x") / "published"


def test_t_quantiles_against_tables():
    import stats
    for df, value in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
    assert stats.t_quantile(0.995, 5) == pytest.approx(4.032, abs=5e-4)
    assert stats.t_quantile(0.025, 2) == pytest.approx(-4.303, abs=5e-4)
    assert stats.t_quantile(0.75, 1) == pytest.approx(1.0)                        # Cauchy: tan(pi/4)
    # df 2: (2p-1)/sqrt(2p(1-p))
    assert stats.t_quantile(0.9, 2) == pytest.approx(0.8 / math.sqrt(0.18))
    assert stats.t_cdf(0.0, 7) == 0.5 and stats.t_cdf(1.0, 1) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)


def test_mean_ci_paired_difference_and_verdicts_hand_computed():
    import stats
    ci = stats.mean_ci([1.0, 2.0, 3.0, 4.0])   # sd = sqrt(5/3); half = t(0.975, 3) * sd / 2
    assert ci["mean"] == 2.5 and ci["sd"] == pytest.approx(math.sqrt(5 / 3))
    assert ci["half"] == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, rel=1e-5)
    assert (ci["lo"], ci["hi"]) == pytest.approx((2.5 - ci["half"], 2.5 + ci["half"]))
    gkd = {10: 49.0, 20: 50.0, 30: 51.0}
    within = stats.paired_difference({10: 50.0, 20: 52.0, 30: 51.0}, gkd)     # differences 1, 2, 0
    assert within["mean"] == pytest.approx(1.0) and within["half"] == pytest.approx(4.302653 / math.sqrt(3),
                                                                                    rel=1e-5)
    assert stats.verdict(within) == "within noise at this scale"
    # 2, 3, 4; seed 40 unpaired
    better = stats.paired_difference({10: 51.0, 20: 53.0, 30: 55.0, 40: 0.0}, gkd)
    assert better["seeds"] == [10, 20, 30] and better["lo"] == pytest.approx(3 - 4.302653 / math.sqrt(3),
                                                                             rel=1e-5)
    assert stats.verdict(better) == "better"
    worse = stats.paired_difference(gkd, {10: 51.0, 20: 53.0, 30: 55.0})
    assert worse["mean"] == pytest.approx(-3.0) and stats.verdict(worse) == "worse"
    one = stats.paired_difference({10: 50.0}, {10: 49.0})
    assert one["mean"] == 1.0 and one["half"] is None and \
        stats.verdict(one) == "one training seed: no interval"
    assert stats.fmt(ci) == "2.50 ± 2.05" and stats.fmt(one) == "1.00"


def test_hierarchical_bootstrap_hand_computed():
    import stats
    a = {10: {"x": [50.0, 60.0, 70.0], "y": [10.0, 20.0]}, 20: {"x": [40.0, 41.0, 42.0], "y": [0.0, 5.0]}}
    shifted = {s: {k: [v - 1.5 for v in vs] for k, vs in sets.items()} for s, sets in a.items()}
    same = stats.hierarchical_bootstrap(a, shifted, n_boot=200)  # every paired difference is 1.5
    assert (same["mean"], same["lo"], same["hi"]) == pytest.approx((1.5, 1.5, 1.5))
    # seed 10's differences 1 (set x) and 3 (set y) -> Avg difference 2; seed 20's: 0 and 0 -> 0
    b = {10: {"x": [49.0, 59.0, 69.0], "y": [7.0, 17.0]}, 20: a[20]}
    boot = stats.hierarchical_bootstrap(a, b, n_boot=500, seed=1)
    assert boot["mean"] == pytest.approx(1.0) and boot["lo"] == pytest.approx(0.0) and \
        boot["hi"] == pytest.approx(2.0)
    assert boot == stats.hierarchical_bootstrap(a, b, n_boot=500, seed=1)  # seeded: the same draws
    with pytest.raises(ValueError):
        stats.hierarchical_bootstrap(a, {30: a[10]})


def test_repro_assembly_hand_computed(tmp_path):
    """Two seed files made by hand: per-row mean ± interval, paired differences, the gap criterion, k
    sweep."""
    import repro
    def row(avg, fact):
        return {"avg": avg, "sets": {"fact": {"mean": fact, "std": 0.0, "scores": {"10": fact}}}}
    def seed_file(seed, teacher, student, kd, gkd, sweep=None):
        rows = {"teacher (SFT)": row(teacher, teacher), "student (SFT)": row(student, student),
                "KD": row(kd, kd),
                "GKD": row(gkd, gkd), "ALL": row(gkd + 1, gkd + 1), "KA": row(gkd + 2 + seed / 10, gkd + 2)}
        return {"preset": "synthetic", "train_seed": seed, "eval_seeds": "10", "sets": ["fact"],
                "protocol": {},
                "rows": rows, "teacher_student_gap": teacher - student, "expert_bits": [0.5, 1.0],
                "k_sweep": {k: row(v, v) for k, v in (sweep or {}).items()}}
    root, tmp_path = tmp_path, tmp_path / "synthetic"
    tmp_path.mkdir()
    for seed, values in ((10, (60, 40, 41, 43, {"2": 41.0, "8": 40.0})), (20, (62, 44, 45, 46))):
        (tmp_path / f"seed-{seed}.json").write_text(json.dumps(seed_file(seed, *values)))
    result = repro.assemble(repro.parse_args(["--assemble", "--publish", str(tmp_path)]))
    half = 12.706205 * math.sqrt(2) / math.sqrt(2)  # teacher: 60, 62 -> sd sqrt(2), n 2
    assert result["rows"]["teacher (SFT)"]["avg"]["mean"] == 61 and \
        result["rows"]["teacher (SFT)"]["avg"]["half"] == pytest.approx(half, rel=1e-5)
    by = {(c["row"], c["baseline"]): c for c in result["comparisons"]}
    assert set(by) == {(row, base) for base in ("GKD", "KD")
                       for row in ("student (SFT)", "KD", "GKD", "ALL", "KA")
                       if row != base} | {("KA", "ALL")}  # ALL is a baseline of KA and SAR only
    ka_all = by[("KA", "ALL")]  # differences 2, 3: mean 2.5, sd sqrt(0.5), half 12.706 * 0.5 = 6.35
    assert ka_all["mean"] == pytest.approx(2.5) and ka_all["lo"] == pytest.approx(2.5 - 12.706205 * 0.5,
                                                                                  rel=1e-5)
    kd_gkd = by[("KD", "GKD")]  # differences -2, -1: mean -1.5, sd sqrt(0.5), half = 12.706 * 0.5
    assert kd_gkd["mean"] == pytest.approx(-1.5) and kd_gkd["half"] == pytest.approx(12.706205 * 0.5,
                                                                                     rel=1e-5)
    assert kd_gkd["verdict"] == "within noise at this scale"
    gap = result["teacher_student_gap"]  # 20, 18: mean 19, sd sqrt(2): 19 >= 3 sqrt(2)
    assert gap["mean"] == 19 and gap["sd"] == pytest.approx(math.sqrt(2)) and gap["three_sd_met"] is True
    assert result["k_sweep"]["2"]["mean"] == 41.0 and result["k_sweep"]["2"]["train_seeds"] == [10]
    assert result["expert_bits"][1]["mean"] == 1.0
    md = (tmp_path / "results.md").read_text()
    assert "| KD | GKD | -1.50 | [-7.85, +4.85] | within noise at this scale | - |" in md and \
        "gap >= 3 std: met" in md
    summary = repro.summary_markdown(root).splitlines()  # the README's table: one column per assembled preset
    assert summary[0].endswith("| synthetic (2 seeds) |") and "| teacher (SFT) | 61.00 ± 12.71 |" in summary
    # 19 ± 12.706 sqrt(2)/sqrt(2)
    assert "| teacher - student (SFT) | +19.00 [+6.29, +31.71], 13.4 stds |" in summary
    assert "| GKD - KD | +1.50 [-4.85, +7.85]: within noise at this scale |" in summary and \
        "| SAR - GKD | - |" in summary
    assert "| KA - ALL | +2.50 [-3.85, +8.85]: within noise at this scale |" in summary
    with pytest.raises(errors.MoekdError, match="--summary: no <preset>/results.json under"):
        repro.summary_markdown(root / "synthetic")
    (tmp_path / "seed-30.json").write_text(json.dumps({**seed_file(30, 1, 1, 1, 1), "eval_seeds": "10,20"}))
    with pytest.raises(errors.MoekdError,
                       match="seed-30.json differs from the other seed files in eval_seeds"):
        repro.main(["--assemble", "--publish", str(tmp_path)])
    with pytest.raises(errors.MoekdError, match="--publish .*no seed-<s>.json"):
        repro.main(["--assemble", "--publish", str(tmp_path / "empty")])


def test_specialisation_bits_hand_computed():
    import repro
    separated = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])   # each family its own expert: 1 bit
    ignored = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])     # routing ignores the family: 0 bits
    half = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])        # P(e) = (3/4, 1/4)
    expected = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5 * math.log2(2))
    assert repro.specialisation_bits(separated) == [1.0] and repro.specialisation_bits(ignored) == [0.0]
    assert repro.specialisation_bits(half)[0] == pytest.approx(expected)


# ----------------------------------------------------------------------------
# bench.py

def test_bench_smoke():
    import bench
    result = bench.main(["--sizes", "tiny", "--steps", "2", "--warmup", "0", "--methods", "gkd,ka-m2,sar",
                         "--no-scaling", "--no-kl-memory", "--no-large-vocab", "--compile-sampler", "off"])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"gkd", "ka-m2", "sar"}
    assert rows["sar"]["router_ms"] > 0 and rows["gkd"]["router_ms"] == 0 and rows["gkd"]["gen_ms"] > 0
    assert all(r["step_ms"] > 0 and r["overhead"] > 0 and r["peak_mb"] > 0 for r in rows.values())
    assert rows["gkd"]["gen_generate_ms"] > 0 and result["derived"]["tiny"]["generation_speedup"] > 0
    # KA's teacher heads run inside the student's chunked loss: timed on their own, outside the parts' sum
    assert rows["ka-m2"]["teacher_head_ms"] > 0 and rows["gkd"]["teacher_head_ms"] == 0


def test_gpu_check_at_tiny_scale_on_cpu(tmp_path, monkeypatch):
    """bench.py --gpu-check's code path on CPU at tiny shapes, the ka stage forced to fail.

    Its traceback is recorded and every other stage's figures are on disk (the JSON was already saved before
    the failing stage ran): every method's bf16 step finite, the tiny teacher frozen but SAR's routers, the
    parts of each step timed where train_step calls them (SAR alone has a router part), the bandwidth floor
    from the student's shapes (the paper's student: the parameter count of its public config), the
    environment, the Markdown."""
    import bench
    original, seen = bench.paper_method, {}

    def failing_ka(method, *args, **kwargs):
        if method == "ka":
            seen.update(json.loads((tmp_path / "check.json").read_text())["stages"])
            raise RuntimeError("forced ka failure")
        return original(method, *args, **kwargs)
    monkeypatch.setattr(bench, "paper_method", failing_ka)
    bench.gpu_check("tiny", torch.device("cpu"), 4.3e12, tmp_path / "check.json")
    report = json.loads((tmp_path / "check.json").read_text())
    assert seen["method_gkd"]["ok"] and "method_ka" not in seen  # saved after each stage, before the next
    stages = report["stages"]
    ka = stages.pop("method_ka")
    assert not ka["ok"] and "forced ka failure" in ka["error"] and "in failing_ka" in ka["error"]  # traceback
    assert stages.pop("cuda_tests") == {"ok": False, "skipped": "no CUDA device"}
    assert list(stages) == ["environment", "tiny_bf16_steps", "paper_pair", "method_gkd", "method_sar",
                            "sampler"]
    assert all(st["ok"] and st["seconds"] > 0 and st["peak_rss_gb"] > 0 for st in stages.values())
    assert all(set(st["compile"]) == {"frames_compiled", "unique_graphs", "recompiles", "cudagraph_skips",
                                      "cudagraph_recordings"} for st in stages.values())
    env = report["environment"]
    assert env["torch"] == torch.__version__
    assert set(env["sdpa"]) == {"flash", "mem_efficient", "math", "cudnn"}
    assert "nvidia_smi" in env and "triton" in env and report["transformers"] == env["transformers"]
    assert report["tiny_bf16_finite"] and set(report["tiny_bf16_steps"]) == set(moekd.METHODS)
    routers = sum(p.numel() for n, p in checkpoints.load_model(str(TINY)).named_parameters() if ".gate." in n)
    assert {m: logs["teacher_trainable"] for m, logs in report["tiny_bf16_steps"].items()} == {
        m: routers if m == "sar" else 0 for m in moekd.METHODS}
    by = {m["method"]: m for m in report["methods"]}
    assert set(by) == {"gkd", "sar"}
    for m in by.values():
        assert len(m["steps"]) == 2 and all(s["student_s"] > 0 and s["gen_s"] > 0 for s in m["steps"])
        assert m["gen_tokens_per_s"] == pytest.approx(4 * 16 / m["steady"]["gen_s"])
    assert by["sar"]["steady"]["router_s"] > 0 and by["gkd"]["steady"]["router_s"] == 0
    assert by["sar"]["plan_gb"] > by["gkd"]["plan_gb"] and report["sampler"]["speedup"] > 0
    check = bench.CHECKS["paper"]
    weights = 2 * 1.345e9 + 2 * 24 * 16 * 384 * 2048 * 2          # bf16 weights + half the final KV cache
    assert bench.bandwidth_floor_tokens_per_s(check, 4.3e12) == pytest.approx(16 / (weights / 4.3e12),
                                                                              rel=0.01)
    md = (tmp_path / "check.md").read_text()
    assert "| gkd |" in md and "| method_ka | **FAILED** |" in md and "forced ka failure" in md
    # restored
    assert moekd.sample_tokens is sampling.sample_tokens and moekd.teacher_hidden.__module__ == "moekd"


def test_gpu_check_keeps_the_test_output_through_a_timeout_and_an_empty_one(tmp_path):
    """The CUDA tests' subprocess: killed at its timeout, the check goes on with what it printed saved; no
    output at all is a summary too; pytest's FAILED/ERROR lines are picked out of the -rfE summary."""
    import bench
    slow = [sys.executable, "-c", "import time; print('collected 9 items', flush=True); time.sleep(60)"]
    t0 = time.perf_counter()
    out = bench.run_tests(slow, tmp_path / "slow.txt", timeout=2)
    assert time.perf_counter() - t0 < 30 and out["timed_out"] and out["returncode"] is None
    assert out["summary"] == "killed after 2 s; last line: collected 9 items"
    assert (tmp_path / "slow.txt").read_text() == "collected 9 items\n"
    empty = bench.run_tests([sys.executable, "-c", "pass"], tmp_path / "empty.txt", timeout=60)
    assert empty == {"returncode": 0, "timed_out": False, "log": str(tmp_path / "empty.txt"),
                     "summary": "(no output)", "failures": []}
    lines = ["F.", "FAILED test_moekd.py::test_a - AssertionError", "ERROR test_moekd.py::test_b", "1 failed"]
    failed = bench.run_tests([sys.executable, "-c", f"import sys; print({chr(10).join(lines)!r}); "
                              "sys.stderr.write('warning\\n'); sys.exit(1)"], tmp_path / "f.txt", timeout=60)
    assert failed["returncode"] == 1 and failed["failures"] == lines[1:3]
    assert "warning" in (tmp_path / "f.txt").read_text()  # stderr kept too


def test_memory_plan_counts_sars_saved_concatenated_expert_weights():
    """SAR's router backward through a Llama-MoE teacher saves each layer's concatenated expert weights
    (counted here from autograd's saved tensors on the tiny teacher, [I, H] or [H, I]: 3 per layer, 1 in the
    first, whose input needs no gradient); the plan counts them: (3 x 32 - 2) x 16 experts x 688 x 4096 x 2
    bytes = 8.48 GB for the paper's teacher."""
    import bench
    teacher = checkpoints.load_model(str(TINY)).requires_grad_(False)
    moekd.train_routers(teacher)
    I, H, L = TINY_CFG["intermediate_size"], TINY_CFG["hidden_size"], TINY_CFG["num_hidden_layers"]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        with moekd.moe_routing(teacher, "all"):
            teacher(ids_batch()).logits.sum().backward()
    assert sum(shape in ((I, H), (H, I)) for shape in saved) == 3 * L - 2
    pair = bench.PAIRS[bench.PAPER_PAIR]
    opts = dict(shard_teacher=False, shard_student=False, grad_checkpointing=False)
    sar, gkd = bench.plan(pair, **opts, sar=True), bench.plan(pair, **opts, sar=False)
    assert sar["SAR saved expert weights"] == pytest.approx(94 * 16 * 688 * 4096 * 2 / 1e9)  # 8.48
    assert gkd["SAR saved expert weights"] == 0
    extra = sar["SAR saved expert weights"] + sar["teacher activations (SAR)"]
    assert sar["total"] - gkd["total"] == pytest.approx(extra)
    other = bench.PAIRS["Qwen3-30B-A3B -> Qwen3-1.7B"]  # stacked expert weights (grouped_mm): no copy
    assert bench.plan(other, **opts, sar=True)["SAR saved expert weights"] == 0


def test_bench_loss_paths_compute_the_same_gradients(monkeypatch):
    """bench.py's large-vocab comparison times three ways to the same numbers: the plain KLs on full logits,
    moekd.step_losses (the hand-derived chunked path) and, for the KL-only methods, hidden_losses.chunked_loss
    (the generic path), on a small shape here."""
    import bench
    monkeypatch.setitem(bench.LOSS_SHAPES, "small", dict(V=50, H=8, B=2, T=9, prompt=3, M=3))
    for method in bench.LOSS_METHODS:
        paths = bench.loss_paths(method)
        generic = method in ("gkd", "ka", "sar-router")
        assert paths[:2] == ("logits", "hidden") and (len(paths) == 3) == generic
        grads = []
        for path in paths:
            x = bench.loss_inputs(method, "small")
            bench.LOSS_PATHS[path](method, x, 1)
            grads.append([t.grad for t in (x["hs"], x["ws"], x["ht"])])
        for other in grads[1:]:
            for a, b in zip(grads[0], other):
                assert (a is None) == (b is None) and (a is None
                                                       or torch.allclose(a, b, atol=1e-6, rtol=1e-4)), method


@pytest.mark.parametrize("method", ["kd", "ka-gold"])
def test_bench_student_part_is_the_methods_own_step(method):
    """bench.py times the step functions training uses (kd's --kd-ratio included), not a copy of them."""
    import bench
    teacher, student = bench.build("tiny", None, torch.device("cpu"))
    teacher.requires_grad_(False)
    cfg = moekd.Config(method=method, kd_ratio=0.3, batch_size=2, max_prompt_len=6, max_len=12, ka_lambda=0.0)
    rows = [{"prompt_ids": [5, 6, 7], "input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},
            {"prompt_ids": [9, 4], "input_ids": [9, 4, 3, 3], "labels": [-100, -100, 3, 3]}]
    extras = moekd.method_state(cfg, teacher, torch.float32)
    parts = bench.step_parts(cfg, student, teacher, bench.Tokens(), rows, None, extras)
    torch.manual_seed(1)
    parts["student"]()
    timed = {n: p.grad.clone() for n, p in student.named_parameters()}
    batch = moekd.collate(rows, 2)
    student.zero_grad()
    norm = float(moekd.loss_mask(batch["labels"]).sum())
    torch.manual_seed(1)
    moekd.method_step(method)(student, teacher, batch, cfg, norm=norm, n_micro=1,
                              state=extras)["loss"].backward()
    for n, p in student.named_parameters():
        assert_close(timed[n], p.grad)
