"""The README and docs/: the "use it in your code" snippet runs as written, the README is short and its links
and the docs' resolve, the published reproduction tables are what their seed files give."""
import json
import re

import pytest
import torch

import moekd
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


def test_readme_quick_start_runs_and_ends_with_the_three_numbers(tmp_path, capsys, monkeypatch):
    """The README's quick start, as written (its environment, its variable, its three moekd runs), at a tenth
    of its size: every flag parses, the runs chain through their folders, and the SAR run's last line sets
    the teacher's, the student's SFT and its own dev ROUGE-L side by side, as the runs' metrics.json say."""
    import shlex
    text = README.read_text()
    block = text[text.index("## Quick start (CPU)"):]
    command = re.search(r"```bash\n(.*?)\n```", block, re.S).group(1)
    steps = [s.strip() for s in command.split("&&")]
    assert steps[0].startswith("pip install") and steps[1] == "export OMP_NUM_THREADS=1"
    name, value = steps[2].split("=", 1)
    flags = shlex.split(shlex.split(value)[0])
    runs = [shlex.split(s.replace(f"${name}", " ".join(flags)))[2:] for s in steps[3:]]
    outs = [r[r.index("--out") + 1] for r in runs]
    assert outs == ["runs/tiny-teacher", "runs/tiny-student", "runs/tiny-sar"]
    assert runs[-1][runs[-1].index("--method") + 1] == "sar"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny_moe").symlink_to(ROOT / "tiny_moe")  # the commands' relative model paths
    small = ["--synthetic-train", "200", "--dev-num", "16", "--synthetic-dev", "16", "--log-every", "5"]
    for argv in runs:
        moekd.main(argv + small + (["--epochs", "2"] if "--method" not in argv else []))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    scores = [json.loads((tmp_path / "runs" / r / "metrics.json").read_text()) for r in
              ("tiny-teacher", "tiny-student", "tiny-sar")]
    want = (f"dev ROUGE-L: teacher {scores[0]['best_rougeL']:.2f} | "
            f"student before {scores[1]['best_rougeL']:.2f} | "
            f"student after sar {scores[2]['dev_rougeL']:.2f} "
            f"({scores[2]['dev_rougeL'] - scores[1]['best_rougeL']:+.2f})")
    assert last == want
    assert (tmp_path / "runs" / "tiny-sar" / "training.png").is_file()
