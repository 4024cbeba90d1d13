"""eval.py: the ROUGE-L protocol, the output files, seed determinism, the MoE analyses (gate mass, router
shift, k sweep), bad input, incremental evaluation, its own decoding settings."""
import json
import math

import pytest
import torch

import checkpoints
import errors
import eval as moe_eval
import moekd
import sampling

from conftest import (TINY, STUDENT, TINY_CFG, assert_close, eval_args,
                      saved_with_generation_config)

pytestmark = pytest.mark.usefixtures("seeded")  # torch seeded 0 before each test


@pytest.mark.parametrize("prediction,references,expected", [
    ("the cat sat on the mat", ["the cat sat on the mat"], 100.0),
    ("the cat sat", ["the cat sat on the mat"], 100 * 2 * 1.0 * 0.5 / 1.5),     # LCS 3: P = 1, R = 1/2
    # LCS 3
    ("on the mat the cat", ["the cat sat on the mat"], 100 * 2 * (3 / 5) * (3 / 6) / (3 / 5 + 3 / 6)),
    # lower-cased, punctuation dropped
    ("Hello, World!", ["hello world"], 100.0),
    ("running dogs", ["run dog"], 100.0),                                       # Porter stemming
    ("a b", ["x y", "a b c d"], 100 * 2 * 1.0 * 0.5 / 1.5),                       # max over references
    ("", ["anything at all"], 0.0),
])
def test_rouge_l_golden(prediction, references, expected):
    assert moekd.rouge_l(prediction, references) == pytest.approx(expected, abs=1e-9)


def test_rouge_l_non_ascii_does_not_crash():
    assert 0.0 <= moekd.rouge_l("café 東京 naïve", ["cafe naive Tokyo", "東京"]) <= 100.0


def test_eval_prompt_and_response_handling(tokenizer):
    ids = moe_eval.encode_prompts(tokenizer, ["word " * 100, "Hi"], 8)
    assert ids[0][0] == tokenizer.bos_token_id and len(ids[0]) == 8  # BOS added, first 8 tokens kept
    assert ids[1] == [tokenizer.bos_token_id] + tokenizer.encode("Hi", add_special_tokens=False)
    assert moe_eval.clean_response("  an answer <|endoftext|> junk") == "an answer"


def test_summary_and_table():
    s = moe_eval.summarize({"dolly": {10: 20.0, 20: 30.0}, "vicuna": {10: 10.0, 20: 10.0}, "uinst": None})
    assert s["sets"]["dolly"]["mean"] == 25.0 and s["sets"]["dolly"]["std"] == 5.0  # population std
    assert s["avg"] == 17.5 and s["missing"] == ["uinst"]
    table = moe_eval.markdown_table({"m": s}, ["dolly", "vicuna", "uinst"])
    assert table.splitlines()[0] == "| Model | Dolly | Vicuna | UnNI | Avg |"
    assert table.splitlines()[2] == "| m | 25.00 ± 5.00 | 10.00 ± 0.00 | missing | 17.50 |"


def test_activated_mass_and_router_kl_hand_computed():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    assert_close(moe_eval.activated_mass(probs), torch.tensor([0.55, 0.85, 1.0]))
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
    kl, clamped = moe_eval.router_kl(p, q)
    assert_close(kl, torch.tensor([0.5 * math.log(2) + 0.5 * math.log(2 / 3)])) and clamped == 0


def test_eval_writes_table_json_generations_and_lists_missing_sets(tmp_path):
    absent = tmp_path / "absent.jsonl"  # UnNI stays missing even where fetch_data.py got it
    result = moe_eval.main(eval_args(tmp_path, "--seeds", "10,20", "--sets",
                                     f"dolly,self-inst,vicuna,sinst,uinst={absent}"))
    out = tmp_path / "ev"
    assert (out / "table.md").read_text().splitlines()[0] == \
        "| Model | Dolly | SelfInst | Vicuna | S-NI | UnNI | Avg |"
    data = json.loads((out / "results.json").read_text())
    assert set(data["sets"]) == {"dolly", "self-inst", "vicuna", "sinst"} and data["missing"] == ["uinst"]
    assert set(data["sets"]["dolly"]["scores"]) == {"10", "20"}
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4 * 2 * 3 and {"prompt", "references", "response", "seed", "set"} <= set(gens[0])
    assert isinstance(gens[0]["references"], list)
    assert result["avg"] == pytest.approx(sum(s["mean"] for s in data["sets"].values()) / 4)


def test_eval_generation_is_deterministic_by_seed(tmp_path):
    def responses(name, seeds):
        moe_eval.main(eval_args(tmp_path, "--sets", "vicuna", "--seeds", seeds, name=name))
        return [json.loads(line)["response"]
                for line in (tmp_path / name / "generations.jsonl").read_text().splitlines()]
    assert responses("a", "10") == responses("b", "10")
    assert responses("a2", "10") != responses("c", "20")


def test_gate_mass_analysis(tmp_path):
    result = moe_eval.main(eval_args(tmp_path, "--analysis", "gate-mass", "--sets", "dolly",
                                     "--max-examples", "6"))
    assert result["native_k"] == TINY_CFG["num_selects"]
    mass = torch.tensor(result["mass"])
    assert mass.shape == (TINY_CFG["num_hidden_layers"], TINY_CFG["num_experts"])
    assert ((mass >= 0) & (mass <= 1 + 1e-6)).all() and (mass.diff(dim=1) >= -1e-7).all()
    assert_close(mass[:, -1], torch.ones(3))
    assert (tmp_path / "ev" / "gate_mass.csv").exists() and \
        (tmp_path / "ev" / "gate_mass.png").stat().st_size > 0


def test_router_shift_is_zero_for_unchanged_routers_and_positive_after_change(tmp_path):
    from safetensors.torch import save_file
    teacher = checkpoints.load_model(str(TINY))
    save_file(moekd.router_state_dict(teacher), tmp_path / "same.safetensors")
    result = moe_eval.main(eval_args(tmp_path, "--analysis", "router-shift", "--routers",
                                     str(tmp_path / "same.safetensors"),
                                     "--sets", "dolly", "--max-examples", "4"))
    assert result["mean_kl"] == [0.0, 0.0, 0.0]
    state = moekd.router_state_dict(teacher)
    state["model.layers.2.mlp.gate.gate_network.2.weight"] += 0.5
    save_file(state, tmp_path / "moved.safetensors")
    result = moe_eval.main(eval_args(tmp_path, "--analysis", "router-shift", "--routers",
                                     str(tmp_path / "moved.safetensors"),
                                     "--sets", "dolly", "--max-examples", "4", name="moved"))
    assert result["mean_kl"][:2] == [0.0, 0.0] and result["mean_kl"][2] > 0  # only the changed layer moves
    assert (tmp_path / "moved" / "router_shift_hist.png").exists()


def test_k_sweep_and_routing_flags(tmp_path):
    result = moe_eval.main(eval_args(tmp_path, "--analysis", "k-sweep", "--sets", "vicuna", "--max-examples",
                                     "2", "--max-new-tokens", "4"))
    assert list(result["k"]) == [str(k) for k in range(2, 8)]
    assert (tmp_path / "ev" / "k_sweep.csv").read_text().splitlines()[0] == "k,vicuna,avg"
    result = moe_eval.main(eval_args(tmp_path, "--routing", "sample", "--num-selects", "6", "--sample-prob",
                                     "0.5", "--sets", "vicuna", "--routed-mass", "literal", name="sampled"))
    assert "vicuna" in result["sets"]
    assert json.loads((tmp_path / "sampled" / "eval.json").read_text())["protocol"]["routed_mass"] == \
        "literal"
    result = moe_eval.main(eval_args(tmp_path, "--routing", "topp", "--top-p", "0.6", "--sets", "vicuna",
                                     name="topp"))
    protocol = json.loads((tmp_path / "topp" / "results.json").read_text())["protocol"]
    assert (protocol["routing"], protocol["top_p"], protocol["routed_mass"]) == ("topp", 0.6, "native")
    assert "vicuna" in result["sets"]


@pytest.mark.parametrize("extra,pattern", [
    (["--sets", "dolly,nope"], "--sets: unknown set 'nope'"),
    (["--analysis", "gate-mass", "--model", str(STUDENT)], "--analysis gate-mass needs an MoE model"),
    (["--routing", "all", "--model", str(STUDENT)], "--routing/--routers needs an MoE model"),
    (["--analysis", "router-shift"], "needs --routers"),
    (["--seeds", "ten"], "--seeds 'ten': expected comma-separated integers"),
    (["--routing", "topp"], "--top-p goes with --routing topp"),
])
def test_eval_bad_input(tmp_path, extra, pattern):
    with pytest.raises(errors.MoekdError, match=pattern):
        moe_eval.main(eval_args(tmp_path, *extra))
    assert not (tmp_path / "ev").exists()


def test_eval_missing_data_is_an_error_unless_sets_are_named(tmp_path):
    with pytest.raises(errors.MoekdError,
                       match=r"^--data-dir .*nothing: no such folder; fetch the sets with python "
                             r"fetch_data.py --out .*nothing$"):
        moe_eval.main(["--model", str(TINY), "--data-dir", str(tmp_path / "nothing"), "--out",
                       str(tmp_path / "ev")])
    (tmp_path / "data" / "dolly").mkdir(parents=True)
    (tmp_path / "data" / "dolly" / "valid.jsonl").write_text('{"prompt": "p", "output": "o"}\n')
    with pytest.raises(errors.MoekdError,
                       match=r"missing self-inst \(self-inst/valid.jsonl\), vicuna .*; name the sets"):
        moe_eval.main(["--model", str(TINY), "--data-dir", str(tmp_path / "data"), "--out",
                       str(tmp_path / "ev")])
    with pytest.raises(errors.MoekdError, match="--sets: none of the requested sets exists"):
        moe_eval.main(eval_args(tmp_path, "--data-dir", str(tmp_path / "nothing"), "--sets", "dolly,vicuna"))
    assert not (tmp_path / "ev").exists()


def test_eval_saves_each_pair_and_a_rerun_skips_finished_ones(tmp_path, monkeypatch):
    args = lambda name, *e: eval_args(tmp_path, "--sets", "dolly,vicuna", "--seeds", "10,20",
                                      "--max-examples", "2",  # noqa: E731
                                      "--max-new-tokens", "4", *e, name=name)
    whole = moe_eval.main(args("whole"))
    real, calls = moe_eval.generate, []
    def generate(*a, **kw):
        calls.append(a[3])
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped during the third (set, seed)
        return real(*a, **kw)
    monkeypatch.setattr(moe_eval, "generate", generate)
    with pytest.raises(KeyboardInterrupt):
        moe_eval.main(args("cut"))
    assert sorted(p.name for p in (tmp_path / "cut" / "pairs").iterdir()) == ["dolly-seed10.json",
                                                                              "dolly-seed20.json"]
    calls.clear()
    resumed = moe_eval.main(args("cut"))
    assert len(calls) == 2 and resumed["sets"] == whole["sets"]
    for name in ("table.md", "results.json", "generations.jsonl"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "whole" / name).read_text()
    with pytest.raises(errors.MoekdError, match=r"holds an evaluation with other settings \(protocol differ"):
        moe_eval.main(args("cut", "--seeds", "10"))


def test_eval_malformed_set_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "output": ["o"]}\n{oops\n')
    with pytest.raises(errors.MoekdError, match=r"bad\.jsonl:2: malformed JSON"):
        moe_eval.main(eval_args(tmp_path, "--sets", f"mine={tmp_path / 'bad.jsonl'}"))
    assert not (tmp_path / "ev").exists()


def test_eval_no_repeat_ngram_size_reaches_generate(tmp_path, tokenizer):
    """eval.py's own setting (the paper's no_repeat_ngram_size 6) still applies, and only it: a checkpoint's
    repetition penalty does not."""
    import eval as moe_eval
    model = checkpoints.load_model(str(saved_with_generation_config(tmp_path, tokenizer,
                                                                    repetition_penalty=5.0)))
    seen = []
    generate = model.generate
    model.generate = lambda *a, **kw: seen.append(kw["generation_config"]) or generate(*a, **kw)
    args = moe_eval.parse_args(["--model", "x", "--max-new-tokens", "8"])
    args.amp_dtype = torch.float32
    moe_eval.generate(model, tokenizer, [{"prompt": "Q: hi\n"}], 10, args, desc="t")
    assert seen[0].no_repeat_ngram_size == 6 and seen[0].repetition_penalty in (None, 1.0)
    # and the option has its effect: no token repeats with n = 1, repeats without it
    prompts = [tokenizer.encode("Q: hi\n", add_special_tokens=False)] * 4
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=-1, max_new_tokens=60, batch_size=4, seeds=[1, 2, 3, 4],
              sampler="generate")
    free, blocked = (sampling.sample_tokens(model, prompts, **kw, **opt)
                     for opt in ({}, {"no_repeat_ngram_size": 1}))
    assert any(len(set(r)) < len(r) for r in free) and all(len(set(r)) == len(r) for r in blocked)
