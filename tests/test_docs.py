"""The README and docs/: the "use it in your code" snippet runs as written, the README is short and its links
and the docs' resolve, the published reproduction tables are what their seed files give."""
import re

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("seeded")  # torch seeded 0 before each test


README = ROOT / "README.md"


SNIPPET_MARKER = "<!-- snippet: use-in-your-code -->"


def readme_snippet() -> str:
    """The fenced python block right after the marker in README.md."""
    text = README.read_text()
    assert text.count(SNIPPET_MARKER) == 1, f"README.md needs exactly one {SNIPPET_MARKER}"
    match = re.match(r"\s*```python\n(.*?)\n```", text.split(SNIPPET_MARKER, 1)[1], re.S)
    assert match, f"README.md: no ```python block right after {SNIPPET_MARKER}"
    return match.group(1)


def test_readme_snippet_runs():
    code = readme_snippet()
    assert len(code.splitlines()) <= 25
    assert "from moekd import" in code and "moe_routing" in code and "reverse_kl" in code
    ns = {"__name__": "readme_snippet"}
    exec(compile(code, f"{README}:{SNIPPET_MARKER}", "exec"), ns)
    loss, student = ns["loss"], ns["student"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert "head_losses" in code and torch.allclose(ns["same"], loss, rtol=1e-5)  # the two KLs agree
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert "forward" not in ns["teacher"].model.layers[0].mlp.gate.__dict__  # native routing restored on exit


def test_readme_is_short_and_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    for link in re.findall(r"\]\(((?!https?:|#)[^)#\s]+)", text):
        assert (ROOT / link).exists(), f"README.md links to {link}, which does not exist"
    docs = ROOT / "docs"
    for page in docs.glob("*.md"):
        for link in re.findall(r"\]\(((?!https?:|#)[^)#\s]+)", page.read_text()):
            assert (docs / link).exists(), f"docs/{page.name} links to {link}, which does not exist"
    assert "shared/docs" not in text and not any("shared/docs" in p.read_text() for p in docs.glob("*.md"))


def test_published_reproduction_is_what_its_seed_files_give():
    """docs/repro/<preset>/results.md re-assembles from the committed seed files, and the README and
    docs/repro.md carry the summary of exactly those results."""
    import repro
    root = repro.HERE / "docs" / "repro"
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        result = repro.assemble_stats(repro.load_seed_files(folder))
        assert repro.assembled_markdown(result) == (folder / "results.md").read_text(), folder.name
    table = repro.summary_markdown(root)
    assert table in (repro.HERE / "README.md").read_text() and table in (root.parent / "repro.md").read_text()
