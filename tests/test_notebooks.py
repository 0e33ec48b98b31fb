"""Every experiment notebook runs end-to-end through papermill with smoke-sized parameters, from the repo root,
as a user would type it, and writes its artifacts under runs/smoke/reports/<artifact>/."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ns_vit.report import default_reports

ROOT = Path(__file__).resolve().parents[1]
# notebook -> the report folders it writes at its default parameters (the registry, ns_vit.report.RUNS); at smoke size
# it writes them under runs/smoke/reports/
EXPERIMENTS = {f'{nb}.ipynb': folders for nb, folders in default_reports().items()}


def has_parameters_cell(nb: Path) -> bool:
    cells = json.loads(nb.read_text())['cells']
    return any('parameters' in c.get('metadata', {}).get('tags', []) for c in cells)


def test_every_parameterised_notebook_is_listed():
    found = {p.name for p in (ROOT / 'nbs').glob('*.ipynb') if has_parameters_cell(p)}
    assert found == set(EXPERIMENTS), f'notebooks with a parameters cell and those of the registry (ns_vit.report.RUNS) differ: {found ^ set(EXPERIMENTS)}'


@pytest.mark.parametrize('name', sorted(EXPERIMENTS))
def test_notebook_smoke(name, tmp_path):
    out = tmp_path / name
    r = subprocess.run([sys.executable, '-m', 'papermill', f'nbs/{name}', str(out), '--cwd', str(ROOT), '-p', 'smoke', 'True'],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    for a in EXPERIMENTS[name]:
        d = ROOT / 'runs' / 'smoke' / 'reports' / a
        meta = json.loads((d / 'meta.json').read_text())
        assert meta['params'].get('smoke') is True
        assert any(d.glob('*.png')) or any(d.glob('*.md')), f'{d} holds no figure or table'


def test_every_experiment_notebook_guards_its_committed_report():
    """Issue 28: every experiment notebook has `report` and `commit_report` parameters and hands its parameters to
    `report_dir`, so a run at other parameters writes to runs/reports/<artifact>-<digest> (and says so) unless it names
    a folder with -p report or passes -p commit_report True, as the make targets do."""
    import json, re
    from ns_vit.report import RUNS
    for name in sorted({r.notebook for r in RUNS}):
        nb = json.loads((ROOT / 'nbs' / f'{name}.ipynb').read_text())
        params = next(''.join(c['source']) for c in nb['cells'] if 'parameters' in c.get('metadata', {}).get('tags', []))
        assert re.search(r'^report: str = ', params, re.M) and re.search(r'^commit_report: bool = False', params, re.M), name
        text = ''.join(''.join(c['source']) for c in nb['cells'])
        n = text.count('report_dir(')
        assert n >= 1, f'{name} never calls report_dir'
        assert text.count('params=params, commit=commit_report or bool(report)') == n, \
            f'{name}: every report_dir call must take params=params, commit=commit_report or bool(report)'


def test_papermill_reads_every_parameter():
    """Every line of a parameters cell is one parameter that papermill itself can read (a second '=' in a comment makes it
    skip the line: "Unable to parse line", then "Passed unknown parameter" when a user passes it with -p)."""
    import papermill
    for name in sorted(EXPERIMENTS):
        nb = json.loads((ROOT / 'nbs' / name).read_text())
        src = next(''.join(c['source']) for c in nb['cells'] if 'parameters' in c.get('metadata', {}).get('tags', []))
        names = [line.split(':')[0].split('=')[0].strip() for line in src.splitlines() if line.strip() and not line.startswith((' ', '#'))]
        read = list(papermill.inspect_notebook(str(ROOT / 'nbs' / name)))
        assert read == names, f'{name}: papermill reads {sorted(set(names) - set(read))} as no parameter'
