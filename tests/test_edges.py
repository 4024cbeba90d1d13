"""Edge values against naive float64 formulas: logits with ties, -inf, +inf, magnitudes ~1e4 and bf16 inputs
(hypothesis draws the values themselves, not seeds for randn) through the KLs and the sampler; a teacher -inf
where the student has mass stops the run in one line."""
import math
import re

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import errors
import moekd
import sampling

VALUES = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 1e4, -1e4, 9999.5, float("-inf"), float("inf")]),
                   st.floats(-30.0, 30.0, width=32))


def logit_rows(V: int, rows: int):
    return st.lists(st.lists(VALUES, min_size=V, max_size=V), min_size=rows, max_size=rows)


def naive_kl(a: list[float], b: list[float]) -> float:
    """KL(softmax(a) || softmax(b)) in float64, term by term; a term whose p underflows to 0 (in float64) is
    0, p log(p/0) = +inf; NaN if a row holds +inf or only -inf (no distribution)."""
    a64, b64 = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if (a64 == math.inf).any() or (b64 == math.inf).any() or (a64 == -math.inf).all() or \
            (b64 == -math.inf).all():
        return math.nan
    la, lb = a64.log_softmax(-1), b64.log_softmax(-1)
    return sum(math.exp(x) * (x - y) for x, y in zip(la.tolist(), lb.tolist()) if math.exp(x) > 0)


@given(st.integers(2, 6).flatmap(lambda V: st.tuples(logit_rows(V, 3), logit_rows(V, 3), st.booleans())))
@settings(max_examples=200, deadline=None)
def test_kls_on_ties_infinities_and_large_magnitudes_match_the_naive_formula(case):
    """reverse_kl and forward_kl on one token per row (fp32, or the same values rounded to bf16): equal to the
    float64 formula where it is finite (rel 1e-4 of the larger of it and the logits' spread), +inf where it is
    +inf, and never a finite number where the formula has no value."""
    s_rows, t_rows, bf16 = case
    dtype = torch.bfloat16 if bf16 else torch.float32
    s = torch.tensor(s_rows, dtype=torch.float32).to(dtype)[:, None, :]                   # [rows, 1, V]
    t = torch.tensor(t_rows, dtype=torch.float32).to(dtype)[:, None, :]
    mask = torch.ones(len(s_rows), 1, dtype=torch.bool)
    for fn, (a, b) in ((moekd.reverse_kl, (s, t)), (moekd.forward_kl, (t, s))):
        per_row = [float(fn(s[i:i + 1], t[i:i + 1], mask[i:i + 1])) for i in range(len(s_rows))]
        for i, got in enumerate(per_row):
            want = naive_kl(a[i, 0].float().tolist(), b[i, 0].float().tolist())
            if math.isnan(want):
                assert not math.isfinite(got), (fn.__name__, i, got)
            elif want == math.inf:
                assert got == math.inf, (fn.__name__, i, got)
            else:
                finite = [abs(v) for v in a[i, 0].float().tolist() + b[i, 0].float().tolist()
                          if math.isfinite(v)]
                assert abs(got - want) <= 1e-4 * max(1.0, want) + 2e-6 * max(finite, default=1.0), \
                    (fn.__name__, got, want)


@given(st.integers(2, 8).flatmap(lambda V: logit_rows(V, 1)), st.booleans())
@settings(max_examples=100, deadline=None)
def test_the_sampler_never_draws_a_token_of_probability_zero(rows, bf16):
    """2,000 draws of next_token over drawn logits (ties, -inf, 1e4; +inf rows skipped: no distribution):
    never a -inf token, never a token more than 20 nats below the best; ties and 1e4-scale logits are
    drawn in proportion to their softmax (frequency within 6 standard errors)."""
    logits = torch.tensor(rows, dtype=torch.float32)
    if bf16:
        logits = logits.to(torch.bfloat16)
    if (logits == math.inf).any() or (logits == -math.inf).all():
        return
    n = 2000
    tokens = sampling.next_token(logits.expand(n, -1), sampling.row_keys(list(range(n)), "cpu"), 0)
    z = logits[0].double()
    assert not bool((z[tokens] == -math.inf).any())
    assert bool((z[tokens] >= z.max() - 20).all())
    p = z.softmax(-1)
    freq = torch.bincount(tokens, minlength=len(z)).double() / n
    assert bool(((freq - p).abs() <= 6 * (p * (1 - p) / n).sqrt() + 1e-9).all()), (freq, p)


def test_a_teacher_minus_inf_where_the_student_has_mass_stops_the_run_in_one_line(tmp_path, monkeypatch):
    """The tiny teacher's head gets a bias of -inf on one token: every student distribution has mass there, so
    the reverse KL is +inf; the run stops at step 1 with one line naming the loss, not the gradient norm."""
    prepared = moekd._prepared_teacher

    def minus_inf_head(*args, **kwargs):
        teacher = prepared(*args, **kwargs)
        head = teacher.get_output_embeddings()
        biased = nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
        biased.weight = head.weight
        with torch.no_grad():
            biased.bias.zero_()[7] = -math.inf
        teacher.set_output_embeddings(biased.requires_grad_(False))
        return teacher

    monkeypatch.setattr(moekd, "_prepared_teacher", minus_inf_head)
    out = tmp_path / "run"
    with pytest.raises(errors.MoekdError) as e:
        moekd.main(["--tiny", "--method", "gkd", "--out", str(out), "--synthetic-train", "16", "--batch-size",
                    "4", "--max-steps", "2", "--no-dev-eval"])
    message = str(e.value)
    assert "\n" not in message and re.match(r"^step 1: the loss is inf, nothing of this step is kept \(a "
                                            r"token the teacher gives probability 0", message), message
