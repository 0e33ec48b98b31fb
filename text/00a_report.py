# %% [markdown]
# # Reports
# > Where experiment notebooks write their artifacts, and the `meta.json` that says how each was made.

# %%
#| default_exp report

# %%
#| export
from __future__ import annotations
import hashlib, json, os, platform, re, subprocess, tempfile, time
from dataclasses import dataclass, field
from pathlib import Path
import torch
from ns_vit.data import repo_root
from ns_vit.training import atomic_save, path_under

# %%
#| hide
import tempfile
from fastcore.test import test_eq, test_fail


# %% [markdown]
# ## Artifact folders
# Each experiment notebook writes `reports/<artifact>/` at its default parameters. Smoke runs (tests) write to
# `runs/smoke/reports/<artifact>/` instead, so a test never overwrites a real report. Nor does a trial run: a notebook
# passes its parameters to `report_dir`, and when any of them (other than threads and device) differs from those in the
# committed report's `meta.json`, the run writes to `runs/reports/<artifact>-<digest of its parameters>/` and prints
# where, unless `-p commit_report True` (what `make reports`, `make study`, `make bench` and `make pretrain` pass) says
# that the committed report is to be replaced.

# %%
#| export
def in_test() -> bool:
    "True under `nbdev_test` (which sets IN_TEST)."
    return bool(os.environ.get('IN_TEST'))

PARAMS_NOT_RESULTS = ('threads', 'device', 'commit_report', 'smoke')  # parameters that do not change what a report says

def param_changes(meta: str | Path, params: dict) -> list[str]:
    "The parameters (present in both) whose value differs from those of a committed report's `meta.json`: 'k: old → new'."
    meta = Path(meta)
    if not meta.exists(): return []
    old = json.loads(meta.read_text()).get('params', {})
    new = json.loads(json.dumps(relative_paths(params, where='params')[0], default=str))
    return [f'{k}: {old[k]!r} → {new[k]!r}' for k in sorted(set(old) & set(new) - set(PARAMS_NOT_RESULTS)) if old[k] != new[k]]

def report_dir(
    artifact: str,  # the report folder under reports/, e.g. 'table2_robustness' or 'finetune/ns-eps0.03'
    smoke: bool = False,  # smoke runs write under runs/smoke/reports/
    root: str | Path | None = None,  # the repository; default: ns_vit's
    *,
    params: dict | None = None,  # the notebook's parameters: a run whose results differ from the committed report's goes elsewhere
    commit: bool = False,  # write into reports/<artifact> even when the parameters differ (`make reports` and `make study` do)
) -> Path:
    "The folder for `artifact`: `reports/<artifact>`, `runs/smoke/reports/<artifact>`, or for a trial run `runs/reports/<artifact>-<digest>`."
    base = Path(root) if root is not None else repo_root()
    d = base / ('runs/smoke/reports' if smoke else 'reports') / artifact
    changes = param_changes(d / 'meta.json', params) if params is not None and not smoke and not commit else []
    if changes:  # a trial run never overwrites a committed report
        digest = hashlib.sha256(json.dumps(relative_paths(params, where='params')[0], sort_keys=True, default=str).encode()).hexdigest()[:8]
        d = base / 'runs' / 'reports' / f"{artifact.replace('/', '-')}-{digest}"
        print(f"parameters differ from the committed reports/{artifact} ({'; '.join(changes)}): writing to "
              f"{d.relative_to(base)} instead (-p commit_report True writes into reports/{artifact})", flush=True)
    d.mkdir(parents=True, exist_ok=True)
    return d

def device_info(device: str | torch.device = 'cpu') -> str:
    "A readable description of the compute device."
    device = torch.device(device)
    if device.type == 'cuda': return torch.cuda.get_device_name(device)
    return f'cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)'

def param(value):
    "A papermill parameter: `-p name '[1, 2]'` arrives as a string; decode JSON lists and dicts, pass the rest through."
    if isinstance(value, str) and value.strip()[:1] in ('[', '{'):
        try: return json.loads(value)
        except json.JSONDecodeError as e: raise ValueError(f'parameter value {value!r} starts like JSON but is not JSON ({e}); quote it as JSON, e.g. \'[30]\' or \'{{"steps": 20}}\'') from None
    return value


# %%
test_eq(param('[1, 2]'), [1, 2]); test_eq(param('{"a": {}}'), {'a': {}}); test_eq(param('abc'), 'abc'); test_eq(param([3]), [3])
test_eq(param(''), ''); test_eq(param('  '), '  ')  # an empty parameter is a string, not JSON
test_fail(lambda: param("{'steps': 20}"), contains='starts like JSON but is not JSON')


# %% [markdown]
# ## Provenance: the commit and the paths in `meta.json`
# A report says which code made it. On a clean tree that is the commit hash. On a dirty tree it is
# `<commit>+dirty` with `dirty: true` and `diff_sha256`, the SHA-256 of `git diff --binary HEAD` (tracked changes,
# staged or not), so two reports made from the same uncommitted edits can be told apart from two that were not;
# untracked files that git does not ignore are listed by name. Changes under `reports/` do not count: `make reports`
# rewrites the tracked reports as it goes, and a report regenerated from a clean clone must not call the next
# notebook's tree dirty.

# %%
#| export
def _git(root: Path, *args: str) -> bytes:
    "Stdout of `git args` in `root` (empty when git fails)."
    return subprocess.run(['git', *args], cwd=root, capture_output=True, timeout=60).stdout

def git_state(
    root: str | Path | None = None,  # a folder in the repository; default: ns_vit's repository
    exclude: tuple = (),  # files (relative to the repository) that the run itself wrote, e.g. its weights: not counted as dirty
) -> dict:
    "The code that runs: `commit` (`<hash>+dirty` on a dirty tree), `dirty`, and for a dirty tree `diff_sha256` and `untracked`."
    root = Path(root) if root is not None else repo_root()
    outside_reports = ['--', '.', ':(exclude)reports', *(f':(exclude,literal){p}' for p in exclude)]  # make reports rewrites tracked reports as it runs
    try:
        commit = _git(root, 'rev-parse', '--verify', 'HEAD').decode().strip()
        if not commit: return dict(commit='unknown', dirty=None)  # not a git checkout (an installed package, an archive)
        diff = _git(root, 'diff', '--binary', '--no-color', '--no-ext-diff', 'HEAD', *outside_reports)
        untracked = _git(root, 'ls-files', '--others', '--exclude-standard', *outside_reports).decode().splitlines()
    except (OSError, subprocess.SubprocessError): return dict(commit='unknown', dirty=None)  # no git, or it hung
    if not diff and not untracked: return dict(commit=commit, dirty=False)
    return dict(commit=f'{commit}+dirty', dirty=True, diff_sha256=hashlib.sha256(diff).hexdigest(), untracked=untracked)

def git_commit(root: str | Path | None = None) -> str:
    "The current git commit of the repo (`<hash>+dirty` if tracked files outside reports/ changed), or 'unknown'."
    return git_state(root)['commit']


# %%
def git(d, *a): subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *a], cwd=d, check=True, capture_output=True)
with tempfile.TemporaryDirectory() as d:
    test_eq(git_state(d), dict(commit='unknown', dirty=None))  # not a repository
    git(d, 'init', '-q'); (Path(d) / 'a.py').write_text('x = 1\n'); (Path(d) / 'reports').mkdir(); (Path(d) / 'reports/t.md').write_text('1\n')
    git(d, 'add', '.'); git(d, 'commit', '-qm', 'c')
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=d, capture_output=True, text=True).stdout.strip()
    test_eq(git_state(d), dict(commit=head, dirty=False)); test_eq(git_commit(d), head)
    (Path(d) / 'reports/t.md').write_text('2\n'); (Path(d) / 'reports/new.png').write_bytes(b'')  # regenerated reports: still clean
    test_eq(git_state(d)['dirty'], False)
    (Path(d) / 'a.py').write_text('x = 2\n')
    s = git_state(d)
    diff = subprocess.run(['git', 'diff', '--binary', 'HEAD', '--', '.', ':(exclude)reports'], cwd=d, capture_output=True).stdout
    test_eq((s['commit'], s['dirty'], s['untracked']), (head + '+dirty', True, []))
    test_eq(s['diff_sha256'], hashlib.sha256(diff).hexdigest()); assert b'x = 2' in diff
    (Path(d) / 'a.py').write_text('x = 3\n'); assert git_state(d)['diff_sha256'] != s['diff_sha256']  # another edit, another hash
    (Path(d) / 'a.py').write_text('x = 1\n'); (Path(d) / 'b.py').write_text('')  # an untracked source file makes it dirty too
    test_eq((git_state(d)['dirty'], git_state(d)['untracked']), (True, ['b.py']))
    test_eq(git_state(d, exclude=('b.py',)), dict(commit=head, dirty=False))  # a file the run wrote itself (its weights)
    (Path(d) / 'a.py').write_text('x = 9\n'); test_eq(git_state(d, exclude=('b.py',))['dirty'], True)  # the code still counts


# %% [markdown]
# Paths in a report's parameters and extras are written relative to the repository, so a `meta.json` reads the same
# on every machine and gives away none of the machine that made it. A path outside the repository (a data set in
# `/data/imagenet`, a temporary folder) is cut to its name, and `path_notes` says which values were cut.

# %%
#| export
def _is_path(v) -> bool:
    "A path object, or a string that is an absolute (or `~`) path."
    return isinstance(v, os.PathLike) or (isinstance(v, str) and '\n' not in v and (os.path.isabs(v) or v.startswith('~')))

_under = path_under  # one test of "inside this folder" for reports and for messages (ns_vit.training.path_under)

def relative_paths(
    obj,  # a parameter value: nested dicts, lists and tuples of anything JSON can hold, paths included
    *,
    root: str | Path | None = None,  # the repository; default: ns_vit's
    where: str = '',  # the name of `obj`, for the notes ('params' -> 'params.data')
) -> tuple[object, list[str]]:
    "`obj` with paths under `root` made relative, paths elsewhere cut to their name, and a note naming each cut."
    if isinstance(obj, dict):
        done = {k: relative_paths(v, root=root, where=f'{where}.{k}' if where else str(k)) for k, v in obj.items()}
        return {k: v for k, (v, _) in done.items()}, [n for _, notes in done.values() for n in notes]
    if isinstance(obj, (list, tuple)):
        done = [relative_paths(v, root=root, where=f'{where}[{i}]') for i, v in enumerate(obj)]
        return [v for v, _ in done], [n for _, notes in done for n in notes]
    if not _is_path(obj): return obj, []
    p = Path(os.fspath(obj)).expanduser()
    if not p.is_absolute(): return p.as_posix(), []  # already relative (to the working directory, the repo root in make)
    rel = _under(p, Path(root) if root is not None else repo_root())
    if rel is not None: return rel, []
    return p.name, [f'{where or "value"}: a path outside the repository, recorded as its name {p.name!r}']


# %%
root = repo_root()
v, notes = relative_paths({'run': str(root / 'runs/finetune/ns-1'), 'ckpt': root / 'data/default_vit.safetensors', 'eps': 0.03,
                           'runs': {'ns': [str(root / 'runs/a'), '/data/imagenet/']}, 'name': 'vit_tiny', 'frac': '1/255'}, where='params')
test_eq(v, {'run': 'runs/finetune/ns-1', 'ckpt': 'data/default_vit.safetensors', 'eps': 0.03,
            'runs': {'ns': ['runs/a', 'imagenet']}, 'name': 'vit_tiny', 'frac': '1/255'})
test_eq(notes, ["params.runs.ns[1]: a path outside the repository, recorded as its name 'imagenet'"])
test_eq(relative_paths(Path('runs/x')), ('runs/x', []))  # relative paths stay, as strings
test_eq(relative_paths(str(root))[0], '.')
with tempfile.TemporaryDirectory() as d:  # a repository that is reached through a symlink is still recognised
    os.symlink(root, Path(d) / 'link')
    test_eq(relative_paths(str(Path(d) / 'link' / 'reports'), root=root), ('reports', []))


# %%
#| export
def write_json(obj, path: str | Path) -> Path:
    "Write `obj` as indented JSON, atomically."
    return atomic_save(obj, path, lambda o, p: Path(p).write_text(json.dumps(o, indent=2, default=str)))

def write_meta(
    folder: str | Path,  # the artifact folder (`report_dir(...)`)
    params: dict,  # the notebook's parameters
    t0: float,  # `time.time()` when the experiment started
    device='cpu',  # the device it ran on
    outputs: tuple = (),  # files the run wrote outside `folder` (its weights and card): recorded with their sha256, not counted as dirty
    **extra,  # anything else the report should record (run folders, timings, settings)
) -> Path:
    "Write `meta.json`: parameters and extras (paths relative to the repo), git commit and state, device, wall time, torch."
    params, notes = relative_paths(params, where='params')
    extra, extra_notes = relative_paths(extra)
    root = repo_root()
    own = {_under(Path(p), root) or Path(p).name: Path(p) for p in outputs}  # repo-relative (a file elsewhere: its name)
    state = git_state(exclude=tuple(k for k, q in own.items() if _under(q, root)))  # what the run wrote does not make its code dirty
    if own: extra = dict(outputs={k: hashlib.sha256(q.read_bytes()).hexdigest() for k, q in own.items()}) | extra
    meta = dict(params=params, git_commit=state.pop('commit'), **state, device=device_info(device),
                wall_time_s=round(time.time() - t0, 1), torch=torch.__version__, created=time.strftime('%Y-%m-%d %H:%M:%S'), **extra)
    if notes + extra_notes: meta['path_notes'] = notes + extra_notes
    return write_json(meta, Path(folder) / 'meta.json')

def save_table(df, folder: str | Path, name: str, floatfmt: str = '.4f') -> Path:
    "Write a pandas table as `<name>.csv` and `<name>.md` into `folder` (with `df.attrs['note']` under the markdown table); a column of strings prints as written."
    folder = Path(folder)
    note = df.attrs.get('note')
    text_cols = [i for i, c in enumerate(df.columns) if len(df) and df[c].map(lambda v: isinstance(v, str)).all()]
    md = df.to_markdown(index=False, floatfmt=floatfmt, disable_numparse=text_cols or False) + '\n' + (f'\n{note}\n' if note else '')
    atomic_save(df, folder / f'{name}.csv', lambda o, p: o.to_csv(p, index=False))
    atomic_save(md, folder / f'{name}.md', lambda o, p: Path(p).write_text(o))
    return folder / f'{name}.md'

def save_figure(fig, folder: str | Path, name: str) -> Path:
    "Save a matplotlib figure as `<name>.png` and `<name>.pdf` into `folder`."
    for ext in ('png', 'pdf'):
        atomic_save(fig, Path(folder) / f'{name}.{ext}', lambda o, p: o.savefig(p, dpi=150, bbox_inches='tight', format=ext))
    return Path(folder) / f'{name}.png'


# %%
import pandas as pd, matplotlib.pyplot as plt
with tempfile.TemporaryDirectory() as d:
    rd = report_dir('demo', smoke=True, root=d)
    test_eq(rd, Path(d) / 'runs/smoke/reports/demo')
    # a committed report is never overwritten by a run with other parameters unless it says so
    (Path(d) / 'reports/demo').mkdir(parents=True); write_json(dict(params=dict(eps=0.03, steps=400, threads=2)), Path(d) / 'reports/demo/meta.json')
    test_eq(report_dir('demo', root=d, params=dict(eps=0.03, steps=400, threads=1, new=1)), Path(d) / 'reports/demo')  # same results
    trial = report_dir('demo', root=d, params=dict(eps=0.03, steps=20))
    assert trial.parent == Path(d) / 'runs/reports' and trial.name.startswith('demo-'), trial
    test_eq(report_dir('demo', root=d, params=dict(eps=0.03, steps=20), commit=True), Path(d) / 'reports/demo')
    test_eq(param_changes(Path(d) / 'reports/demo/meta.json', dict(eps=0.01, steps=400)), ['eps: 0.03 → 0.01'])
    save_table(pd.DataFrame({'a': [1.0], 'b': ['x']}), rd, 'table')
    test_eq((rd / 'table.md').read_text().splitlines()[0].replace(' ', ''), '|a|b|')
    t = pd.DataFrame({'a': [1.0]}); t.attrs['note'] = '* marks p < 0.05.'
    test_eq(save_table(t, rd, 'noted').read_text().splitlines()[-2:], ['', '* marks p < 0.05.'])  # the note under the table
    test_eq(pd.read_csv(rd / 'noted.csv').columns.tolist(), ['a'])  # the csv stays a plain table
    row = save_table(pd.DataFrame({'x': [0.123456], 'avg': ['26.2']}), rd, 'digits').read_text().splitlines()[2]
    test_eq(row.replace(' ', ''), '|0.1235|26.2|')  # floats take floatfmt; a string of digits is not re-parsed into 26.2000
    fig, ax = plt.subplots(); ax.plot([0, 1]); save_figure(fig, rd, 'fig'); plt.close(fig)
    test_eq(sorted(p.name for p in rd.iterdir()), ['digits.csv', 'digits.md', 'fig.pdf', 'fig.png', 'noted.csv', 'noted.md', 'table.csv', 'table.md'])
    meta = json.loads(write_meta(rd, {'eps': 0.03, 'out': str(repo_root() / 'runs/x'), 'data': d}, time.time(),
                                 runs={'ns': repo_root() / 'runs/ns'}).read_text())
    test_eq(meta['params'], {'eps': 0.03, 'out': 'runs/x', 'data': Path(d).name}); assert meta['wall_time_s'] >= 0
    test_eq(meta['runs'], {'ns': 'runs/ns'}); test_eq(len(meta['path_notes']), 1); assert meta['path_notes'][0].startswith('params.data')
    test_eq(meta['git_commit'].endswith('+dirty'), meta['dirty'] is True)  # the flag and the commit agree
    assert str(repo_root()) not in json.dumps(meta)  # nothing of this machine's paths
    w = Path(d) / 'w.safetensors'; w.write_bytes(b'weights')  # a file the run wrote beside its report: its sha256, by name
    meta = json.loads(write_meta(rd, {}, time.time(), outputs=[w]).read_text())
    test_eq(meta['outputs'], {'w.safetensors': hashlib.sha256(b'weights').hexdigest()})


# %% [markdown]
# ## The registry: notebook → report → make target
# `RUNS` is the one place that says which notebook writes which report folder, which make target runs it and with which
# papermill parameters, and where the executed copy goes. Everything else that says so is generated from it or checked
# against it: the Makefile's list of `make reports` notebooks (`make_list`), the provenance on the site (`docs/build.py`),
# `reports/README.md` (`write_index`), the artifact table of the README (`artifacts_table`) and the notebooks the smoke
# tests run (`default_reports`); `tests/test_registry.py` checks every papermill command of the Makefile against it and
# every folder of `reports/` and executed copy of `reports/notebooks/` for an entry.
#
# A `Run` records a parameter as the Makefile writes it, so a value that the Makefile takes from a variable reads
# `$(STUDY_CELLS)`: the variable, with its comment, is in the Makefile. A target may run a notebook only under a condition
# (`note`); a run with no target is the notebook at its defaults, as a reader runs it by hand.

# %%
#| export
@dataclass(frozen=True)
class Run:
    "One papermill run of an experiment notebook: the make target that runs it, its parameters, what it writes."
    notebook: str  # under nbs/, without .ipynb
    target: str  # the make target that runs it; '' for none: the notebook at its defaults, run by hand
    reports: tuple[str, ...]  # the folders under reports/ that it writes
    params: dict = field(default_factory=dict)  # its `-p name value` parameters as the Makefile writes them, but for commit_report
    commit: bool = True  # passes `-p commit_report True`: replaces the committed reports/<folder> (report_dir)
    executed: str = ''  # where its executed copy goes; one under reports/notebooks/ is committed and shown on the site
    note: str = ''  # when the target runs it (or adds a parameter), where that is not always

    @property
    def papermill_params(self) -> dict:
        "Every `-p` parameter of the command, commit_report included."
        return self.params | ({'commit_report': 'True'} if self.commit else {})

    @property
    def defaults(self) -> bool:
        "Whether it runs the notebook at its default parameters (threads aside), as the smoke tests do at smoke size."
        return set(self.params) <= {'threads'}

    @property
    def made_by(self) -> str:
        "The make target that runs it, in words: '`make study`' (or 'by hand')."
        return f'`make {self.target}`' if self.target else 'by hand'

    @property
    def how(self) -> str:
        "How it is run, in words: 'by `make study` (`-p …`)'."
        args = ' '.join(f'-p {k} {v}' for k, v in self.papermill_params.items())
        s = f'by `make {self.target}`' if self.target else f'by hand (`papermill nbs/{self.notebook}.ipynb out.ipynb`)'
        return s + (f' (`{args}`)' if args else '') + (f'; {self.note}' if self.note else '')

def _reports(notebook: str, *reports: str) -> Run:
    "A notebook of `make reports`: one torch thread (two workers side by side), its executed copy kept in reports/notebooks/."
    return Run(notebook, 'reports', reports, {'threads': '1'}, executed=f'reports/notebooks/{notebook}.ipynb')

_STUDY_THREADS = '$(or $(STUDY_THREADS),2)'
_TI8 = 'only when data/vit_ti8.safetensors exists (make pretrain-ti8)'
RUNS: tuple[Run, ...] = (
    # make reports: two workers take the notebooks from one queue in this order, so that neither waits. The longest
    # first: Table 2 (09), which also trains the models that 05 and 08 reuse; the data sets next. Runs and data sets another
    # worker is making are waited for, then reused. Table 3 (07) is not among them: make adv-sweep.
    _reports('09_table2_robustness', 'table2_robustness'), _reports('06d_damagenet', 'damagenet_cifar10'),
    _reports('06b_corruptions', 'corruptions'), _reports('08_table4_eps_ablation', 'table4_eps_ablation'),
    _reports('10b_fingerprint', 'fingerprint'), _reports('04a_fig3_approx_nullspace', 'fig3_approx_nullspace'),
    _reports('06a_attacks', 'attack_budgets'), _reports('05_finetune', 'finetune/ns-eps0.03'),
    _reports('04b_fig5_closure', 'fig5_closure'), _reports('10a_explain', 'fig8_10_saliency'),
    _reports('10_blend', 'fig6_watermark', 'fig7_lookalike'), _reports('03_nullspace', 'table1_nullspace_dims', 'fig2_exact_nullspace'),
    # make adv-sweep, make fingerprint-impostors: Table 3 (its adversarial-training budget sweep and the table at the chosen
    # budgets) and the fingerprint's impostors, which do not fit make reports' hour
    Run('07_table3_robustness', 'adv-sweep', ('table3_robustness', 'table3_robustness/sweep'), {'threads': '2'},
        executed='reports/notebooks/07_table3_robustness.ipynb'),
    Run('10b_fingerprint', 'fingerprint-impostors', ('fingerprint/impostors',), {'impostors': 'True', 'threads': '2'},
        executed='runs/reports/10b_fingerprint_impostors.ipynb'),
    # make study: the larger model's default cell first, then the default model's study beside it
    Run('11_reproduction', 'study', ('reproduction/vit-ti8',), {'cells': '$(TI8_CELLS)', 'model': 'vit-ti8',
        'report': 'reproduction/vit-ti8', 'threads': _STUDY_THREADS}, executed='runs/reports/11_reproduction_vit-ti8.ipynb', note=_TI8),
    Run('11_reproduction', 'study', ('reproduction', 'reproduction/screen'), {'cells': '$(STUDY_CELLS)', 'screen': '$(SCREEN)',
        'report': 'reproduction', 'threads': _STUDY_THREADS, 'also': 'reproduction/vit-ti8'}, executed='reports/notebooks/11_reproduction.ipynb',
        note='`-p also` only once reports/reproduction/vit-ti8 has its paired_raw.csv; reproduction/screen only when SCREEN names cells'),
    Run('11_reproduction', '', ('reproduction/quick', 'reproduction/screen'), commit=False),
    # make bench; make gpu-check (a GPU machine)
    Run('12_benchmarks', 'bench', ('benchmarks',), executed='reports/notebooks/12_benchmarks.ipynb'),
    Run('12_benchmarks', 'bench', ('benchmarks/vit-ti8',), {'model': 'vit-ti8'}, executed='runs/reports/12_benchmarks_vit-ti8.ipynb', note=_TI8),
    Run('12_benchmarks', 'gpu-check', ('benchmarks/cuda',), {'device': 'cuda', 'semantics_check': 'False', 'suite_check': 'True'},
        commit=False, executed='runs/reports/12_benchmarks_cuda.ipynb'),
    Run('05_finetune', 'gpu-check', ('benchmarks/cuda/finetune',), {'device': 'cuda', 'report': 'benchmarks/cuda/finetune',
        'out': 'runs/gpu-check/ns'}, executed='runs/reports/05_finetune_cuda.ipynb'),
    # make pretrain, make pretrain-ti8: the embedded models
    Run('02_pretrain', 'pretrain', ('pretrain',), executed='runs/pretrain/02_pretrain.ipynb'),
    Run('02_pretrain', 'pretrain-ti8', ('pretrain/vit-ti8',), {'model': 'vit-ti8', 'lr': '1e-3', 'epochs': '60', 'restarts': '[30]',
        'restart_lr': '0.5', 'threads': '2'},
        executed='runs/pretrain/02_pretrain_vit-ti8.ipynb'),
    Run('04a_fig3_approx_nullspace', 'pretrain-ti8', ('fig3_approx_nullspace/vit-ti8',), {'model': 'vit-ti8', 'threads': '2'},
        executed='runs/reports/04a_fig3_approx_nullspace_vit-ti8.ipynb', note=_TI8),
)
OTHER_FILES = {'benchmarks/make_reports_minutes.md': 'reports'}  # report files that a target writes beside a notebook's (write_minutes)

def make_list(target: str) -> str:
    "The notebooks a make target runs, in its order, separated by spaces (the Makefile's REPORT_NBS)."
    return ' '.join(dict.fromkeys(r.notebook for r in RUNS if r.target == target))

def writer(folder: str) -> Run | None:
    "The run that writes report folder `folder` (one that commits it first); None if no run does."
    runs = sorted((r for r in RUNS if folder in r.reports), key=lambda r: not r.commit)
    return runs[0] if runs else None

def executed_by(path: str) -> Run | None:
    "The run whose executed copy is `path` ('reports/notebooks/05_finetune.ipynb'); None if no run writes it."
    return next((r for r in RUNS if r.executed == path), None)

def default_reports() -> dict[str, tuple[str, ...]]:
    "Notebook -> the report folders it writes at its default parameters (at smoke size: under runs/smoke/reports/)."
    return {r.notebook: r.reports for r in RUNS if r.defaults}


# %%
test_eq(make_list('reports').split()[:2], ['09_table2_robustness', '06d_damagenet'])
test_eq(make_list('study'), '11_reproduction')
test_eq(writer('finetune/ns-eps0.03').notebook, '05_finetune'); test_eq(writer('nothing'), None)
test_eq((writer('reproduction/screen').target, writer('fig7_lookalike').target), ('study', 'reports'))  # the committing run first
test_eq(executed_by('reports/notebooks/12_benchmarks.ipynb').target, 'bench')
test_eq(default_reports()['11_reproduction'], ('reproduction/quick', 'reproduction/screen'))
test_eq(writer('pretrain/vit-ti8').how, 'by `make pretrain-ti8` (`-p model vit-ti8 -p lr 1e-3 -p epochs 60 -p restarts [30] -p restart_lr 0.5 -p threads 2 -p commit_report True`)')
nbs = {p.stem for p in (repo_root() / 'nbs').glob('*.ipynb')}
test_eq([r.notebook for r in RUNS if r.notebook not in nbs], [])  # every run names a notebook that exists
test_eq(sorted(r.notebook for r in RUNS if r.defaults), sorted({r.notebook for r in RUNS}))  # one run per notebook at its defaults
folders = [f for r in RUNS if r.commit for f in r.reports]
test_eq(sorted(f for f in set(folders) if folders.count(f) > 1), [])  # one committing writer per folder

# %% [markdown]
# ## The index of reports
# `reports/README.md` is generated from the registry and the reports themselves: the paper's artifacts with their
# notebook and make target (`artifacts_table`, which the README shows too), then one section per report folder with the
# run that writes it, the commit, device and time recorded in that folder's own `meta.json`, and its files. `make index`
# regenerates it, and every target that writes a report ends with it, so the index never gives a commit its report does
# not record.

# %%
#| export
PAPER_ARTIFACTS = {  # report folder -> what it is in the paper (Liu et al.), in the paper's order
    'table1_nullspace_dims': 'Table 1 (nullspace dimensions)', 'fig2_exact_nullspace': 'Figure 2 (exact nullspace)',
    'fig3_approx_nullspace': 'Figure 3 (approximate nullspace)', 'finetune/ns-eps0.03': 'Figure 4 and Table 5 (NS finetuning dynamics; NS vs plain summary)',
    'fig5_closure': 'Figure 5 (closure, App. D)', 'table2_robustness': 'Table 2 (robustness)', 'table3_robustness': 'Table 3 (vs adversarial training)',
    'table4_eps_ablation': 'Table 4 (ε ablation, NS vs random)', 'fig6_watermark': 'Figure 6 (watermarking, App. E)',
    'fig7_lookalike': 'Figure 7 (look-alike images, App. F)', 'fig8_10_saliency': 'Figures 8–10 (saliency maps, App. F)',
    'fingerprint': '§6 model fingerprint ("patenting")', 'attack_budgets': '§5 support: attack budgets and Patch-Fool',
    'corruptions': '§5 support: CIFAR-10-C generation', 'damagenet_cifar10': '§5 support: DamageNet-style transfer set',
    'reproduction': 'reproduction study: NS vs plain and random-noise finetuning, seeds and intervals',
    'pretrain': 'the embedded default model', 'benchmarks': 'benchmarks: NS/plain time, evaluation minutes, data loading'}

def artifacts_table(
    prefix: str = '',  # the path from the page to reports/ ('reports/' in the README, '' in reports/README.md)
    root: str | Path | None = None,  # the repository; default: ns_vit's
) -> str:
    "Markdown: each of the paper's artifacts that reports/ holds, with its folder (a link), notebook and make target."
    base = (Path(root) if root is not None else repo_root()) / 'reports'
    rows = ['| in the paper | report | notebook | regenerated by |', '|---|---|---|---|']
    for k, name in PAPER_ARTIFACTS.items():
        if (base / k / 'meta.json').exists():
            r = writer(k)
            rows.append(f"| {name} | [`{prefix}{k}`]({prefix}{k}/) | {f'`{r.notebook}`' if r else ''} | {r.made_by if r else 'not in the registry'} |")
    return '\n'.join(rows)

def render_index(root: str | Path | None = None) -> str:
    "The text of `reports/README.md`: the paper's artifacts, then every report folder with its run, commit (its meta.json) and files."
    base = (Path(root) if root is not None else repo_root()) / 'reports'
    targets = [f'`make {t}`' for t in dict.fromkeys(r.target for r in RUNS if r.target and r.commit)]
    lines = ['# Reports', '', 'Generated by `make index` from the registry of runs (`ns_vit.report.RUNS`: notebook → report folder → make',
             f"target) and each folder's own `meta.json`; {', '.join(targets[:-1])} and {targets[-1]} run it at their end. Never",
             'edited by hand. Each folder holds its figure(s), table(s) and a `meta.json` with the parameters, commit, device and',
             'wall time of its run.',
             '', artifacts_table(root=root), '']
    for meta_path in sorted(base.glob('**/meta.json')):
        d, meta = meta_path.parent, json.loads(meta_path.read_text())
        rel, run = d.relative_to(base).as_posix(), writer(d.relative_to(base).as_posix())
        lines += [f'## {rel}' + (f' — {PAPER_ARTIFACTS[rel]}' if rel in PAPER_ARTIFACTS else ''), '',
                  f'- written by `nbs/{run.notebook}.ipynb`, run {run.how}' if run else
                  '- **not in the registry** (`ns_vit.report.RUNS`): add the run that writes this folder',
                  f"- made {meta.get('created', '?')} at commit `{meta.get('git_commit', '?')}` (its meta.json) on "
                  f"{meta.get('device', '?')} in {meta.get('wall_time_s', '?')} s"]
        lines += [f'- [{f.name}]({rel}/{f.name})' + (f' (written by `make {OTHER_FILES[f"{rel}/{f.name}"]}`)' if f'{rel}/{f.name}' in OTHER_FILES else '')
                  for f in sorted(d.iterdir()) if f.suffix in ('.md', '.png', '.csv')]
        lines.append('')
    return '\n'.join(lines)

def write_index(root: str | Path | None = None) -> Path:
    "Regenerate `reports/README.md` (`render_index`)."
    base = (Path(root) if root is not None else repo_root()) / 'reports'
    return atomic_save(render_index(root), base / 'README.md', lambda o, p: Path(p).write_text(o))

def write_minutes(log: str | Path | None = None, root: str | Path | None = None) -> Path:
    "`reports/benchmarks/make_reports_minutes.md` from `make reports`' log (lines `notebook worker seconds`, then `total - s`)."
    base = Path(root) if root is not None else repo_root()
    rows = [l.split() for l in Path(log or base / 'runs/reports/minutes.txt').read_text().splitlines() if len(l.split()) == 3]
    if not rows or rows[-1][0] != 'total': raise ValueError(f'{log or "runs/reports/minutes.txt"} has no total line: did make reports finish?')
    total = int(rows[-1][2])
    workers = {}
    for nb, w, s in rows[:-1]: workers[w] = workers.get(w, 0) + int(s)
    lines = ['# `make reports`: minutes per notebook', '', f'Wall time of the whole command: **{total / 60:.1f} min** '
             f'(two workers side by side take the notebooks from one queue, one torch thread per notebook; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; '
             f"{time.strftime('%Y-%m-%d %H:%M')}, commit `{git_commit()}`).", '', '| notebook | worker | minutes |', '|---|---|---:|']
    lines += [f'| {nb} | {w} | {int(s) / 60:.1f} |' for nb, w, s in rows[:-1]]
    lines += ['', '| worker | minutes (sum of its notebooks) |', '|---|---:|'] + [f'| {k} | {v / 60:.1f} |' for k, v in workers.items()]
    return atomic_save('\n'.join(lines) + '\n', base / 'reports/benchmarks/make_reports_minutes.md', lambda o, p: Path(p).write_text(o))


# %%
with tempfile.TemporaryDirectory() as d:
    for k in ('fig9', 'table2_robustness'):
        rd = Path(d) / 'reports' / k; rd.mkdir(parents=True); write_json(dict(git_commit=f'c0ffee-{k}', created='2026-01-01'), rd / 'meta.json')
    (rd / 'table2.png').write_bytes(b'')
    txt = write_index(d).read_text()
    test_eq(txt, render_index(d))
    assert '## fig9\n\n- **not in the registry**' in txt and '(table2_robustness/table2.png)' in txt, txt
    assert ('## table2_robustness — Table 2 (robustness)\n\n- written by `nbs/09_table2_robustness.ipynb`, run by `make reports` '
            '(`-p threads 1 -p commit_report True`)\n- made 2026-01-01 at commit `c0ffee-table2_robustness` (its meta.json)') in txt, txt
    test_eq(artifacts_table('reports/', d).splitlines()[2:],  # only the artifacts that exist
            ['| Table 2 (robustness) | [`reports/table2_robustness`](reports/table2_robustness/) | `09_table2_robustness` | `make reports` |'])
    log = Path(d) / 'minutes.txt'; log.write_text('05_finetune A 600\n03_nullspace B 60\n')
    test_fail(lambda: write_minutes(log, d), contains='no total line')
    log.write_text('05_finetune A 600\n03_nullspace B 60\n04a B 120\ntotal - 630\n')
    txt = write_minutes(log, d).read_text()
    assert '**10.5 min**' in txt and '| 05_finetune | A | 10.0 |' in txt and '| B | 3.0 |' in txt
test_eq([k for k in PAPER_ARTIFACTS if writer(k) is None], [])  # every artifact of the paper has its run


# %% [markdown]
# ## README from `nbs/index.ipynb`
# Quarto (which `nbdev_readme` needs) cannot be installed everywhere, so the README is rendered here: the index
# notebook is executed with papermill and its markdown cells, code and printed output are written as markdown. Cells
# that start with a `#|` directive (`#| hide`, `#| export`) are left out; a cell marked `#| echo: false` contributes
# its output without its code, and an output in markdown (`IPython.display.Markdown`) is written as markdown, so a
# cell can generate a table of the README. What a cell writes to stderr (warnings of the tools it imports, such as
# tqdm's `TqdmWarning` in a kernel without ipywidgets, with the path of the machine's `.venv`) is left out: it is
# the tools' talk, not the README's.

# %%
#| export
def _echo_false(src: str) -> bool:
    "Whether the cell's leading `#|` directives include `echo: false`."
    lines = [l[2:].strip() for l in src.splitlines() if l.startswith('#|')]
    return any(l.replace(' ', '') == 'echo:false' for l in lines)

def _outputs_markdown(outputs: list[dict]) -> list[str]:
    "Markdown outputs as they are, the text ones (stdout, plain reprs) together in one fence; stderr (tools' warnings) left out."
    outputs = [o for o in outputs if not (o.get('output_type') == 'stream' and o.get('name') == 'stderr')]
    md = [''.join(o['data']['text/markdown']).strip() for o in outputs if 'text/markdown' in o.get('data', {})]
    text = ''.join(''.join(o.get('text', '')) or ''.join(o.get('data', {}).get('text/plain', ''))
                   for o in outputs if 'text/markdown' not in o.get('data', {}))
    text = '\n'.join(l for l in text.split('\n') if not l.startswith('[IPKernelApp]'))  # the kernel's own log, not the cell's
    return md + ([f'```\n{text.rstrip()}\n```'] if text.strip() else [])

def notebook_markdown(nb: dict) -> str:
    "Markdown of an executed notebook: markdown cells as is, code cells fenced with their output; `#| echo: false`: output only."
    parts = []
    for c in nb['cells']:
        src = ''.join(c['source']).strip()
        if c['cell_type'] == 'markdown': parts.append(src)
        elif c['cell_type'] == 'code' and src and (not src.startswith('#|') or _echo_false(src)):
            if not src.startswith('#|'): parts.append(f'```python\n{src}\n```')
            parts += _outputs_markdown(c.get('outputs', []))
    return '\n\n'.join(parts) + '\n'

README_MUST = ('make install', 'make test', 'papermill nbs/05_finetune.ipynb -p eps 0.03')  # the set-up and main-job commands
HEADLINE = 'reports/reproduction/headline.md'  # the study's finding in words and numbers (notebook 11, `make study`)
_MACHINE_PATH = re.compile(r'(?<![\w.~:/\])>-])/[A-Za-z_][\w.-]*/')  # /work/…, /home/…: not 1/255, https://, a/b/
_TOOL_TALK = re.compile(r'\w*Warning\b|warnings\.warn|site-packages|Traceback \(most recent')

def readme_problems(
    text: str,  # the README as markdown
    must: tuple[str, ...] | None = None,  # strings its first `head` lines hold; None: README_MUST and the headline's first line
    head: int = 40,  # one screen
) -> list[str]:
    "Why a README does not answer on one screen: a `must` missing from its first lines, a machine path, a tool's warning."
    if must is None:
        h = repo_root() / HEADLINE
        finding = h.read_text().strip().splitlines()[:1] if h.exists() else []
        if finding and not re.search(r'\d', finding[0]): return [f'{HEADLINE} states no number']
        must = (*README_MUST, *finding)
    top = '\n'.join(text.splitlines()[:head])
    problems = [f'not in the first {head} lines: {m[:80]!r}' for m in must if m not in top]
    problems += [f'a machine path: {m!r}' for m in dict.fromkeys(_MACHINE_PATH.findall(text))]
    return problems + [f"a tool's warning: {m!r}" for m in dict.fromkeys(_TOOL_TALK.findall(text))]

def render_readme(nb: str | Path = 'nbs/index.ipynb', out: str | Path = 'README.md') -> Path:
    "Execute `nb` (from the repo root), check it with `readme_problems` and write it as markdown to `out`."
    import papermill as pm
    root = repo_root()
    with tempfile.TemporaryDirectory() as d:
        done = pm.execute_notebook(str(root / nb), str(Path(d) / 'index.ipynb'), cwd=str(root), progress_bar=False)
    md = notebook_markdown(done)
    if problems := readme_problems(md): raise ValueError(f'{nb} renders a README with problems: {problems}')
    return atomic_save(md, root / out, lambda o, p: Path(p).write_text(o))


# %%
_nb = {'cells': [{'cell_type': 'markdown', 'source': ['# T']}, {'cell_type': 'code', 'source': ['#| hide\nx=1'], 'outputs': []},
                 {'cell_type': 'code', 'source': ['print(1)'], 'outputs': [{'output_type': 'stream', 'text': ['[IPKernelApp] WARNING | kernel log\n', '1\n']}]}]}
test_eq(notebook_markdown(_nb), '# T\n\n```python\nprint(1)\n```\n\n```\n1\n```\n')  # the kernel's log line left out
_nb['cells'].append({'cell_type': 'code', 'source': ['#| echo: false\nMarkdown("| a |")'], 'outputs': [
    {'output_type': 'execute_result', 'data': {'text/markdown': ['| a |\n', '|---|'], 'text/plain': ['<Markdown>']}}]})
test_eq(notebook_markdown(_nb).split('\n\n')[-1], '| a |\n|---|\n')  # output only, as markdown
_nb['cells'][2]['outputs'].append({'output_type': 'stream', 'name': 'stderr', 'text': ['/x/.venv/lib/tqdm/auto.py:21: TqdmWarning: IProgress not found\n']})
assert 'TqdmWarning' not in notebook_markdown(_nb)  # a tool's warning on stderr stays out of the README

_ok = 'x\nmake install\nmake test\nStudy: NS − plain −0.30 [−0.42, −0.18] points\n' + '\n' * 40 + 'FGSM 1/255, [site](https://a.b/c/), `train/`'
test_eq(readme_problems(_ok, must=('make install', 'make test', 'NS − plain −0.30')), [])
test_eq(readme_problems('\n' * 40 + 'make install', must=('make install',)), ["not in the first 40 lines: 'make install'"])
test_eq(readme_problems('see /work/main/.venv/lib/site-packages/tqdm/auto.py: TqdmWarning', must=()),
        ["a machine path: '/work/'", "a tool's warning: 'site-packages'", "a tool's warning: 'TqdmWarning'"])
test_eq(readme_problems('`/home/me/ns_vit`, ~/x and 8/255', must=()), ["a machine path: '/home/'"])


# %% [markdown]
# ## Executed copies
# The executed copies of the experiment notebooks (`reports/notebooks/`) are read on the site and in reviews, so they
# hold what the notebook says and nothing of the run's machinery: `executed_problems` names the progress-bar output
# (`ns_vit.progress` keeps tqdm's bars out of papermill runs), the warnings Python prints on stderr (`file:line:
# Category: message`, with the path of the file that warned), and any absolute path of the machine that ran it, in the
# outputs or in papermill's record of its input and output paths. Paths under `/tmp/` are a run's temporary folders,
# gone when it ends, and are not counted.

# %%
#| export
_BAR = re.compile(r'\d+%\|[^|\n]*\|\s*\d+/\d+|[\d.]+(?:it/s|s/it)\]')  # a tqdm text bar: ' 40%|████      | 4/10 [00:01<00:01, 3.2it/s]'
_PY_WARNING = re.compile(r'^(\S+):\d+: (\w*Warning): (.{0,60})', re.M)  # a warning as Python prints it

def _temporary(path: str) -> bool:
    "Under /tmp/ or the temporary folder: a run's scratch space, gone when it ends."
    return path.startswith(('/tmp/', tempfile.gettempdir() + os.sep))

def executed_problems(
    nb: dict | str | Path,  # an executed notebook, or its path
) -> list[str]:
    "What an executed notebook should not hold: progress-bar output, a printed warning, a machine's absolute path (not /tmp/)."
    if not isinstance(nb, dict): nb = json.loads(Path(nb).read_text())
    out = []
    for i, c in enumerate(nb['cells']):
        for o in c.get('outputs', []):
            text = ''.join(o.get('text', '')) + ''.join(''.join(v) for k, v in o.get('data', {}).items() if k.startswith('text/'))
            if _BAR.search(text): out.append(f'cell {i}: progress-bar output')
            if o.get('name') == 'stderr': out += [f'cell {i}: a {w.group(2)} from {Path(w.group(1)).name}: {w.group(3)}' for w in _PY_WARNING.finditer(text)]
            out += [f'cell {i}: a machine path {m!r}' for m in _MACHINE_PATH.findall(text) if not _temporary(m)]
    pm = nb.get('metadata', {}).get('papermill', {})
    out += [f'papermill {k}: a machine path {pm[k]!r}' for k in ('input_path', 'output_path') if os.path.isabs(pm.get(k) or '') and not _temporary(pm[k])]
    return list(dict.fromkeys(out))


# %%
_out = lambda **o: {'output_type': 'stream', 'name': 'stdout', 'text': []} | o
_ex = {'metadata': {'papermill': {'input_path': 'nbs/03_nullspace.ipynb', 'output_path': 'reports/notebooks/03_nullspace.ipynb'}},
       'cells': [{'cell_type': 'code', 'source': ['x'], 'outputs': [_out(text=['FGSM 1/255: 47.9% [44.8, 51.0]\n', 'cache in /tmp/tmpab12/x.npy\n'])]}]}
test_eq(executed_problems(_ex), [])  # percentages, fractions and temporary folders are fine
test_eq(executed_problems({'metadata': {'papermill': {'output_path': '/tmp/pytest-1/o.ipynb'}}, 'cells': []}), [])
_ex['cells'][0]['outputs'] += [
    _out(name='stderr', text=['\rdemo:  40%|████      | 4/10 [00:00<00:00, 98.50it/s]']),
    _out(name='stderr', text=['/work/main/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found. Please update jupyter\n']),
    {'output_type': 'execute_result', 'data': {'text/plain': ["PosixPath('/home/me/ns_vit/reports/x/meta.json')"]}}]
_ex['metadata']['papermill']['output_path'] = '/work/runs/05.ipynb'
test_eq(executed_problems(_ex), ['cell 0: progress-bar output', 'cell 0: a TqdmWarning from auto.py: IProgress not found. Please update jupyter',
                                 "cell 0: a machine path '/work/'", "cell 0: a machine path '/home/'", "papermill output_path: a machine path '/work/runs/05.ipynb'"])


# %% [markdown]
# The README's "Public API" table is generated by `api_table` from a list of names with one line each: every name is
# looked up in its module (a console script among the installed entry points), so a renamed or removed function fails
# the README's rendering instead of leaving a stale row.

# %%
#| export
def api_table(
    entries: dict[str, list[tuple[str, str]]],  # module under ns_vit -> [(name, what it does)]; 'ns-vit-…' names a console script
) -> str:
    "A markdown table module | name | what it does, after checking that every name exists."
    import importlib
    from importlib.metadata import entry_points
    scripts = {e.name for e in entry_points(group='console_scripts')}
    rows = ['| module | function | what it does |', '|---|---|---|']
    for mod, items in entries.items():
        m = importlib.import_module(f'ns_vit.{mod}')
        for i, (name, line) in enumerate(items):
            if name.startswith('ns-vit-') and name not in scripts:
                raise ValueError(f'no console script {name!r}: reinstall ns_vit (make install) or fix the API table')
            if not name.startswith('ns-vit-') and not hasattr(m, name):
                raise AttributeError(f'ns_vit.{mod} has no {name!r}: update the API table')
            rows.append(f"| {f'`ns_vit.{mod}`' if i == 0 else ''} | `{name}`{' (CLI)' if name.startswith('ns-vit-') else ''} | {line} |")
    return '\n'.join(rows)


# %%
t = api_table({'stats': [('holm', 'Holm-adjusted p-values'), ('paired_table', 'a table for display')], 'evaluate': [('ns-vit-evaluate', 'score a model')]})
test_eq(t.splitlines()[2:], ['| `ns_vit.stats` | `holm` | Holm-adjusted p-values |', '|  | `paired_table` | a table for display |',
                             '| `ns_vit.evaluate` | `ns-vit-evaluate` (CLI) | score a model |'])
test_fail(lambda: api_table({'stats': [('no_such_function', '')]}), contains='update the API table')
test_fail(lambda: api_table({'stats': [('ns-vit-nothing', '')]}), contains='no console script')


# %% [markdown]
# The README's results table is `arms_table`: a few columns of a long table of accuracies with intervals (the
# reproduction study's `arms.csv`), arms as rows under short labels, and a last row with the sample sizes behind each
# column, so that the numbers a reader meets first carry their intervals and sizes and come from the committed report.

# %%
#| export
def arms_table(
    csv: str | Path,  # long table: arm, metric, value, ci_low, ci_high, seeds, images (a `cell` column is optional)
    arms: dict[str, str],  # arm -> row label, in order
    metrics: dict[str, str],  # metric -> column label, in order
    cell: str | None = None,  # only this cell's rows
) -> str:
    "Markdown: accuracy in percent with its 95% interval, arms × metrics, and a row of seeds × images per column."
    import pandas as pd
    from ns_vit.stats import fmt_ci
    df = pd.read_csv(csv)
    if cell is not None: df = df[df['cell'] == cell]
    rows = {(r.arm, r.metric): r for r in df.itertuples()}
    missing = [(a, m) for a in arms for m in metrics if (a, m) not in rows]
    if missing: raise ValueError(f'{csv} has no rows for {missing}' + (f' in cell {cell!r}' if cell else ''))
    lines = ['| | ' + ' | '.join(metrics.values()) + ' |', '|---|' + '---:|' * len(metrics)]
    lines += [f'| {label} | ' + ' | '.join(fmt_ci(r.value, r.ci_low, r.ci_high) for r in (rows[a, m] for m in metrics)) + ' |'
              for a, label in arms.items()]
    sizes = {m: {(rows[a, m].seeds, rows[a, m].images) for a in arms} for m in metrics}
    return '\n'.join(lines + ['| seeds × images | ' + ' | '.join(' or '.join(f'{s} × {i:,}' for s, i in sorted(v)) for v in sizes.values()) + ' |'])


# %%
with tempfile.TemporaryDirectory() as d:
    f = Path(d) / 'arms.csv'
    f.write_text('cell,arm,metric,seeds,images,value,ci_low,ci_high\nc,none,clean,5,10000,0.741,0.740,0.742\nc,ns,clean,5,10000,0.7411,0.7398,0.7423\n'
                 'c,none,pgd_small,5,1000,0.471,0.4657,0.4763\nc,ns,pgd_small,5,1000,0.4694,0.4642,0.4746\nd,ns,clean,1,10,0.1,0.0,0.2\n')
    t = arms_table(f, {'none': 'plain', 'ns': 'NS'}, {'clean': 'clean', 'pgd_small': 'PGD 1/255'}, cell='c')
    test_eq(t.splitlines(), ['| | clean | PGD 1/255 |', '|---|---:|---:|', '| plain | 74.1 [74.0, 74.2] | 47.1 [46.6, 47.6] |',
                             '| NS | 74.1 [74.0, 74.2] | 46.9 [46.4, 47.5] |', '| seeds × images | 5 × 10,000 | 5 × 1,000 |'])
    test_fail(lambda: arms_table(f, {'gaussian': 'G'}, {'clean': 'clean'}, cell='c'), contains="no rows for [('gaussian', 'clean')] in cell 'c'")

# %% [markdown]
# ## Results in plain words
# A comparison of two arms becomes a sentence with its direction: on which columns the first was *better* or *worse*
# than the second (Holm-adjusted p below 0.05 over that comparison's columns), by how many points, with the interval;
# and on which it showed no difference after that correction (an unadjusted interval may still exclude 0). Every column of the study is an accuracy, so higher is better.
# `study_headline` builds the study's finding from its paired table (`paired_raw.csv` of notebook 11) and
# `write_headline` writes it to the report's `headline.md`, which leads the README's results and the site's home page.
#

# %%
#| export
METRIC_NAMES = {'clean': 'clean accuracy', 'fgsm_small': 'FGSM 1/255', 'pgd_small': 'PGD 1/255', 'fgsm': 'FGSM', 'pgd': 'PGD',
                'damagenet': 'DamageNet-style transfer', 'cifar10_c': 'CIFAR-10-C', 'imagenet_c': 'ImageNet-C'}  # words for columns
ARM_LABELS = {'none': 'plain finetuning', 'gaussian': 'norm-matched Gaussian noise', 'ns': 'NS finetuning',
              'ns-fixed': 'NS with fixed-batch noise', 'base': 'the base model'}  # words for arms

def _join(xs: list[str], word: str = 'or') -> str:
    "'a', 'a or b', 'a, b or c'."
    return xs[0] if len(xs) == 1 else ', '.join(xs[:-1]) + f' {word} ' + xs[-1]

def _num(r) -> str:
    "A difference of proportions in points with its interval: '+0.50 [+0.23, +0.77]'."
    return f"{100 * r['diff']:+.2f} [{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]"

def plain_words(
    q,  # one comparison's rows (DataFrame): metric, diff, ci_low, ci_high, p_holm (proportions)
    a: str,  # the compared arm
    b: str,  # the reference arm
    alpha: float = 0.05,  # level of the Holm-adjusted test
) -> str:
    "One comparison in words with its direction ('was 0.30 points worse than … on …'), then the numbers."
    name = lambda m: METRIC_NAMES.get(m, m)
    sig, rest = q[q.p_holm < alpha], q[q.p_holm >= alpha]
    parts = [f"{100 * abs(r['diff']):.2f} points {'better' if r['diff'] > 0 else 'worse'} on {name(r['metric'])} ({_num(r)})"
             for _, r in sig.iterrows()]
    la, lb = ARM_LABELS.get(a, a), ARM_LABELS.get(b, b)
    if parts: s = f'{la} was ' + parts[0].replace(' on ', f' than {lb} on ', 1) + ''.join(f', and {x}' for x in parts[1:])
    else: s = f"{la} and {lb} did not differ, after Holm's correction, on any of the {len(q)} columns"
    if len(rest) and parts: s += f"; no difference after Holm's correction on {_join([name(m) for m in rest.metric])}"
    if len(rest): s += ' (' + '; '.join(f"{name(r['metric'])} {_num(r)}" for _, r in rest.iterrows()) + ')'
    return s[0].upper() + s[1:] + '.'



# %%
import pandas as pd
_t = pd.DataFrame(dict(metric=['clean', 'cifar10_c', 'pgd_small'], diff=[0.0, -0.003, 0.01], ci_low=[-0.001, -0.0042, 0.002],
                       ci_high=[0.001, -0.0018, 0.018], p_holm=[1.0, 0.001, 0.02]))
test_eq(plain_words(_t, 'ns', 'none'),
        'NS finetuning was 0.30 points worse than plain finetuning on CIFAR-10-C (-0.30 [-0.42, -0.18]), and 1.00 points better '
        'on PGD 1/255 (+1.00 [+0.20, +1.80]); no difference after Holm\'s correction on clean accuracy (clean accuracy +0.00 [-0.10, +0.10]).')
test_eq(plain_words(_t.assign(p_holm=0.5), 'ns', 'gaussian')[:112],
        'NS finetuning and norm-matched Gaussian noise did not differ, after Holm\'s correction, on any of the 3 columns (')


# %%
#| export
def _cell_steps(cell: dict) -> int:
    "Finetuning steps of a study cell (its override, else FinetuneConfig's default)."
    from ns_vit.finetune import FinetuneConfig
    return int(cell.get('overrides', {}).get('steps', FinetuneConfig().steps))

def study_headline(
    paired,  # the study's paired table (DataFrame; notebook 11's paired_raw.csv): cell, model, reference, metric, diff, ci_low, ci_high, p_holm
    cells: dict,  # the study's cells (its meta.json params): name → overrides, arms, seeds
    model: str = 'default',  # the model the study finetuned
    params_m: float | None = None,  # its size in millions of parameters, when known
    other=None,  # another model's paired rows of its first cell (DataFrame), stated after this model's
    other_model: str = '',  # that model's name
    other_seeds: int = 0,  # its seeds per arm
) -> str:
    "The study's finding in plain words with numbers: the first cell's NS against plain finetuning and Gaussian noise, then the other cells."
    comp = lambda cl, a, b: paired[(paired.cell == cl) & (paired.model == a) & (paired.reference == b)]
    cell0 = next(iter(cells))
    vs_none = comp(cell0, 'ns', 'none')
    if not len(vs_none): raise ValueError(f'the paired table has no ns − none rows in the cell {cell0!r}')
    gains = vs_none[(vs_none.p_holm < 0.05) & (vs_none['diff'] > 0) & (vs_none.metric != 'clean')]
    cols = _join([METRIC_NAMES.get(m, m) for m in dict.fromkeys(vs_none.metric)], 'and')
    lead = (f"NS finetuning made the model more robust than plain finetuning on {_join([METRIC_NAMES.get(m, m) for m in gains.metric], 'and')}"
            if len(gains) else 'NS finetuning did not make the model more robust than plain finetuning of the same length')
    size = f', {params_m:.1f} M parameters' if params_m else ''
    s = [f"On the {model} CIFAR-10 ViT{size}, {lead} ({len(cells[cell0]['seeds'])} seeds per arm, {_cell_steps(cells[cell0]):,} "
         f"steps; scored on {cols}; points, 95% intervals over seeds × images, Holm's correction over the columns)."]
    s += [plain_words(comp(cell0, 'ns', ref), 'ns', ref) for ref in ('none', 'gaussian') if len(comp(cell0, 'ns', ref))]
    for cl in [c for c in cells if c != cell0 and len(comp(c, 'ns', 'none'))]:
        s.append(f"In the cell {cl!r} ({_cell_steps(cells[cl]):,} steps, {len(cells[cl]['seeds'])} seeds): "
                 + plain_words(comp(cl, 'ns', 'none'), 'ns', 'none'))
    if other is not None and len(other):
        s.append(f'On the {other_model} model ({other_seeds} seeds per arm): ' + ' '.join(
            plain_words(other[(other.model == 'ns') & (other.reference == ref)], 'ns', ref) for ref in ('none', 'gaussian')
            if ((other.model == 'ns') & (other.reference == ref)).any()))
    return ' '.join(s)

def write_headline(rep: str | Path = 'reports/reproduction') -> str:
    "Regenerate `headline.md` of a study report from its `paired_raw.csv` and `meta.json`; returns the text."
    import pandas as pd
    from ns_vit.models import EMBEDDED_MODELS
    rep = Path(rep) if Path(rep).is_absolute() else repo_root() / rep
    params = json.loads((rep / 'meta.json').read_text())['params']
    card = repo_root() / Path(EMBEDDED_MODELS[params['model']]['checkpoint']).with_suffix('.json') if params['model'] in EMBEDDED_MODELS else None
    size = json.loads(card.read_text()).get('params', 0) / 1e6 if card is not None and card.exists() else None
    other = {}
    if params.get('also'):  # the other model's study, as notebook 11 states it
        o = repo_root() / 'reports' / params['also']; op = json.loads((o / 'meta.json').read_text())['params']; c0 = next(iter(op['cells']))
        other = dict(other=pd.read_csv(o / 'paired_raw.csv').query('cell == @c0'), other_model=op['model'], other_seeds=len(op['cells'][c0]['seeds']))
    text = study_headline(pd.read_csv(rep / 'paired_raw.csv'), params['cells'], params['model'], size, **other)
    (rep / 'headline.md').write_text(text + '\n')
    return text



# %%
_p = pd.concat([_t.assign(cell='default', model='ns', reference='none'), _t.assign(cell='default', model='ns', reference='gaussian', p_holm=0.5),
                _t.assign(cell='dose 4x', model='ns', reference='none', p_holm=0.5)])
_h = study_headline(_p, {'default': dict(overrides={}, seeds=[0, 1]), 'dose 4x': dict(overrides={'steps': 1600}, seeds=[0])}, params_m=1.0)
assert _h.startswith('On the default CIFAR-10 ViT, 1.0 M parameters, NS finetuning made the model more robust than plain finetuning on PGD 1/255 (2 seeds per arm, 400 steps'), _h
assert "In the cell 'dose 4x' (1,600 steps, 1 seeds): NS finetuning and plain finetuning did not differ, after Holm's correction," in _h, _h
test_fail(lambda: study_headline(_p[_p.reference == 'gaussian'], {'default': dict(seeds=[0])}), contains='no ns − none rows')
_h2 = study_headline(_p, {'default': dict(overrides={}, seeds=[0, 1])}, other=_t.assign(model='ns', reference='none'), other_model='vit-ti8', other_seeds=5)
assert _h2.endswith('On the vit-ti8 model (5 seeds per arm): NS finetuning was 0.30 points worse than plain finetuning on CIFAR-10-C '
                    "(-0.30 [-0.42, -0.18]), and 1.00 points better on PGD 1/255 (+1.00 [+0.20, +1.80]); no difference after Holm's "
                    'correction on clean accuracy (clean accuracy +0.00 [-0.10, +0.10]).'), _h2

