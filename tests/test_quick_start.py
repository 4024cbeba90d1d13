"""The quick start's model pair, tiny_moe/quick/ (config-only folders, initialised from their
moekd_init_seed).

    python -m pytest -q tests/test_quick_start.py
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import moekd  # noqa: E402

QUICK = ROOT / "tiny_moe" / "quick"


@pytest.mark.parametrize("name", ["teacher", "student"])
@pytest.mark.parametrize("file", ["tokenizer.json", "tokenizer_config.json"])
def test_the_pair_shares_tiny_moes_tokenizer(name, file):
    """Copies of tiny_moe's (distillation needs one tokenizer): rerunning tiny_moe/make_tokenizer.py must be
    followed by copying its files here too."""
    assert (QUICK / name / file).read_bytes() == (ROOT / "tiny_moe" / file).read_bytes()


def test_the_teacher_is_an_moe_five_times_the_dense_students_size():
    teacher, student = moekd.load_model(str(QUICK / "teacher")), moekd.load_model(str(QUICK / "student"))
    assert moekd.is_moe(teacher) and not moekd.is_moe(student)
    assert (moekd.num_experts(teacher), moekd.native_top_k(teacher)) == (8, 2)
    sizes = [sum(p.numel() for p in m.parameters()) for m in (teacher, student)]
    assert sizes == [394_560, 73_520]
