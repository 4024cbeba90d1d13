"""What the test files share: the repository's paths, the tiny models' fixtures, the one builder of tiny
random transformers models (tiny_model), the naive references and run arguments that several files use.

At the repository root, so that pytest (`pytest` or `python -m pytest`, rootdir import mode) puts the root on
sys.path: the test files under tests/ import moekd, checkpoints, ... and `from conftest import ...`.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import checkpoints  # noqa: E402
import eval as moe_eval  # noqa: E402
import moekd  # noqa: E402
import sampling  # noqa: E402

ROOT = Path(__file__).resolve().parent
TINY = ROOT / "tiny_moe"
STUDENT = TINY / "student"
SP = TINY / "sp"  # the same tiny models for the LLaMA-like tokenizer's vocabulary
SHARED = ROOT.parent / "shared" / "data"  # the full evaluation sets, where fetch_data.py put them
EVAL_SETS = ROOT / "fixtures" / "eval_sets"  # their first 8 rows, committed: what the tests read
TINY_CFG = json.loads((TINY / "config.json").read_text())


def assert_close(a, b, **kw):
    torch.testing.assert_close(a, b, **{"atol": 1e-5, "rtol": 1e-4, **kw})


@pytest.fixture
def seeded():
    """torch's global generator seeded 0 before each test of the files that use it (`pytestmark`): the tests
    that came from test_moekd.py, where this fixture was autouse."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    return checkpoints.load_tokenizer(str(TINY))


@pytest.fixture(scope="session")
def sp_tokenizer():
    """The LLaMA-like tokenizer (SentencePiece-style "▁" prefix, byte fallback, no pad token)."""
    return checkpoints.load_tokenizer(str(SP))


@pytest.fixture(params=["byte-level", "sentencepiece-like"])
def any_tokenizer(request, tokenizer, sp_tokenizer):
    return tokenizer if request.param == "byte-level" else sp_tokenizer


@pytest.fixture
def teacher():
    return checkpoints.load_model(str(TINY))


@pytest.fixture
def student():
    return checkpoints.load_model(str(STUDENT))


def copy_tokenizer(path: Path, tokenizer_dir: Path = TINY) -> Path:
    """`tokenizer_dir`'s tokenizer files copied into the model folder `path`."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return path


def write_model_dir(path: Path, config: dict, tokenizer_dir: Path = TINY) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return copy_tokenizer(path, tokenizer_dir)


# ----------------------------------------------------------------------------
# Tiny random transformers models: one builder, the presets several files use

def tiny_model(model_type: str, *, seed: int | None = 0, dtype: torch.dtype | None = None,
               train: bool = False, random_routers: bool = False, **fields) -> torch.nn.Module:
    """A tiny random transformers causal LM: the config class of `model_type` with `fields` (no downloads),
    its weights drawn by from_config after torch.manual_seed(seed) (None: the generator as it is), in `dtype`
    (None: fp32; bf16: from_config keeps the family's fp32 modules), in eval mode (`train`: train mode, as
    from_config returns it). `random_routers`: router weights normal(0, 0.3) and selection biases
    randn * 0.1 (some families initialise routers to 0, where every expert ties), so that biased and unbiased
    selection differ."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    config = CONFIG_MAPPING[model_type](**fields)
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **({} if dtype is None else {"dtype": dtype}))
    if random_routers:
        with torch.no_grad():
            for p in moekd.router_parameters(model):
                p.normal_(0.0, 0.3)
            for name, buf in model.named_buffers():
                if "e_score_correction_bias" in name:
                    buf.copy_(torch.randn(buf.shape) * 0.1)
    return model.train(train)


_HF_MOE_COMMON = dict(vocab_size=2039, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                      num_key_value_heads=1, num_experts_per_tok=2, pad_token_id=2, bos_token_id=1,
                      eos_token_id=2)
HF_MOES = {  # family -> tiny_model's arguments: MoEs of the tiny tokenizer's vocabulary, 5 experts, top-2
    "mixtral": dict(model_type="mixtral", num_local_experts=5, intermediate_size=37, **_HF_MOE_COMMON),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=5, moe_intermediate_size=19, intermediate_size=37,
                      norm_topk_prob=False, **_HF_MOE_COMMON),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=5, moe_intermediate_size=19, intermediate_size=37,
                      shared_expert_intermediate_size=23, **_HF_MOE_COMMON),
    "olmoe": dict(model_type="olmoe", num_experts=5, intermediate_size=19, **_HF_MOE_COMMON),
}


def hf_moe(tmp_path, family: str, seed: int = 0) -> Path:
    """A tiny transformers-5 MoE checkpoint with the tiny tokenizer."""
    path = tmp_path / family
    if not path.exists():
        tiny_model(seed=seed, train=True, **HF_MOES[family]).save_pretrained(path)
        copy_tokenizer(path)
    return path


_STUDENT_COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
STUDENT_LMS = {  # family -> tiny_model's arguments: student families for the sampler (Mistral with a sliding
    # window shorter than the samples, so its static cache wraps around)
    "Llama": dict(model_type="llama", **_STUDENT_COMMON),
    "Qwen2": dict(model_type="qwen2", use_sliding_window=False, **_STUDENT_COMMON),
    "Qwen3": dict(model_type="qwen3", head_dim=8, **_STUDENT_COMMON),
    "Mistral": dict(model_type="mistral", sliding_window=8, **_STUDENT_COMMON),
    "Mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, **_STUDENT_COMMON),
    "MiniMax": dict(model_type="minimax", num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["linear_attention", "full_attention"], **_STUDENT_COMMON),
}


def ids_batch():
    return torch.tensor([[1, 5, 9, 13, 400, 7], [1, 44, 2000, 3, 3, 81]])


# ----------------------------------------------------------------------------
# Naive references several files check against

def naive_cv2(v):
    v = [float(a) for a in v]
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / (len(v) - 1)
    return var / (mean ** 2 + 1e-10)


# ----------------------------------------------------------------------------
# Runs, evaluations and samples several files make

def run_args(out, method, *extra):
    return ["--tiny", "--method", method, "--out", str(out), "--synthetic-train", "16", "--batch-size", "4",
            "--max-steps", "2", "--no-dev-eval", "--log-every", "1", *extra]


def eval_args(tmp_path, *extra, name="ev"):
    return ["--model", str(TINY), "--data-dir", str(EVAL_SETS), "--out", str(tmp_path / name),
            "--max-examples", "3", "--max-new-tokens", "12", "--seeds", "10",
            "--sets", ",".join(moe_eval.SETS), *extra]


def without_timing(log: str) -> list[str]:
    return [re.sub(r" \| [\d.]+ tok/s \| \d+ ms \| eta \w+$", "", line) for line in log.splitlines()]


def saved_with_generation_config(tmp_path, tokenizer, **settings) -> Path:
    """The tiny student saved as a real checkpoint whose generation_config.json carries `settings`."""
    model = checkpoints.load_model(str(STUDENT))
    for key, value in settings.items():
        setattr(model.generation_config, key, value)
    checkpoints.save_model(model, tokenizer, tmp_path / "ckpt")
    loaded = checkpoints.load_model(str(tmp_path / "ckpt"))
    assert all(getattr(loaded.generation_config, k) == v for k, v in settings.items())  # the premise
    return tmp_path / "ckpt"


def sharpened(model, scale: float = 30.0):
    """The model with its output head scaled: at the random init's ~0.1 logit spread the Gumbel noise decides
    nearly every token whatever the context, so a wrong attention mask would go unseen; at ~3 it does not."""
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def ragged_prompt_rows(model, compile: bool) -> tuple[list, list, list]:
    """Left-padded prompts of lengths 7, 2 and 4 sampled together and each alone, with every logits tensor
    the model returned while sampling them together."""
    prompts, seeds = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43]], [3, 1 << 40, 77]
    logits = []
    hook = model.register_forward_hook(lambda module, args, kwargs, out: logits.append(out.logits.detach()),
                                       with_kwargs=True) if not compile else None
    kw = dict(pad_id=0, eos_id=-1, max_new_tokens=12, compile=compile)
    together = sampling.sample_rows(model, prompts, seeds=seeds, **kw)
    if hook is not None:
        hook.remove()
    alone = [sampling.sample_rows(model, [p], seeds=[s], **kw)[0] for p, s in zip(prompts, seeds)]
    return together, alone, logits


# ----------------------------------------------------------------------------
# No silent skips: with MOEKD_ONLY_CUDA_SKIPS=1 (CI sets it) a skipped test fails the run unless it is a CUDA
# test on a machine without CUDA, the one kind of test that cannot run on CPU.

_SKIPPED: list[tuple[str, bool]] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):  # strict xfails are expected failures
        _SKIPPED.append((report.nodeid, "cuda" in report.keywords))


def pytest_collectreport(report):
    if report.skipped:  # a whole file skipped at import (pytest.importorskip, allow_module_level)
        _SKIPPED.append((report.nodeid, False))


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("MOEKD_ONLY_CUDA_SKIPS") != "1":
        return
    allowed = not torch.cuda.is_available()
    silent = [nodeid for nodeid, cuda in _SKIPPED if not (cuda and allowed)]
    if silent:
        print(f"\nMOEKD_ONLY_CUDA_SKIPS: {len(silent)} test(s) skipped that must run here: "
              + ", ".join(silent[:10]) + (" ..." if len(silent) > 10 else ""))
        session.exitstatus = 1
