"""The site's build plan, the text pairs' check and the browser check itself (on a tiny site with known faults)."""
import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(path: str):
    "A module from a file of the repository (docs/ and tools/ are scripts, not packages)."
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_notebook_has_one_place_in_the_site():
    build = load('docs/build.py')
    placed = [nb for _, nbs in build.SECTIONS for nb in nbs]
    assert len(placed) == len(set(placed)), 'a notebook is in two sections of docs/build.py SECTIONS'
    assert set(placed) == {p.stem for p in (ROOT / 'nbs').glob('*.ipynb')}, 'docs/build.py SECTIONS and nbs/ differ'
    from ns_vit.report import RUNS
    assert {r.notebook for r in RUNS} <= set(placed)


def test_pairs_check_finds_stale_missing_and_orphaned(tmp_path, monkeypatch):
    pairs = load('tools/pairs.py')
    nbs, text = tmp_path / 'nbs', tmp_path / 'text'
    nbs.mkdir()
    shutil.copy(ROOT / 'nbs' / '00a_report.ipynb', nbs / 'a.ipynb'); shutil.copy(ROOT / 'nbs' / '00b_stats.ipynb', nbs / 'b.ipynb')
    monkeypatch.setattr(pairs, 'ROOT', tmp_path); monkeypatch.setattr(pairs, 'NBS', nbs); monkeypatch.setattr(pairs, 'TEXT', text)
    want = pairs.expected()
    text.mkdir()
    for p, t in want.items(): p.write_text(t)
    assert pairs.stale(pairs.expected()) == []
    assert '# %% [markdown]\n# # Reports' in (text / 'a.py').read_text() and 'jupytext_version' not in (text / 'a.py').read_text()
    nb = json.loads((nbs / 'a.ipynb').read_text()); nb['cells'][0]['source'] = ['# Changed']
    (nbs / 'a.ipynb').write_text(json.dumps(nb))  # an edited notebook, its pair not regenerated
    (text / 'b.py').unlink(); (text / 'c.py').write_text('')
    assert sorted(pairs.stale(pairs.expected())) == ['text/a.py: out of date with nbs/a.ipynb', 'text/b.py: missing', 'text/c.py: no notebook nbs/c.ipynb']


def test_clicks():
    check = load('tools/check_site.py')
    graph = {'index.html': {'a.html'}, 'a.html': {'b.html'}, 'b.html': {'c.html'}}
    assert [check.clicks('index.html', p, graph) for p in ('index.html', 'a.html', 'b.html', 'c.html')] == [0, 1, 2, 3]
    assert check.clicks('index.html', 'z.html', graph) == float('inf')


def test_home_page_leads_with_the_study_headline():
    "The site's home page states the finding (reports/reproduction/headline.md) before the artifacts."
    build = load('docs/build.py')
    headline = (ROOT / 'reports' / 'reproduction' / 'headline.md').read_text().strip()
    page = build.home_page(build.SECTIONS, {'reproduction': 'reports/reproduction/index.md'}, {}, set())
    assert headline in page and page.index('## What we found') < page.index("## The paper's artifacts")
