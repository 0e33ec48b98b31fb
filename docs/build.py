"""Build the ns_vit site (`make docs`): the notebooks in the paper's order, with their results, as static HTML in _site/.

Library notebooks come from nbs/ (code and tests, no outputs); experiment notebooks come from their executed copies in
reports/notebooks/ (kept there by `make reports`, `make study` and `make bench`) when one exists, else from nbs/ with a
note that says so. Every artifact folder under reports/ becomes a page with its figures, tables and how it was made.
Which notebook writes which report and which make target runs it come from the registry, ns_vit.report.RUNS. The pages are staged in
_docs_src/docs/ and built by mkdocs (material theme, mkdocs-jupyter) with docs/mkdocs.yml; nothing is fetched from the
network (no web fonts, MathJax from a local copy).

    python docs/build.py [--site _site]
"""
from __future__ import annotations
import argparse, importlib.util, json, re, shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The paper's order: (section, notebooks). Each notebook page is followed by the pages of the artifacts it writes.
SECTIONS = [
    ('§3 Exact nullspace', ['03_nullspace']),
    ('§3.2–3.3 Approximate nullspace', ['04_noise', '04a_fig3_approx_nullspace', '04b_fig5_closure']),
    ('§4 NS finetuning', ['05_finetune', '05a_experiments', '09_table2_robustness', '07_table3_robustness',
                          '08_table4_eps_ablation', '11_reproduction']),
    ('§5 Evaluation', ['06_evaluate', '06a_attacks', '06b_corruptions', '06c_shifts', '06d_damagenet']),
    ('§6 Applications', ['10_blend', '10a_explain', '10b_fingerprint']),
    ('Benchmarks', ['12_benchmarks']),
    ('Library basics', ['index', '00_data', '00a_report', '00b_stats', '00c_progress', '01_models', '01a_attention',
                        '01b_training', '01c_cache', '01d_checks', '02_pretrain']),
]
NOT_SHOWN = {'site_screenshot.png'}  # the browser check's picture of this site, kept with the Table 2 report
MATHJAX_CONFIG = '''// ns_vit's MathJax settings for the site: the STIX web fonts shipped in the local copy, no font probe on about:blank
MathJax.Hub.Config({"HTML-CSS": {availableFonts: [], webFont: "STIX-Web", imageFont: null,
                                 styles: {"@font-face": {"font-family": "MathJax_Blank", src: "local('MathJax_Blank')"}}},
                   showMathMenu: false});
MathJax.Ajax.loadComplete("[MathJax]/config/ns_vit.js");
'''


def paper_artifacts() -> dict[str, str]:
    "Report folder -> its name in the paper (ns_vit.report.PAPER_ARTIFACTS)."
    from ns_vit.report import PAPER_ARTIFACTS
    return PAPER_ARTIFACTS


def written_by(rel: str) -> str | None:
    "The notebook that writes report folder `rel` (the registry, ns_vit.report.RUNS); None if no run does."
    from ns_vit.report import writer
    run = writer(rel)
    return run.notebook if run else None


def _params_text(params: dict, width: int = 40) -> str:
    "Papermill parameters as `name=value`, long values cut."
    short = lambda v: (s if len(s := v if isinstance(v, str) else repr(v)) <= width else s[:width - 1] + '…')
    return ', '.join(f'{k}={short(v)}' for k, v in params.items())


def provenance_note(name: str, nb: dict, executed: bool) -> str:
    "The note at the top of a notebook's page: which copy it is, with what parameters, and which make target makes it."
    from ns_vit.report import RUNS, executed_by
    run = executed_by(f'reports/notebooks/{name}.ipynb')
    keeps = f'{run.made_by} regenerates it' if run else 'no make target regenerates it (ns_vit.report.RUNS)'
    if executed:
        pm = nb['metadata'].get('papermill', {})
        return (f"*Executed copy* (`reports/notebooks/{name}.ipynb`"
                + (f", papermill parameters `{_params_text(pm['parameters'])}`" if pm.get('parameters') else '')
                + (f", finished {pm['end_time'][:16].replace('T', ' ')} UTC" if pm.get('end_time') else '')
                + f"; {keeps}); the source is `nbs/{name}.ipynb`."
                + (' **The run stopped with an error**: its last cells did not run.' if pm.get('exception') else ''))
    if not any('parameters' in c.get('metadata', {}).get('tags', []) for c in nb['cells']):
        return f"Library notebook `nbs/{name}.ipynb`: the code of the module with its tests, shown without outputs."
    if run: return (f"*Not executed yet*: this is the source notebook `nbs/{name}.ipynb` without outputs. `make {run.target}` "
                    f"keeps an executed copy in `reports/notebooks/`, which this page then shows; the results are on the report pages.")
    made = [f"`make {r.target}` writes one to `{r.executed}`" for r in RUNS if r.notebook == name and r.target and r.executed]
    return (f"*Source notebook* `nbs/{name}.ipynb`, without outputs: no executed copy is committed"
            + (f" ({'; '.join(made)})" if made else '') + "; the results are on the report pages.")


def nb_title(path: Path) -> str:
    "The notebook's H1 title."
    for c in json.loads(path.read_text())['cells']:
        m = re.match(r'#\s+(.+)', ''.join(c['source']).strip()) if c['cell_type'] == 'markdown' else None
        if m: return m.group(1).strip()
    return path.stem


def _note_html(text: str) -> str:
    "A material 'note' box in HTML (notebook cells are rendered by nbconvert, which knows no admonitions)."
    html = re.sub(r'`([^`]+)`', r'<code>\1</code>', text)
    html = re.sub(r'\*\*([^*]+)\*\*', r'<strong>\1</strong>', html)
    html = re.sub(r'\*([^*]+)\*', r'<em>\1</em>', html)
    return f'<div class="admonition note"><p>{html}</p></div>'


def _md_cell(text: str, cell_id: str = 'ns-vit-site-note') -> dict:
    return {'cell_type': 'markdown', 'id': cell_id, 'metadata': {}, 'source': text}


def stage_notebook(name: str, docs: Path, executed_dir: Path) -> tuple[str, bool]:
    "Copy nbs/<name> (or its executed copy) to docs/notebooks/, without nbdev's hidden cells; (site path, executed?)."
    src, run = ROOT / 'nbs' / f'{name}.ipynb', executed_dir / f'{name}.ipynb'
    executed = run.exists()
    nb = json.loads((run if executed else src).read_text())
    cells = [c for c in nb['cells'] if not re.match(r'#\|\s*(hide|default_exp)\b', ''.join(c['source']).strip())]
    note = provenance_note(name, nb, executed)
    first = 1 if cells and cells[0]['cell_type'] == 'markdown' else 0
    cells.insert(first, _md_cell(_note_html(note)))
    nb['cells'] = cells
    out = docs / 'notebooks' / f'{name}.ipynb'
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(nb))
    return f'notebooks/{name}.ipynb', executed


def _is_table(text: str) -> bool:
    return text.lstrip().startswith('|')


def stage_report(folder: Path, docs: Path, names: dict[str, str]) -> str:
    "A page for one artifact folder (figures, tables, prose, how it was made) with copies of its PNG and CSV files."
    rel = folder.relative_to(ROOT / 'reports').as_posix()
    out = docs / 'reports' / rel
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((folder / 'meta.json').read_text())
    from ns_vit.report import writer
    run = writer(rel)
    up = '../' * (rel.count('/') + 2)  # from reports/<rel>/index.html to the site root
    lines = [f'# {names.get(rel, rel)}', '',
             f"`reports/{rel}/`" + (f', written by [{run.notebook}]({up}notebooks/{run.notebook}.ipynb)' if run else '')
             + f" at commit `{meta.get('git_commit', '?')}` (its meta.json) on {meta.get('device', '?')} in {meta.get('wall_time_s', '?')} s "
             f"({meta.get('created', '?')}).", '', *([f'Regenerated {run.how}.', ''] if run else [])]
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in NOT_SHOWN)
    mds = {p.stem: p.read_text() for p in files if p.suffix == '.md'}
    pngs = {p.stem: p for p in files if p.suffix == '.png'}
    main = folder.name.split('_')[0]  # table2_robustness -> table2: the artifact itself comes first
    order = sorted(set(mds) | set(pngs), key=lambda k: (k in mds and _is_table(mds[k]), not k.startswith(main), k not in pngs, k))
    for stem in order:  # prose (headlines, verdicts) first, then the artifact, then figures, then the other tables
        lines += [f'## {stem}', '']
        if stem in pngs:
            shutil.copy2(pngs[stem], out / pngs[stem].name)
            lines += [f'![{stem}]({pngs[stem].name})', '']
        if stem in mds and not _is_table(mds[stem]): lines += [re.sub(r'^#', '###', mds[stem].strip(), flags=re.M), '']
        elif stem in mds:
            csv = folder / f'{stem}.csv'
            if csv.exists(): shutil.copy2(csv, out / csv.name)
            lines += [mds[stem].strip(), ''] + ([f'[{csv.name}]({csv.name})', ''] if csv.exists() else [])
    subs = sorted(d for d in folder.iterdir() if (d / 'meta.json').exists())
    if subs: lines += ['## Sub-reports', ''] + [f'- [{d.name}]({d.name}/index.md)' for d in subs] + ['']
    lines += ['## Parameters', '', '```json', json.dumps(meta.get('params', {}), indent=1), '```', '']
    (out / 'index.md').write_text('\n'.join(lines))
    return f'reports/{rel}/index.md'


def home_page(nav_sections: list, report_pages: dict[str, str], names: dict[str, str], executed: set[str]) -> str:
    "The home page: what ns_vit is, the paper's artifacts (one click to each), the notebooks section by section."
    index = json.loads((ROOT / 'nbs' / 'index.ipynb').read_text())
    intro = ''.join(index['cells'][0]['source']).split('\n', 1)[1].strip()  # the summary under the title
    headline = ROOT / 'reports' / 'reproduction' / 'headline.md'  # the study's finding in plain words (notebook 11 / make readme)
    found = (['## What we found', '', headline.read_text().strip(), '', f'The study, its tables and figures: '
              f'[reports/reproduction]({report_pages["reproduction"]}).', ''] if headline.exists() and 'reproduction' in report_pages else [])
    from ns_vit.report import RUNS, writer
    keepers = ', '.join(f'`make {t}`' for t in dict.fromkeys(r.target for r in RUNS if r.executed.startswith('reports/notebooks/')))
    lines = ['# ns_vit', '', intro, '', *found,
             'Every notebook of the repository, in the paper\'s order, with its results: experiment notebooks as executed '
             f'by their make targets ({keepers}), library notebooks with their code and tests. Built offline by `make docs`.', '',
             '## The paper\'s artifacts', '', '| artifact | report | notebook | regenerated by |', '|---|---|---|---|']
    for rel, name in names.items():
        if rel in report_pages:
            run = writer(rel)
            lines.append(f'| [{name}]({report_pages[rel]}) | `reports/{rel}` | '
                         + (f'[{run.notebook}](notebooks/{run.notebook}.ipynb) | {run.made_by}' if run else ' |') + ' |')
    lines += ['', '## The notebooks, section by section', '', '| section | notebooks |', '|---|---|']
    for section, nbs in nav_sections:
        links = ', '.join(f'[{nb}](notebooks/{nb}.ipynb)' + (' (executed)' if nb in executed else '') for nb in nbs)
        lines.append(f'| {section} | {links} |')
    return '\n'.join(lines) + '\n'


def stage(docs: Path, executed_dir: Path) -> list:
    "Stage every page under `docs` and return mkdocs' `nav`."
    if docs.exists(): shutil.rmtree(docs)
    docs.mkdir(parents=True)
    names = paper_artifacts()
    report_pages = {d.parent.relative_to(ROOT / 'reports').as_posix(): None for d in sorted((ROOT / 'reports').glob('**/meta.json'))}
    report_pages = {rel: stage_report(ROOT / 'reports' / rel, docs, names) for rel in report_pages}
    nav, executed, listed = [], set(), set()
    for section, nbs in SECTIONS:
        items = []
        for nb in nbs:
            if not (ROOT / 'nbs' / f'{nb}.ipynb').exists(): raise FileNotFoundError(f'nbs/{nb}.ipynb is in docs/build.py SECTIONS but not in nbs/')
            page, done = stage_notebook(nb, docs, executed_dir)
            if done: executed.add(nb)
            items.append({f'{nb} · {nb_title(ROOT / "nbs" / f"{nb}.ipynb")}': page})
            for rel, p in report_pages.items():  # the artifacts this notebook writes, top-level folders only in the nav
                if written_by(rel) == nb and (rel in names or '/' not in rel):
                    items.append({f'↳ {names.get(rel, rel)}': p}); listed.add(rel)
        nav.append({section: items})
    missing = sorted({p.stem for p in (ROOT / 'nbs').glob('*.ipynb')} - {nb for _, nbs in SECTIONS for nb in nbs})
    if missing: raise ValueError(f'notebooks not placed in the site: {missing}; add them to SECTIONS in docs/build.py')
    others = [{rel: p} for rel, p in report_pages.items() if rel not in listed and '/' not in rel]
    if others: nav.append({'Other reports': others})
    (docs / 'index.md').write_text(home_page(SECTIONS, report_pages, names, executed))
    mj = docs / 'assets' / 'mathjax'
    spec = importlib.util.find_spec('jupyter_server_mathjax')  # its files only: installed --no-deps, never imported
    if spec is None: raise ModuleNotFoundError('MathJax for the site comes from jupyter-server-mathjax: run make docs (it installs it)')
    shutil.copytree(Path(spec.submodule_search_locations[0]) / 'static', mj)
    (mj / 'config' / 'ns_vit.js').write_text(MATHJAX_CONFIG)
    return [{'Home': 'index.md'}] + nav


def build(site: Path, executed_dir: Path = ROOT / 'reports' / 'notebooks') -> Path:
    "Stage the pages (executed notebooks from `executed_dir`) and build the site into `site`."
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config
    work = ROOT / '_docs_src'
    nav = stage(work / 'docs', executed_dir)
    cfg = load_config(str(ROOT / 'docs' / 'mkdocs.yml'), docs_dir=str(work / 'docs'), site_dir=str(site), nav=nav)
    cfg.plugins['mkdocs-jupyter'].config['cache_dir'] = str(work / 'cache')
    cfg.plugins.on_startup(command='build', dirty=False)  # what `mkdocs build` does around the build
    try: mkdocs_build(cfg)
    finally: cfg.plugins.on_shutdown()
    return site


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--site', default=str(ROOT / '_site'), help='output folder (default: _site/)')
    ap.add_argument('--executed', default=str(ROOT / 'reports' / 'notebooks'),
                    help='folder of executed notebooks (default: reports/notebooks/, written by make reports)')
    args = ap.parse_args()
    site = build(Path(args.site).resolve(), Path(args.executed).resolve())
    print(f'site built: {site}/index.html ({sum(1 for _ in site.glob("**/*.html"))} pages)')
