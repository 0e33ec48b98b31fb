# %% [markdown]
# # Evaluation suite
# > One entry point, `evaluate`, scores a model on the paper's §5 robustness suite with a 95% interval on every number.
#
# The suite: clean, Patch-Fool, CW, FGSM, PGD, a DamageNet-style transfer set, common corruptions and the shifted test
# sets a user has; per-image results for paired tests between models, and a cache so nothing is computed twice.
#

# %%
#| default_exp evaluate

# %%
#| export
from __future__ import annotations
import argparse, json, time
import ns_vit.attacks
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import pandas as pd
import torch
from torch import nn, Tensor
from ns_vit.progress import tqdm
from ns_vit.data import cifar10, cache_dir, image_folder
from ns_vit.cache import cached, content_digest, file_digest, folder_digest, jsonable
from ns_vit.models import predict, get_model, weights_digest, loader_size, checkpoint_file, eval_mode
from ns_vit.checks import check_model
from ns_vit.training import atomic_save
from ns_vit.stats import accuracy_ci, mcnemar, mean_ci, fmt_ci, paired_shares
from ns_vit.attacks import run_attack, ATTACK_PRESETS
from ns_vit.corruptions import cifar10_c, load_cifar10c, corruption_accuracy, mce, imagenet_c_accuracy
from ns_vit.shifts import SHIFTS, shift_accuracy
from ns_vit.damagenet import damagenet_cifar10

# %%
from fastcore.test import test_eq, test_close, test_fail
from ns_vit.models import create_vit
import tempfile, os
from ns_vit.cache import load_entry


# %% [markdown]
# The building blocks live in their own notebooks: `06a_attacks` (FGSM, PGD, CW, CW∞, AutoAttack and Patch-Fool),
# `06b_corruptions` (CIFAR-10-C made with CIFAR's own parameters, cached; ImageNet-C loaders and mCE) and `06c_shifts`
# (the DamageNet-style transfer set and the loaders of the shifted test sets). This notebook puts them behind one
# call. `make_attack` and `adversarial_accuracy` are re-exported here for code written against earlier versions.
#
# ## Suites
# A suite is an ordered set of named metrics, each with its kind, its settings and its sample size. The sample sizes
# are chosen from what each metric costs on 2 CPU cores (measured in `reports/benchmarks/`): clean accuracy on all
# 10,000 test images (its 95% interval is ±0.9 points), the L∞ attacks on 1,000 (±3 points at 50%), CW-L2 and
# Patch-Fool on 200 (iterative, 100–250 steps per image; at their standard budgets both fool every image of the default
# model — `reports/attack_budgets` — so their accuracy cannot separate models and more images would not change that:
# the CW column also reports its median L2, which can), CIFAR-10-C on the cached 2,000-image set (75 cells) and the
# transfer set on its cached images. Every model is scored on the *same* images, so differences between models are
# tested per image (McNemar), which is far tighter than the intervals suggest.

# %%
#| export
@dataclass
class Metric:
    "One column of the suite: `kind` ('clean', 'attack', 'transfer', 'corruptions', 'shift'), settings and sample size."
    kind: str
    n: int | None = None  # images scored (None: all the data has)
    settings: dict = field(default_factory=dict)
    label: str = ''  # column label; attacks name themselves with their budget
    needs: str | None = None  # the `data` key of a folder the user must supply (None: data ns_vit has or makes)

def _attack(name: str, preset: str, n: int, **over) -> Metric:
    "An attack metric from `ATTACK_PRESETS[preset][name]`, with overrides."
    return Metric('attack', n, {**ATTACK_PRESETS[preset][name], **over}, needs='val' if preset == 'imagenet' else None)

SUITES = ('cifar10', 'imagenet', 'quick')

def _cifar_suite() -> dict[str, Metric]:
    "The CIFAR-10 metrics, in table order."
    return {'clean': Metric('clean', 10000, label='clean'),
            'patch_fool': _attack('patch_fool', 'cifar10', 200), 'cw': _attack('cw', 'cifar10', 200),
            'patch_fool_mild': _attack('patch_fool_mild', 'cifar10', 200), 'cw_search': _attack('cw_search', 'cifar10', 200),
            'fgsm': _attack('fgsm', 'cifar10', 1000), 'fgsm_small': _attack('fgsm_small', 'cifar10', 1000),
            'pgd': _attack('pgd', 'cifar10', 1000), 'pgd_small': _attack('pgd_small', 'cifar10', 1000),
            'damagenet': Metric('transfer', None, label='DamageNet-style transfer'),
            'cifar10_c': Metric('corruptions', None, label='CIFAR-10-C mean acc')}

def _imagenet_suite() -> dict[str, Metric]:
    "The ImageNet metrics (each reads a folder the user supplies), in the paper's Table 2 order."
    shift = lambda name, key, label: Metric('shift', None, {'shift': key}, label, needs=name)  # data[name]: its folder
    return {'clean': Metric('clean', None, label='clean', needs='val'), 'patch_fool': _attack('patch_fool', 'imagenet', 1000),
            'cw': _attack('cw', 'imagenet', 1000), 'fgsm': _attack('fgsm', 'imagenet', 5000),
            'damagenet': shift('damagenet', 'damagenet_imagenet', 'DamageNet'),
            **{k: shift(k, f'imagenet_{k}', f'ImageNet-{k.upper()}') for k in ('a', 'r', 'v2')},
            'imagenet_c': Metric('corruptions', None, {'preset': 'imagenet'}, 'ImageNet-C mean acc', 'imagenet_c'),
            'sketch': shift('sketch', 'imagenet_sketch', 'ImageNet-Sketch'),
            'stylized': shift('stylized', 'stylized_imagenet', 'Stylized-ImageNet')}

def suite_metrics(suite: str | list[str] = 'cifar10') -> dict[str, Metric]:
    "The metrics of a named suite ('cifar10', 'imagenet', 'quick'), or of one or a list of the CIFAR suite's metric names."
    cifar = _cifar_suite()
    if isinstance(suite, str) and suite in cifar: suite = [suite]  # one metric, e.g. --suite clean
    if isinstance(suite, (list, tuple)):
        bad = [m for m in suite if m not in cifar]
        if bad: raise ValueError(f'unknown metrics {bad}; the CIFAR-10 suite has {list(cifar)}')
        return {m: cifar[m] for m in suite}
    if suite == 'cifar10': return cifar
    if suite == 'quick': return {k: cifar[k] for k in ('clean', 'fgsm_small', 'pgd_small')}
    if suite == 'imagenet': return _imagenet_suite()
    raise ValueError(f'unknown suite {suite!r}: choose one of {SUITES}, or metric names of the CIFAR-10 suite {list(cifar)}')


# %%
m = suite_metrics('cifar10')
test_eq(list(m)[:3], ['clean', 'patch_fool', 'cw'])
assert all(k in m['fgsm'].settings for k in ('attack', 'eps')), m['fgsm'].settings  # every budget is in the settings
assert m['fgsm_small'].settings['eps'] < m['fgsm'].settings['eps']
test_eq(list(suite_metrics(['clean', 'pgd'])), ['clean', 'pgd'])
test_fail(lambda: suite_metrics(['clean', 'mystery']), contains='unknown metrics')
test_fail(lambda: suite_metrics('svhn'), contains='unknown suite')
assert ATTACK_PRESETS['imagenet']['fgsm']['eps'] == 1 / 255  # the RVT / DAT protocol
test_eq(list(suite_metrics('clean')), ['clean'])  # one metric name is a suite of one
test_fail(lambda: suite_metrics('cleen'), contains="'clean', 'patch_fool'")  # the choices are listed
im = suite_metrics('imagenet')
test_eq({k: m.needs for k, m in im.items()}['imagenet_c'], 'imagenet_c'); assert all(m.needs for m in im.values())

# %% [markdown]
# ## Per-image results and their cache
# Each metric yields a per-image correctness vector (for corruptions: the share of the cells each image survives, and
# the per-cell correctness, cells × images); the value, n and interval come from it, and paired tests between models
# use it. Results are cached under `cache_dir()/eval/` with `ns_vit.cache`: the key is the content of everything that
# determines the number: the model's weights, the metric's settings, the sample size and seed, a digest of the data
# it reads (the test images themselves, the DamageNet-style set's images and labels, every corruption file's sha256, a
# user folder's file fingerprint), the attack code's sha256 for attacks, and `EVAL_VERSION`. Every entry is verified on
# read, so re-running a table computes only what changed and never serves a number made from other inputs. The
# entry keeps every per-image vector, so a paired analysis can be recomputed from the cache (`evaluate` again)
# without scoring anything.

# %%
#| export
EVAL_VERSION = 2  # bump when scoring changes: results cached by another version are never served

def model_digest(model: nn.Module) -> str:
    "A 32-character hash of a model's weights and buffers (its normalisation included): part of the evaluation cache's key."
    return weights_digest(model, 32)

def _eval_cached(meta: dict, compute) -> tuple[dict, bool]:
    "(result, served from cache) of one metric, memoised under `cache_dir()/eval/<content digest of meta>.pt`."
    return cached(cache_dir() / 'eval' / f'{content_digest(meta)}.pt', compute, meta=meta)


# %%
import warnings
with tempfile.TemporaryDirectory() as d:
    os.environ['NS_VIT_CACHE'] = d
    calls = []
    f = lambda: calls.append(1) or dict(correct=torch.tensor([True, False]), extra=dict(a=1))
    (r1, hit1), (r2, hit2) = _eval_cached(dict(model='m', data='x'), f), _eval_cached(dict(model='m', data='x'), f)
    test_eq(len(calls), 1); test_eq(r2['correct'], r1['correct']); test_eq((hit1, hit2), (False, True))
    _eval_cached(dict(model='m', data='y'), f); test_eq(len(calls), 2)  # other data content: another entry
    entry, = [p for p in (Path(d) / 'eval').glob('*.pt') if torch.equal(load_entry(p)['correct'], r1['correct'])][:1]
    b = bytearray(entry.read_bytes()); b[-30] ^= 1; entry.write_bytes(bytes(b))  # flip a bit inside the entry
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); r3, hit3 = _eval_cached(dict(model='m', data='x'), f)
    test_eq((hit3, len(calls)), (False, 3)); assert str(entry) in str(w[0].message)
    del os.environ['NS_VIT_CACHE']


# %% [markdown]
# ## Scoring one metric

# %%
#| export
def _test_sample(n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    "The first `n` images of a seeded permutation of CIFAR-10 test: smaller samples are subsets of larger ones."
    ds = cifar10('test')
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n or len(ds)]
    return ds.tensors(idx)

def _inputs(name: str, m: Metric, n: int | None, data: dict, seed: int, quiet: bool, crop_pct: float = 0.875) -> tuple[str, object]:
    "(content digest, loaded inputs or None) of one metric's data (a `val` folder's at `crop_pct`): the digest is part of the evaluation cache's key."
    if m.kind in ('clean', 'attack'):
        if 'val' in data:  # the crop joins the key where it is not the 0.875 that every earlier entry was scored at (their keys stay)
            return folder_digest(data['val']) if crop_pct == 0.875 else content_digest(folder_digest(data['val']), crop_pct), None
        x, y = _test_sample(n, seed)
        return content_digest(x, y), (x, y)
    if m.kind == 'transfer':
        x, y = damagenet_cifar10(n, seed, quiet=quiet) if n else damagenet_cifar10(seed=seed, quiet=quiet)
        return content_digest(x, y), (x, y)
    if m.kind == 'corruptions' and not m.needs:
        cs = load_cifar10c(data['cifar10_c'], n=n, seed=seed) if 'cifar10_c' in data else \
            (cifar10_c(n, seed, quiet=quiet) if n else cifar10_c(seed=seed, quiet=quiet))
        return cs.digest(), cs
    return folder_digest(data[m.needs]), None

def _per_cell(table: pd.DataFrame, per: dict, **extra) -> dict:
    "A corruption result: per-image share of cells survived (n,), per-cell correctness (cells, n), the cell table."
    cells = torch.stack([per[k] for k in per])  # (cells, n) bool
    return dict(correct=cells.float().mean(0), cells_correct=cells, cell_keys=[f'{c}/{s}' for c, s in per],
                cells=table.to_dict('list'), **extra)

def _score(model, name: str, m: Metric, n: int | None, data: dict, seed: int, batch_size: int, quiet: bool, inputs) -> dict:
    "Per-image correctness and extras of one metric (uncached), on `inputs` from `_inputs`."
    size, num_workers = loader_size(model), int(data.get('num_workers', 4))  # image folders at the model's input size
    if m.kind == 'clean':
        if 'val' in data:  # an ImageFolder validation set, decoded by DataLoader workers
            return shift_accuracy(model, _folder_set(data['val'], n, seed, **size), batch_size, num_workers, quiet)
        x, y = inputs
        return dict(correct=predict(model, x, batch_size).argmax(1) == y)
    if m.kind == 'attack':
        x, y = _folder_images(data['val'], n, seed, num_workers, **size) if 'val' in data else inputs
        s = dict(m.settings); attack = s.pop('attack')
        r = run_attack(model, x[:n], y[:n], attack, batch_size=min(batch_size, 250), seed=seed, quiet=quiet, **s)
        return {k: v for k, v in r.items() if k not in ('adv_accuracy', 'n')}
    if m.kind == 'transfer':
        x, y = inputs
        return dict(correct=predict(model, x, batch_size).argmax(1) == y)
    if m.kind == 'corruptions' and m.needs:  # ImageNet-C: mCE against AlexNet's errors beside the mean accuracy
        table, per = imagenet_c_accuracy(model, data[m.needs], n, seed, img_size=size['img_size'], batch_size=batch_size,
                                         num_workers=num_workers, quiet=quiet)
        return _per_cell(table, per, mce=mce(table))
    if m.kind == 'corruptions': return _per_cell(*corruption_accuracy(model, inputs, batch_size, per_image=True, quiet=quiet))
    if m.kind == 'shift':
        info = SHIFTS[m.settings['shift']]
        shift = info.loader(data[m.needs], img_size=size['img_size']) if info.scale == 'imagenet' else info.loader(data[m.needs])
        return shift_accuracy(model, shift, batch_size, num_workers, quiet)
    raise ValueError(f'unknown metric kind {m.kind!r}')

def _folder_set(root, n: int | None, seed: int, img_size: int = 224, crop_pct: float = 0.875):
    "An ImageFolder validation set (loaded at `img_size`, `crop_pct`) as a ShiftSet (all logits), optionally a seeded sample of n images."
    from ns_vit.shifts import ShiftSet
    ds = image_folder(root, img_size, crop_pct)
    if n: ds = torch.utils.data.Subset(ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return ShiftSet('val', ds, None, (), str(root))

def _folder_images(root, n: int | None, seed: int, num_workers: int, **size) -> tuple[Tensor, Tensor]:
    "A seeded sample of n validation images as tensors (attacks need them in memory), decoded by `num_workers` DataLoader workers."
    ds = _folder_set(root, n, seed, **size).dataset
    xs, ys = zip(*torch.utils.data.DataLoader(ds, batch_size=256, num_workers=num_workers))
    return torch.cat(xs), torch.cat(ys)


# %% [markdown]
# ## `evaluate`
# One call per model. `n` caps every metric's sample size (an int ≥ 1) or sets it per metric (a dict); `data` maps
# metric names to the folders of sets that cannot be downloaded here (`{'cifar10_1': '/data/cifar10.1'}`, and for
# the ImageNet suite `val`, `a`, `r`, `v2`, `sketch`, `stylized`, `damagenet`, `imagenet_c`). The request is checked
# before any work (`check_request`: unknown metric names or data keys are errors that list the valid ones, a folder
# that does not exist is named). A metric whose data is missing is not silently dropped: its row says so, with no
# value. The result is a tidy table, one row per metric: value, n, 95% interval, the column label and the settings as
# JSON; `df.attrs['correct']` keeps the per-image results for `paired_tests` (for corruptions the share of cells each
# image survives) and `df.attrs['cells_correct']` the per-cell correctness (cells × images) of the corruption metrics.

# %%
#| export
CIFAR10_SHIFTS = ('cifar10_1', 'cifar10_2', 'cinic10', 'stl10')

class PerImage(dict):
    "Per-image results {metric: (n,) tensor} kept in `df.attrs`; compared by identity, so pandas can concat tables."
    def __eq__(self, other) -> bool: return self is other
    __hash__ = object.__hash__

def data_keys(suite: str | list[str]) -> list[str]:
    "The `data` keys `evaluate` accepts with `suite`: the folders its metrics read, 'val', 'num_workers' and optional sets."
    needs = [m.needs for m in suite_metrics(suite).values() if m.needs]
    extra = [] if suite == 'imagenet' else ['cifar10_c', *CIFAR10_SHIFTS]
    return list(dict.fromkeys(['val', *needs, *extra, 'num_workers']))

def check_request(suite: str | list[str], n: int | dict | None = None, data: dict | None = None) -> dict:
    "Validate a request before any work (suite and metric names, n ≥ 1, data keys and folders); return `data` as a dict."
    metrics, data, valid = suite_metrics(suite), dict(data or {}), data_keys(suite)
    bad = [k for k in data if k not in valid]
    if bad: raise ValueError(f'unknown data keys {bad}; with suite {suite!r} the valid keys are {valid}')
    for k, v in data.items():
        if k == 'num_workers':
            if not str(v).isdigit(): raise ValueError(f'data num_workers must be an integer >= 0, got {v!r}')
        elif not Path(v).expanduser().exists(): raise ValueError(f'data {k}={v}: {v} does not exist; pass the folder that holds it')
    sizes = n if isinstance(n, dict) else {'n': n}
    bad = [k for k in sizes if isinstance(n, dict) and k not in metrics]
    if bad: raise ValueError(f'n has unknown metrics {bad}; the suite has {list(metrics)}')
    for k, v in sizes.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f'{k} must be an integer >= 1 (or None for all images), got {v!r}')
    return data

def evaluate(model: nn.Module, suite: str | list[str] = 'cifar10', n: int | dict | None = None, data: dict | None = None,
             seed: int = 0, batch_size: int = 500, cache: bool = True, quiet: bool = False) -> pd.DataFrame:
    "Score `model` on a robustness suite: one row per metric with value, n, 95% CI and settings."
    known = (1000, 'ImageNet') if suite == 'imagenet' else (None, 'a val folder') if data and 'val' in data else (10, 'CIFAR-10')
    check_model(model, *known)  # a PixelViT with the classes of the data (those of a `val` folder are not known here)
    metrics, data = _planned(suite, n, data)
    digest, out = model_digest(model), _Scores()
    with eval_mode(model):  # the caller's mode comes back on exit, also after an error
        for name, m in (bar := tqdm(metrics.items(), desc='evaluate', disable=quiet)):
            bar.set_postfix_str(name)
            k = _size(n, name, m)
            if m.needs and m.needs not in data: out.missing(name, m); continue
            t0 = time.time()
            data_digest, inputs = _inputs(name, m, k, data, seed, quiet, loader_size(model)['crop_pct'])
            meta = metric_meta(digest, name, m, k, data_digest, seed)
            score = lambda: _score(model, name, m, k, data, seed, batch_size, quiet, inputs)
            r, hit = _eval_cached(meta, score) if cache else (score(), False)
            out.add(name, m, meta, r, hit, time.time() - t0)
    return out.table()

def _planned(suite: str | list[str], n: int | dict | None, data: dict | None) -> tuple[dict[str, Metric], dict]:
    "The metrics `evaluate` scores (the suite's, and the shifted CIFAR-10 test sets the user has) and the checked `data`."
    metrics, data = suite_metrics(suite), check_request(suite, n, data)
    for s in CIFAR10_SHIFTS:  # shifted CIFAR-10 test sets join the CIFAR suite when the user has them
        if s in data: metrics[s] = Metric('shift', None, {'shift': s}, SHIFTS[s].loader.__name__, needs=s)
    return metrics, data

def _size(n: int | dict | None, name: str, m: Metric) -> int | None:
    "The number of images metric `name` is scored on under `evaluate`'s `n`."
    return n.get(name, m.n) if isinstance(n, dict) else (min(n, m.n) if n and m.n else n or m.n)

def metric_meta(digest: str, name: str, m: Metric, k: int | None, data_digest: str, seed: int) -> dict:
    "The key of one metric's result (evaluation cache, run records): weights, scoring version, settings, images and attack code."
    return dict(version=EVAL_VERSION, model=digest, metric=name, kind=m.kind, settings=m.settings, n=k, seed=seed,
                data=data_digest, code=file_digest(ns_vit.attacks.__file__)[:16] if m.kind == 'attack' else '')

class _Scores:
    "The rows and per-image results `evaluate` builds, one metric at a time (also from recorded results)."
    def __init__(self): self.rows, self.correct, self.cells, self.entries = [], PerImage(), PerImage(), PerImage()
    def missing(self, name: str, m: Metric) -> None:
        self.rows.append(dict(metric=name, label=m.label or name, value=float('nan'), n=0, ci_low=float('nan'),
                              ci_high=float('nan'), settings=json.dumps(m.settings), note=f'no data: pass data={{{m.needs!r}: <folder>}}'))
    def add(self, name: str, m: Metric, meta: dict, r: dict, hit: bool, seconds: float) -> None:
        c = r['correct']
        ci = accuracy_ci(c) if c.dtype == torch.bool else mean_ci(c.float().numpy())
        ci['ci_low'], ci['ci_high'] = max(0.0, ci['ci_low']), min(1.0, ci['ci_high'])  # a t-interval can leave [0, 1]
        extras = {q: v for q, v in r.items() if isinstance(v, (int, float, str)) and
                  q not in ('label', 'settings', 'n', 'accuracy', 'adv_accuracy', 'value')}
        self.rows.append(dict(metric=name, label=r.get('label') or m.label or name, value=ci['value'], n=ci['n'],
                              ci_low=ci['ci_low'], ci_high=ci['ci_high'], settings=json.dumps(r.get('settings', m.settings), default=str),
                              seconds=round(seconds, 1), cached=hit, **extras))
        self.correct[name], self.entries[name] = c, (meta, r)
        if 'cells_correct' in r: self.cells[name] = r['cells_correct']  # (cells, n) bool: paired tests per cell
    def table(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows)
        df.attrs['correct'], df.attrs['cells_correct'], df.attrs['entries'] = self.correct, self.cells, self.entries
        return df

def evaluate_recorded(entries: dict,  # {metric: (meta, result)} as in `evaluate(...).attrs['entries']`, e.g. from a run record
                      suite: str | list[str] = 'cifar10', n: int | dict | None = None, data: dict | None = None, seed: int = 0,
                      crop_pct: float = 0.875,  # the model's crop (`loader_size(model)['crop_pct']`)
                      quiet: bool = True,
                      regenerated: tuple = (),  # metrics whose images this machine generates (e.g. 'damagenet'): a record whose key differs
                      # from today's only in those images' digest is served, and flagged in `attrs['regenerated']`
                      ) -> pd.DataFrame | None:
    "`evaluate`'s table rebuilt from recorded results without the model, or None when any metric's key differs from today's (stale)."
    metrics, data = _planned(suite, n, data)
    digests = {meta.get('model') for meta, _ in entries.values()}
    if len(digests) != 1: return None
    digest, out, flagged = digests.pop(), _Scores(), {}
    for name, m in metrics.items():
        k = _size(n, name, m)
        if m.needs and m.needs not in data: out.missing(name, m); continue
        if name not in entries: return None
        meta, r = entries[name]
        then, now = jsonable(meta), jsonable(metric_meta(digest, name, m, k, _inputs(name, m, k, data, seed, quiet, crop_pct)[0], seed))
        if then != now:
            if name not in regenerated or {**then, 'data': None} != {**now, 'data': None}: return None
            flagged[name] = dict(recorded=then.get('data'), today=now.get('data'))  # the same generation, other images
        out.add(name, m, meta, r, True, 0.0)
    table = out.table(); table.attrs['regenerated'] = flagged
    return table


# %% [markdown]
# A tiny random model on a few images runs the whole CIFAR suite path (attacks, corruptions, transfer set) in seconds
# only if the cached sets exist; the unit test below scores the cheap metrics and checks the table's shape,
# intervals and cache, and that a metric without data says so. (The full suite on the default model runs in
# `09_table2_robustness` and in the benchmark.)

# %%
def tiny(**kw):
    torch.manual_seed(0)
    return create_vit('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10, **kw).eval()
with tempfile.TemporaryDirectory() as d:
    os.environ['NS_VIT_CACHE'] = d
    r = evaluate(tiny(), ['clean', 'fgsm_small', 'pgd_small'], n=64, quiet=True)
    test_eq(list(r.metric), ['clean', 'fgsm_small', 'pgd_small']); test_eq(list(r.n), [64, 64, 64])
    assert (r.ci_low <= r.value).all() and (r.value <= r.ci_high).all()
    assert r.value.iloc[2] <= r.value.iloc[1] + 0.1  # PGD at least about as strong as FGSM on the same images
    assert json.loads(r.settings.iloc[1])['eps'] > 0
    r2 = evaluate(tiny(), ['clean', 'fgsm_small', 'pgd_small'], n=64, quiet=True)
    assert r2.cached.all() and (r2.value == r.value).all()  # second call: everything from the cache
    test_eq(r.attrs['correct']['clean'].shape, (64,))
    test_fail(lambda: evaluate(tiny(), 'quick', n=0), contains='n must be an integer >= 1')
    test_fail(lambda: evaluate(tiny(), 'quick', n=-5), contains='n must be an integer >= 1')
    test_fail(lambda: evaluate(tiny(), 'quick', data={'cifar101': d}), contains="valid keys are ['val', 'cifar10_c', 'cifar10_1'")
    test_fail(lambda: evaluate(tiny(), 'quick', data={'cifar10_1': Path(d) / 'nope'}), contains='does not exist')
    del os.environ['NS_VIT_CACHE']

# %% [markdown]
# The ImageNet suite on a fixture: a tiny 1000-class model at 32 px, a validation folder (wnid folders) and an
# ImageNet-V2-style folder of integer class indices; the sets the user did not pass get a "no data" row.

# %%
from PIL import Image
with tempfile.TemporaryDirectory() as d:
    os.environ['NS_VIT_CACHE'] = d
    rng = np.random.default_rng(0)
    for sub, classes in (('val', ('n01440764', 'n01443537')), ('v2', [str(i) for i in range(1000)][:2])):
        for c in classes:
            (Path(d) / sub / c).mkdir(parents=True)
            for i in range(2): Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(Path(d) / sub / c / f'{i}.png')
    torch.manual_seed(0)
    big = create_vit('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=1000).eval()
    ri = evaluate(big, 'imagenet', n={'patch_fool': 2, 'cw': 2, 'fgsm': 4},
                  data={'val': Path(d) / 'val', 'v2': Path(d) / 'v2', 'num_workers': 0}, quiet=True)
    del os.environ['NS_VIT_CACHE']
ri = ri.set_index('metric')
test_eq(ri.loc['clean', 'n'], 4); test_eq(ri.loc['v2', 'n'], 4); test_eq(ri.loc['fgsm', 'n'], 4)
assert ri.loc[['a', 'r', 'sketch', 'stylized', 'imagenet_c', 'damagenet'], 'n'].eq(0).all()
test_eq(ri.loc['imagenet_c', 'note'], "no data: pass data={'imagenet_c': <folder>}")
assert ri.loc['a', 'note'].startswith('no data')
assert json.loads(ri.loc['fgsm', 'settings'])['eps'] == 1 / 255

# %% [markdown]
# A `val` folder is loaded at the model's input size (`loader_size`): a CIFAR-scale model reads a folder of its own
# 32-pixel images whole, so it scores each image as it scores the same image from the CIFAR-10 tensors (the 0.875
# centre crop of ImageNet models would zoom in by 14% and change some predictions).

# %%
from ns_vit.data import CIFAR10_CLASSES
from ns_vit.models import get_model
with tempfile.TemporaryDirectory() as d:
    os.environ['NS_VIT_CACHE'] = d
    x, y = _test_sample(40, 0)
    for i, (img, c) in enumerate(zip(x, y)):
        f = Path(d) / 'val' / CIFAR10_CLASSES[c] / f'{i:02d}.png'; f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.mul(255).round().byte().permute(1, 2, 0).numpy()).save(f)
    base = get_model()
    rv = evaluate(base, 'clean', data={'val': Path(d) / 'val', 'num_workers': 0}, quiet=True)
    del os.environ['NS_VIT_CACHE']
order = torch.tensor(sorted(range(len(y)), key=lambda i: (int(y[i]), i)))  # ImageFolder's order: class folders, then file names
order = order[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]  # the seeded sample `_folder_set` scores
test_eq(rv.attrs['correct']['clean'], predict(base, x[order]).argmax(1) == y[order])
assert 0 < rv.value.iloc[0] < 1


# %% [markdown]
# ## Comparing models
# `paired_tests` compares every model with a reference on each metric, image by image: the difference in accuracy
# with its 95% interval and McNemar's exact p-value (for CIFAR-10-C, whose per-image score is the share of the 75
# cells survived, a paired t-interval). `results_table` lays the tidy results out as the paper's Table 2: one row
# per model, one column per metric, each cell "value [low, high]", and the average over the robustness columns.

# %%
#| export
def paired_tests(results: dict[str, pd.DataFrame], reference: str) -> pd.DataFrame:
    "Per metric, each model minus `reference` on the same images: difference, 95% CI, p-value."
    ref, rows = results[reference].attrs['correct'], []
    for name, df in results.items():
        if name == reference: continue
        for metric, c in df.attrs['correct'].items():
            if metric not in ref or len(ref[metric]) != len(c): continue
            a, b = c, ref[metric]
            t = mcnemar(a, b) if a.dtype == torch.bool else paired_shares(a.float(), b.float())  # never zero width, agrees with its p
            rows.append(dict(model=name, reference=reference, metric=metric, diff=t['diff'], ci_low=t['ci_low'],
                             ci_high=t['ci_high'], p_value=t['p_value'], n=t['n'], significant=t['p_value'] < 0.05))
    return pd.DataFrame(rows)

ROBUSTNESS = ('patch_fool', 'patch_fool_mild', 'cw', 'cw_search', 'fgsm', 'damagenet', 'cifar10_c', 'imagenet_c', 'a', 'v2', 'r', 'sketch', 'stylized') + CIFAR10_SHIFTS

def results_table(results: dict[str, pd.DataFrame], digits: int = 1) -> pd.DataFrame:
    "Table 2 layout: model rows, metric columns 'value [low, high]' (percent), and the average robustness column."
    rows = []
    for name, df in results.items():
        df = df[df.n > 0]
        row = {'model': name}
        for _, r in df.iterrows():
            row[r.label] = fmt_ci(r.value, r.ci_low, r.ci_high, digits=digits)
            if 'median_l2' in r and pd.notna(r.median_l2): row[r.label] += f' (median L2 {r.median_l2:.3f})'
            if 'mce' in r and pd.notna(r.mce): row[r.label] += f' (mCE {100 * r.mce:.1f})'
            if 'median_l2_to_break' in r and pd.notna(r.median_l2_to_break): row[r.label] += f' (median L2 to break {r.median_l2_to_break:.3f})'
        rob = df[df.metric.isin(ROBUSTNESS)]
        row['average (robustness)'] = f'{100 * rob.value.mean():.{digits}f}' if len(rob) else '—'  # a string like the other cells
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs['note'] = AVERAGE_NOTE
    return out

AVERAGE_NOTE = ("average (robustness): the mean accuracy over the row's columns among the paper's Table 2 robustness columns "
                '(Patch-Fool, CW-L2 and their discriminative budgets, FGSM at 8/255 on CIFAR-10 and 1/255 on ImageNet, DamageNet, corruptions as accuracy = 1 − error, '
                'the shifted sets); clean accuracy and the small-budget FGSM/PGD and PGD columns are not averaged.')

def values_table(results: dict[str, pd.DataFrame]) -> pd.DataFrame:
    "Model rows, metric-label columns, numeric accuracies (for plots and further analysis)."
    return pd.DataFrame([{'model': k, **{r.label: r.value for _, r in df[df.n > 0].iterrows()}} for k, df in results.items()])


# %% [markdown]
# The average follows the paper's Table 2 as far as it can be read: the mean of the accuracies of the robustness
# columns (clean excluded). ImageNet-C's column is the mean corruption accuracy over its 75 cells, with a t-interval over
# images of the share of cells each survives (as CIFAR-10-C's: the cells are the same images, so a Wilson interval over
# 75·N images would be far too narrow), and beside it the mCE of Hendrycks & Dietterich, each corruption's error
# normalised by AlexNet's (`corruptions.mce`), lower is better; the accuracy, not the mCE, enters the average, so that
# higher is better everywhere. The paper does not state its formula; this is ours, and the table says so.

# %%
a, b = torch.tensor([True] * 60 + [False] * 40), torch.tensor([True] * 40 + [False] * 60)
def _res(c, v):
    df = pd.DataFrame([dict(metric='fgsm', label='FGSM', value=v, n=100, ci_low=v - .1, ci_high=v + .1)])
    df.attrs['correct'] = PerImage(fgsm=c); return df
pt = paired_tests({'ns': _res(a, .6), 'none': _res(b, .4)}, 'none')
test_eq(len(pt), 1); test_close(pt['diff'].iloc[0], 0.2); assert pt.significant.iloc[0]
tb = results_table({'ns': _res(a, .6), 'none': _res(b, .4)})
test_eq(list(tb.columns), ['model', 'FGSM', 'average (robustness)']); test_eq(tb.FGSM.iloc[0], '60.0 [50.0, 70.0]')
test_eq(tb['average (robustness)'].tolist(), ['60.0', '40.0'])  # printed with the table's digits
test_eq(values_table({'ns': _res(a, .6)}).FGSM.iloc[0], 0.6)
test_eq(len(pd.concat([_res(a, .6), _res(b, .4)])), 2)  # tables with per-image results concatenate
def _shares(v): r = _res(a, v); r.attrs['correct'] = PerImage(cifar10_c=torch.full((50,), v)); return r
for va, p in ((.5, 0.0), (.4, 1.0)):  # per-image shares that differ by the same amount everywhere: certain, either way
    test_eq(paired_tests({'ns': _shares(va), 'none': _shares(.4)}, 'none').set_index('metric').loc['cifar10_c', 'p_value'], p)


# %% [markdown]
# ## Several models at once
# `evaluate_models` scores named models with the same suite, images and seed and returns the Table 2 layout, the
# tidy results and the paired tests against a reference (the first model unless named).

# %%
#| export
def evaluate_models(models: dict[str, nn.Module], suite: str | list[str] = 'cifar10', n: int | dict | None = None,
                    data: dict | None = None, seed: int = 0, reference: str | None = None, quiet: bool = True):
    "(Table 2 layout, {name: tidy results}, paired tests vs `reference`) for several models on the same images."
    results = {k: evaluate(m, suite, n, data, seed, quiet=quiet) for k, m in tqdm(models.items(), desc='models', disable=quiet)}
    ref = reference or next(iter(models))
    return results_table(results), results, paired_tests(results, ref)


# %% [markdown]
# ## Command line: `ns-vit-evaluate`
# ```sh
# ns-vit-evaluate --model default --suite quick --out runs/eval/base        # the embedded default model
# ns-vit-evaluate --checkpoint runs/finetune/<run>/model.safetensors --suite cifar10 --out runs/eval/ns-eps0.03
# ns-vit-evaluate --model vit_small_patch16_224 --checkpoint hub --suite imagenet --device cuda \
#     --data val=/data/imagenet/val a=/data/imagenet-a r=/data/imagenet-r v2=/data/imagenetv2 imagenet_c=/data/imagenet-c --out runs/eval/vits
# ```
# writes `<out>.csv` (tidy) and `<out>.md` (the row as Table 2 shows it); the name keeps its dots (`ns-eps0.03.csv`).
# Everything is checked before the model is loaded: the suite or metric names (with the choices listed), `--n ≥ 1`, the
# `--data` keys the suite reads (a misspelt key is an error listing the valid ones) and that each folder exists.

# %%
#| export
def _positive_int(s: str) -> int:
    "argparse type: an integer >= 1."
    try: v = int(s)
    except ValueError: raise argparse.ArgumentTypeError(f'{s!r} is not an integer') from None
    if v < 1: raise argparse.ArgumentTypeError(f'must be >= 1, got {v}')
    return v

def _sample_size(s: str) -> tuple[str | None, int]:
    "argparse type: `N` (a cap on every metric) or `metric=N`, N >= 1."
    name, _, v = s.rpartition('=')
    return (name or None, _positive_int(v))

def sample_sizes(sizes: list[tuple[str | None, int]] | None, suite: str | list[str]) -> int | dict | None:
    "`evaluate`'s `n` from the CLI's sizes: one cap (int), or per metric (named sizes; the cap or the suite's default for the rest)."
    if not sizes: return None
    named = {k: v for k, v in sizes if k is not None}
    cap = next((v for k, v in reversed(sizes) if k is None), None)
    if not named: return cap
    metrics = suite_metrics(suite)
    bad = [k for k in named if k not in metrics]
    if bad: raise ValueError(f'--n names unknown metrics {bad}; the suite has {list(metrics)}')
    return {k: named.get(k, min(cap, m.n) if cap and m.n else cap or m.n) for k, m in metrics.items()}

class CliHelp(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    "Help that adds each option's default (unless it is empty; floats to 4 digits) and keeps the description and example as written."
    def _get_help_string(self, action: argparse.Action) -> str:
        d = action.default
        if d is argparse.SUPPRESS or d is None or d in ('', []) or '%(default)' in (action.help or ''): return action.help
        shown = f'{d:.4g}' if isinstance(d, float) else str(d)  # 8/255 → 0.03137, not 0.03137254901960784
        return f"{action.help} (default: {shown.replace('%', '%%')})"

EVALUATE_EXAMPLE = """writes <out>.csv (one row per metric: value, n, 95% interval, settings) and <out>.md, and prints the table.

examples:
  ns-vit-evaluate --suite quick --out runs/eval/base      # the embedded default model: clean, FGSM and PGD at 1/255
  ns-vit-evaluate --checkpoint runs/finetune/<run>/model.safetensors --suite cifar10 --out runs/eval/ns"""

def cli_parser() -> argparse.ArgumentParser:
    "The options of `ns-vit-evaluate`, each with its help."
    p = argparse.ArgumentParser(prog='ns-vit-evaluate', description='Score a ViT on the ns_vit robustness suite.',
                                epilog=EVALUATE_EXAMPLE, formatter_class=CliHelp)
    p.add_argument('--model', default='default', help="an embedded CIFAR-10 ViT ('default', 'vit-ti8'; any ns_vit checkpoint) or a timm ViT "
                   "name: the architecture of a plain state dict in --checkpoint")
    p.add_argument('--checkpoint', default='', help="weights: '' (the model's own), a finetune run folder, a .safetensors or plain "
                   "state dict (.pth) of --model, or 'hub' (timm's, for a timm name)")
    p.add_argument('--suite', default='cifar10', help=f"one of {SUITES}, or comma-separated metric names of {list(_cifar_suite())}")
    p.add_argument('--n', nargs='+', type=_sample_size, default=None, metavar='N|METRIC=N',
                   help="a cap on every metric's sample size, and/or metric=N sizes for single metrics (each >= 1); default: the suite's sizes")
    p.add_argument('--data', nargs='*', default=[], metavar='NAME=FOLDER',
                   help='name=folder pairs for sets that must be supplied (e.g. val=, imagenet_c=, cifar10_c=)')
    p.add_argument('--num-workers', '--workers', dest='num_workers', type=int, default=4, help='DataLoader workers decoding image folders')
    p.add_argument('--seed', type=int, default=0, help='seed of the test-image sample, the attacks and the generated corrupted and transfer sets')
    p.add_argument('--out', default='evaluation', help='output name: writes <out>.csv and <out>.md (dots kept)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help="'cpu', 'cuda' or 'cuda:K'")
    return p

def output_paths(out: str | Path) -> tuple[Path, Path]:
    "`<out>.csv` and `<out>.md`, keeping every dot of the name (`ns-eps0.03` → `ns-eps0.03.csv`)."
    out = Path(out)
    if out.suffix in ('.csv', '.md'): out = out.with_suffix('')
    return out.with_name(out.name + '.csv'), out.with_name(out.name + '.md')

def main(argv: list[str] | None = None) -> None:
    "Console entry point `ns-vit-evaluate`: evaluate one model, write `<out>.csv` and `<out>.md`."
    p = cli_parser(); a = p.parse_args(argv)
    bad = [d for d in a.data if '=' not in d]
    if bad: p.error(f'--data takes name=folder pairs, got {bad}')
    data, suite = dict(d.split('=', 1) for d in a.data), a.suite.split(',') if ',' in a.suite else a.suite
    try: n = sample_sizes(a.n, suite); data = check_request(suite, n, data) | {'num_workers': a.num_workers}
    except ValueError as e: p.error(str(e))  # exit 2 with the message, before any work
    if a.checkpoint not in ('', 'hub'):
        try: checkpoint_file(a.checkpoint)  # a missing file or an unfinished run folder
        except FileNotFoundError as e: p.error(str(e))
    model = get_model(a.model, a.checkpoint, a.device)
    df = evaluate(model, suite, n, data, a.seed)
    csv, md_path = output_paths(a.out)
    atomic_save(df, csv, lambda o, p: o.to_csv(p, index=False))
    md = results_table({a.checkpoint or a.model: df}).to_markdown(index=False)
    atomic_save(md, md_path, lambda o, p: Path(p).write_text(o + '\n'))
    print(md)


# %%
import contextlib, io
def cli_error(argv: list[str]) -> str:
    "The message `ns-vit-evaluate` exits with (status 2) on `argv`."
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try: main(argv)
        except SystemExit as e: test_eq(e.code, 2)
        else: raise AssertionError(f'{argv} was accepted')
    return err.getvalue()

with tempfile.TemporaryDirectory() as d:
    test_eq(main(['--suite', 'clean,fgsm_small', '--n', '50', '--out', str(Path(d) / 'r'), '--device', 'cpu']), None)  # exit code 0
    test_eq(list(pd.read_csv(Path(d) / 'r.csv').metric), ['clean', 'fgsm_small']); assert (Path(d) / 'r.md').exists()
    main(['--suite', 'clean', '--n', '20', '--out', str(Path(d) / 'ns-eps0.03'), '--device', 'cpu'])  # one metric; a dot
    test_eq(sorted(f.name for f in Path(d).iterdir()), ['ns-eps0.03.csv', 'ns-eps0.03.md', 'r.csv', 'r.md'])
test_eq(output_paths('runs/x/ns-eps0.01'), (Path('runs/x/ns-eps0.01.csv'), Path('runs/x/ns-eps0.01.md')))
test_eq(output_paths('a/b.csv')[0], Path('a/b.csv'))
assert 'name=folder' in cli_error(['--data', 'oops'])
assert 'must be >= 1, got -5' in cli_error(['--n', '-5']) and 'must be >= 1, got 0' in cli_error(['--n', '0'])
assert "unknown metrics ['pgd_smal']" in cli_error(['--suite', 'quick', '--n', 'pgd_smal=3'])
assert 'must be >= 1, got 0' in cli_error(['--n', 'fgsm=0'])
test_eq(sample_sizes([(None, 50)], 'quick'), 50); test_eq(sample_sizes(None, 'quick'), None)
test_eq(sample_sizes([(None, 50), ('pgd_small', 7)], 'quick'), dict(clean=50, fgsm_small=50, pgd_small=7))
test_eq(sample_sizes([('pgd_small', 7)], 'quick'), dict(clean=10000, fgsm_small=1000, pgd_small=7))  # the rest: suite defaults
test_eq(sample_sizes([(None, 3), ('patch_fool', 1)], 'imagenet')['imagenet_c'], 3)  # sets without a default size: the cap
assert "valid keys are ['val', 'cifar10_c'" in cli_error(['--data', 'cifar101=.'])
assert "unknown metrics ['cleen']" in cli_error(['--suite', 'cleen,fgsm'])
_help = cli_parser().format_help()
test_eq([a.dest for a in cli_parser()._actions if not (a.help or '').strip()], [])  # every option says what it does
assert _help.rstrip().endswith('--suite cifar10 --out runs/eval/ns') and '--seed SEED' in _help and '(default: 0)' in _help

