"""The on-policy sampler's noise against references that share no code with it: the hash-to-uniform map at its
extremes (written out in float64), a near-certain token over 2^27 draws, the empirical law of millions of draws
against softmax (5 standard errors) and a two-sample test against torch.multinomial."""
import math

import pytest
import torch

import sampling

TOP = 2 ** 32


def test_uniform_from_hash_is_strictly_inside_the_unit_interval_at_every_extreme():
    """The 2^16 smallest and largest 32-bit hashes (and a spread between): u in (0, 1), equal to the float64
    formula (top 23 bits + 0.5) / 2^23, and the Gumbel noise -log(-log u) finite."""
    h = torch.cat([torch.arange(2 ** 16), torch.arange(TOP - 2 ** 16, TOP), torch.randint(0, TOP, (2 ** 16,))])
    u = sampling.uniform_from_hash(h.clone())
    assert u.dtype == torch.float32 and bool((u > 0).all()) and bool((u < 1).all())
    exact = (torch.div(h, 2 ** 9, rounding_mode="floor").double() + 0.5) / 2 ** 23
    assert torch.equal(u.double(), exact)
    noise = -torch.log(-torch.log(u))
    assert bool(torch.isfinite(noise).all())
    assert float(noise.max()) < 17 and float(noise.min()) > -3


@pytest.mark.slow
def test_a_near_certain_token_is_drawn_in_every_one_of_2_to_the_27_draws():
    """logits [0, -60, ..., -60] over V 65536, 2048 rows (2^27 (row, token) noise values): the other tokens have
    probability < 1e-21 together, so the first is drawn every time (the 24-bit map drew one of them in 6 rows)."""
    V, rows = 65536, 2048
    logits = torch.full((V,), -60.0)
    logits[0] = 0.0
    others = 0
    for start in range(0, rows, 256):
        keys = sampling.row_keys(list(range(start, start + 256)), "cpu")
        others += int((sampling.next_token(logits.expand(256, V), keys, 0) != 0).sum())
    assert others == 0


def draw_counts(logits: torch.Tensor, n: int, *, step: int = 0, first_seed: int = 0) -> torch.Tensor:
    """How often next_token draws each token over n rows seeded first_seed.. (one draw each)."""
    counts = torch.zeros(len(logits), dtype=torch.float64)
    for start in range(first_seed, first_seed + n, 2 ** 19):
        rows = min(2 ** 19, first_seed + n - start)
        keys = sampling.row_keys(list(range(start, start + rows)), "cpu")
        tokens = sampling.next_token(logits.expand(rows, len(logits)), keys, step)
        counts += torch.bincount(tokens, minlength=len(logits)).double()
    return counts


def test_four_million_draws_follow_the_softmax_within_five_standard_errors():
    """Probabilities from 0.35 down to ~1e-5: every token's frequency within 5 standard errors of softmax (in
    float64), so a map that over- or under-draws rare tokens by a few percent of their mass shows."""
    logits = torch.tensor([3.0, 2.5, 1.0, 0.0, -1.0, -3.0, -5.0, -8.0])
    n = 4 * 2 ** 20
    freq = draw_counts(logits, n, step=3) / n
    p = torch.softmax(logits.double(), -1)
    se = (p * (1 - p) / n).sqrt()
    assert bool(((freq - p).abs() < 5 * se).all()), ((freq - p) / se)


def test_the_sampler_and_torch_multinomial_draw_the_same_law():
    """Two-sample chi-square (homogeneity) of 400k draws each, 9 degrees of freedom, p = 1e-4 threshold."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0, 2.0, 0.2, -4.0])
    n = 400_000
    ours = draw_counts(logits, n, step=11, first_seed=10 ** 9)
    theirs = torch.bincount(torch.multinomial(torch.softmax(logits, -1), n, replacement=True,
                                              generator=torch.Generator().manual_seed(0)), minlength=10).double()
    pooled = (ours + theirs) / (2 * n)
    chi2 = (((ours - n * pooled) ** 2 + (theirs - n * pooled) ** 2) / (n * pooled)).sum()
    assert float(chi2) < 33.7, float(chi2)  # chi-square 9 dof: P(> 33.7) = 1e-4
    assert math.isfinite(float(chi2))
