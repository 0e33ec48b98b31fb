"""Issue 28: one registry, ns_vit.report.RUNS, says which notebook writes which report, which make target runs it and
with which parameters. The Makefile, the site and reports/README.md (and the README's table) agree with it, and every
report folder and executed copy in reports/ has its entry."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ns_vit.report import PAPER_ARTIFACTS, RUNS, artifacts_table, executed_by, make_list, render_index, writer

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / 'reports'
FOLDERS = sorted(p.parent.relative_to(REPORTS).as_posix() for p in REPORTS.glob('**/meta.json'))
EXECUTED = sorted(p.name for p in (REPORTS / 'notebooks').glob('*.ipynb'))


def makefile() -> tuple[dict[str, str], dict[str, str]]:
    "The Makefile's recipes (target -> its lines, continuation lines joined) and variables (name -> value as written)."
    recipes, variables, target = {}, {}, None
    for line in (ROOT / 'Makefile').read_text().replace('\\\n', ' ').splitlines():
        if line.startswith('\t'):
            if target: recipes[target] += line.strip() + '\n'
            continue
        target = None
        if m := re.match(r'([A-Za-z0-9_-]+):(?!=)', line): target, recipes[m.group(1)] = m.group(1), ''
        elif m := re.match(r'([A-Z_]+)\s*[:?]?=\s*(.*)$', line): variables[m.group(1)] = m.group(2)
    return recipes, variables


# -p name value, the value quoted, a make expression such as $(or $(STUDY_THREADS),2), or a word
_PARAM = re.compile(r"""-p\s+(\S+)\s+('[^']*'|"[^"]*"|\$\((?:[^()]|\([^()]*\))*\)|[^\s'";)]+)""")


def papermill_commands(recipe: str, variables: dict[str, str]) -> list[tuple[str, str, dict]]:
    "(notebook, executed copy, {parameter: value as written}) of each papermill command in a recipe, in order."
    recipe = recipe.replace('$(PAPERMILL)', variables.get('PAPERMILL', ''))
    out = []
    for part in re.split(r'\bpapermill\b', recipe)[1:]:
        m = re.search(r'nbs/(\S+)\.ipynb\s+(\S+)', part)
        out.append((m.group(1), m.group(2), {k: v.strip('\'"') for k, v in _PARAM.findall(part)}))
    return out


def test_papermill_commands_parse():
    cmd = """$(BIN)/papermill nbs/11_x.ipynb runs/r.ipynb --cwd . -p cells '$(CELLS)' -p threads $(or $(T),2) -p a b \\
      $$([ -f x ] && echo "-p also y/z")\nPATH=p $(BIN)/papermill --no-progress-bar nbs/02_p.ipynb o.ipynb -p lr 1e-3 || exit 1"""
    assert papermill_commands(cmd, {}) == [('11_x', 'runs/r.ipynb', {'cells': '$(CELLS)', 'threads': '$(or $(T),2)', 'a': 'b', 'also': 'y/z'}),
                                           ('02_p', 'o.ipynb', {'lr': '1e-3'})]


def test_makefile_runs_what_the_registry_says():
    recipes, variables = makefile()
    targets = list(dict.fromkeys(r.target for r in RUNS if r.target))
    for t in targets:
        if t == 'reports': continue
        want = [(r.notebook, r.executed, r.papermill_params) for r in RUNS if r.target == t]
        assert papermill_commands(recipes[t], variables) == want, f'make {t} and ns_vit.report.RUNS differ'
    (nb, executed, params), = papermill_commands(recipes['worker'], variables)  # make reports: its workers run each notebook alike
    assert nb == '$$nb' and '$(REPORT_NBS)' in recipes['reports']
    assert [(executed.replace('$$nb', r.notebook), params) for r in RUNS if r.target == 'reports'] == \
           [(r.executed, r.papermill_params) for r in RUNS if r.target == 'reports']
    runs_notebooks = {t for t, recipe in recipes.items() if papermill_commands(recipe, variables)}
    assert runs_notebooks == set(targets) - {'reports'} | {'worker'}, 'a make target runs a notebook that the registry does not list'


@pytest.mark.skipif(shutil.which('make') is None, reason='make is not installed')
def test_make_reports_takes_its_notebooks_from_the_registry():
    out = subprocess.run(['make', '-s', '--no-print-directory', '--eval', 'print-%: ; @echo $($*)', 'print-REPORT_NBS',
                          f'BIN={Path(sys.executable).parent}'], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == make_list('reports').split() != []


def test_every_report_folder_and_executed_copy_has_its_run():
    assert [f for f in FOLDERS if writer(f) is None] == [], 'report folders without a run in ns_vit.report.RUNS'
    assert [n for n in EXECUTED if executed_by(f'reports/notebooks/{n}') is None] == [], 'executed copies no make target writes'
    assert [k for k in PAPER_ARTIFACTS if writer(k) is None] == []


def test_reports_readme_is_generated_from_the_registry():
    assert (REPORTS / 'README.md').read_text() == render_index(), 'reports/README.md is out of date: run make index'
    for f in FOLDERS:  # each section names the folder's notebook and target, and the commit of its own meta.json
        commit = json.loads((REPORTS / f / 'meta.json').read_text())['git_commit']
        assert f'written by `nbs/{writer(f).notebook}.ipynb`, run {writer(f).how}\n- made ' in render_index()
        section = re.split(rf'\n## {re.escape(f)}(?: — [^\n]*)?\n', render_index())[1].split('\n## ')[0]  # its own heading, not a subfolder's
        assert f'at commit `{commit}` (its meta.json)' in section


def test_readme_lists_the_artifacts_with_their_notebook_and_target():
    assert artifacts_table('reports/') in (ROOT / 'README.md').read_text(), 'README.md is out of date: run make readme'


def load_build():
    spec = importlib.util.spec_from_file_location('build', ROOT / 'docs' / 'build.py')
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


@pytest.mark.parametrize('name', EXECUTED)
def test_site_states_who_regenerates_an_executed_copy(name, tmp_path):
    build, run = load_build(), executed_by(f'reports/notebooks/{name}')
    page, executed = build.stage_notebook(name[:-len('.ipynb')], tmp_path, REPORTS / 'notebooks')
    note = next(''.join(c['source']) for c in json.loads((tmp_path / page).read_text())['cells'] if c.get('id') == 'ns-vit-site-note')
    assert executed and f'<code>make {run.target}</code> regenerates it' in note, note


def test_site_names_the_notebook_and_target_of_every_report(tmp_path):
    build = load_build()
    for f in FOLDERS:
        text = (tmp_path / build.stage_report(REPORTS / f, tmp_path, PAPER_ARTIFACTS)).read_text()
        run = writer(f)
        assert f'written by [{run.notebook}](' in text and f'Regenerated {run.how}.' in text, f
    home = build.home_page([], {k: f'reports/{k}/index.md' for k in FOLDERS}, PAPER_ARTIFACTS, set())
    for k in PAPER_ARTIFACTS:
        if k in FOLDERS: assert f'| [{writer(k).notebook}](notebooks/{writer(k).notebook}.ipynb) | {writer(k).made_by} |' in home, k
