# %% [markdown]
# # Finetuning experiments
# > Run folders, the finetuning console script and method comparisons, on top of Algorithm 1 and the evaluation suite.
#
# `ns_vit.finetune` is the algorithm (the config, the losses, the noise rounds and the loop) and imports nothing of the
# evaluation suite; this module is what notebooks and the command line call to *run* it: it loads a base model and data,
# trains into a run folder that is reused once finished, writes the model card, and compares methods on the same test
# images with `ns_vit.evaluate`.
#

# %%
#| default_exp experiments


# %%
#| export
from __future__ import annotations
import argparse, copy, json, math, os, shlex, sys, time
from dataclasses import asdict, replace
from pathlib import Path
import torch
import torch.distributed as dist
from ns_vit.progress import tqdm
from fastcore.basics import IN_NOTEBOOK
from fastcore.docments import docments
from ns_vit.data import load_images, cifar10, image_folder, repo_root
from ns_vit.training import atomic_save, rank_world, claim_run_dir, run_lock, clean_tmp, read_state
from ns_vit.models import PixelViT, accuracy, get_model, save_checkpoint, load_checkpoint, weights_digest, base_card, loader_size, checkpoint_file
from ns_vit.attacks import adversarial_accuracy
from ns_vit.finetune import FinetuneConfig, METHODS, NOISE_SOURCES, finetune
from ns_vit.evaluate import CliHelp, evaluate_models
from ns_vit.cache import save_entry, load_entry


# %%
#| hide
from fastcore.test import test_eq, test_fail
from ns_vit.finetune import noise_variant


# %% [markdown]
# ## Runs: from parameters to a saved model
# `run_finetune` is what the notebook and the `ns-vit-finetune` console script call: it checks the parameters before
# loading anything heavy, loads the base model and data, finetunes (resuming if the run folder holds a state), and
# writes the finetuned weights with their card, and the logs as `metrics.json`, into the run folder. A finished run
# folder is reused as is.

# %%
#| export
def train_data(dataset: str = 'cifar10', train_fraction: float = 0.1, seed: int = 0, *, img_size: int = 224, crop_pct: float = 0.875):
    "The finetuning set: a seeded `train_fraction` of CIFAR-10 train, or of an ImageFolder's `train/` folder loaded at `img_size` (`loader_size(model)`)."
    if not 0 < train_fraction <= 1: raise ValueError(f'train_fraction must be in (0, 1], got {train_fraction}')
    if dataset == 'cifar10':
        ds = cifar10('train')
        return ds.subset(max(1, int(train_fraction * len(ds))), seed)
    root = Path(dataset).expanduser()
    ds = image_folder(root / 'train' if (root / 'train').is_dir() else root, img_size, crop_pct)
    n = max(1, int(train_fraction * len(ds)))
    return torch.utils.data.Subset(ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist())

HELDOUT_SEED = 20_240_501  # one fixed sample of test images measures every run's noise (never the images of `eval_size`)

def run_name(cfg: FinetuneConfig, base_id: str) -> str:
    "The default run folder name: method (and noise loop when not the default stream), ε, config hash, base weights."
    loop = '-fixed' if cfg.method in ('ns', 'gaussian') and cfg.noise_source == 'fixed' else ''
    return f'{cfg.method}{loop}-eps{cfg.eps:g}-{cfg.digest()}-{base_id}'



# %%
from ns_vit.models import weights_digest, create_vit
test_eq(run_name(FinetuneConfig(), 'abc').split('-')[:2], ['ns', 'eps0.03'])
test_eq(run_name(noise_variant('fixed'), 'abc').split('-')[:3], ['ns', 'fixed', 'eps0.03'])
assert run_name(FinetuneConfig(), 'abc') != run_name(noise_variant('fixed'), 'abc')


# %%
#| export
def run_folder(cfg: FinetuneConfig, base_id: str, dataset: str = 'cifar10', runs_root: str = '') -> Path:
    "The run folder `run_finetune` uses for `cfg` on the base weights `base_id` (`weights_digest`) without `out`."
    cfg = replace(cfg, augment=cfg.augment and dataset == 'cifar10')  # as run_finetune trains it
    return (Path(runs_root) if runs_root else repo_root() / 'runs' / 'finetune') / run_name(cfg, base_id)

def run_finished(run_dir: str | Path) -> bool:
    "Whether a run folder holds a finished run (its weights and metrics.json), which `run_finetune` reuses."
    return (Path(run_dir) / 'model.safetensors').exists() and (Path(run_dir) / 'metrics.json').exists()

def run_finetune(cfg: FinetuneConfig, *,
                 model: str = 'default',  # 'default' (embedded CIFAR-10 ViT) or a timm ViT name
                 checkpoint: str = '',  # weights: '' (the model's own), a finetune run folder, a .safetensors or plain state dict (.pth) of --model, or 'hub'
                 dataset: str = 'cifar10',  # 'cifar10' or an ImageFolder root with train/ and val/
                 train_fraction: float = 0.1,  # share of the training set
                 eval_size: int = 500,  # held-out test images for the clean/FGSM curves (0: none)
                 eval_every: int = 100,  # steps between those checks
                 heldout_size: int = 512,  # held-out test images each round's noise is measured on (0: none)
                 out: str = '',  # run folder; '' → <runs_root>/<run_name> (runs/finetune/… by default)
                 device: str = 'cpu',  # 'cpu', 'cuda' or 'cuda:K'
                 quiet: bool = True,  # no progress bars
                 runs_root: str = '',  # folder of run folders; '' → runs/finetune
                 num_workers: int = -1,  # DataLoader workers decoding ImageFolder images (-1: auto)
                 stop_after: int | None = None,  # stop after this many steps, keeping the state (resume: call again without it)
                 ) -> dict:
    "Finetune a base model with `cfg` into a run folder and reuse the folder when it is finished: model, base, logs, done."
    cfg = replace(cfg, augment=cfg.augment and dataset == 'cifar10').validate()  # ImageFolder images come cropped; the caller's cfg is untouched
    base = get_model(model, checkpoint, device)
    size = loader_size(base)  # an image folder is loaded at the model's input size
    data = train_data(dataset, train_fraction, cfg.seed, **size)
    if len(data) < cfg.batch_size: raise ValueError(f'{len(data)} training images, fewer than one batch of {cfg.batch_size}')
    base_id = weights_digest(base)
    run_dir = Path(out) if out else run_folder(cfg, base_id, dataset, runs_root)
    claim_run_dir(run_dir, dict(config=asdict(cfg), base=base_id, model=model, checkpoint=checkpoint,
                                dataset=dataset, train_fraction=train_fraction))
    with run_lock(run_dir):  # another process training this run: wait for it, then reuse its result
        clean_tmp(run_dir)  # temp files of a killed run
        if run_finished(run_dir):
            return dict(model=load_checkpoint(run_dir / 'model.safetensors', device)[0], base=base, run_dir=run_dir,
                        logs=json.loads((run_dir / 'metrics.json').read_text())['logs'], cached=True, done=True)
        check_state(run_dir, cfg)
        val = load_images(dataset, 'test', eval_size, cfg.seed + 1, **size) if eval_size else None
        monitor = (lambda m: dict(val_clean=accuracy(m, *val), val_fgsm=adversarial_accuracy(m, *val, 'fgsm', eps=cfg.adv_eps))) if val else None
        heldout = load_images(dataset, 'test', heldout_size, HELDOUT_SEED, **size)[0] if heldout_size and cfg.method in ('ns', 'gaussian') else None
        num_workers = num_workers if num_workers >= 0 else (0 if dataset == 'cifar10' else min(8, os.cpu_count() or 1))
        t0 = time.time()
        res = finetune(copy.deepcopy(base), data, cfg, run_dir=run_dir, monitor=monitor, eval_every=eval_every,
                       heldout=heldout, quiet=quiet, stop_after=stop_after, num_workers=num_workers)
        if rank_world()[0] == 0 and res['done']:
            save_checkpoint(res['model'], run_dir / 'model.safetensors', _card(res['model'], model, checkpoint, dataset, cfg, train_fraction))
            atomic_save(dict(config=asdict(cfg), logs=res['logs'], wall_time_s=training_seconds(res['logs'], time.time() - t0)),
                        run_dir / 'metrics.json', lambda o, p: Path(p).write_text(json.dumps(o, indent=2)))
            (run_dir / 'state.pt').unlink(missing_ok=True)  # finished: the resume state (weights + optimiser) is no longer needed
    return dict(model=res['model'], base=base, run_dir=run_dir, logs=res['logs'], cached=False, done=res['done'])

def training_seconds(logs: dict, last_sitting_s: float = float('nan')) -> float:
    "A finetuning run's wall time over all its sittings: the logs' `seconds['wall']`, which `finetune` carries across resumes\n"
    "(up to each interrupted sitting's last checkpoint); for logs written before it kept one, the larger of the last sitting's\n"
    "wall time and the summed noise, training and held-out seconds (those were always carried across resumes)."
    sec = (logs or {}).get('seconds', {})
    if 'wall' in sec: return float(sec['wall'])
    parts = sum(float(sec.get(k, 0.0)) for k in ('noise', 'train', 'heldout'))
    return max(parts, last_sitting_s) if last_sitting_s == last_sitting_s else (parts if sec else float('nan'))

def check_state(run_dir: str | Path, cfg: FinetuneConfig) -> None:
    "Before any work: refuse `run_dir/state.pt` saved under another configuration, set an unreadable one aside (`read_state`)."
    if (Path(run_dir) / 'state.pt').exists(): read_state(Path(run_dir) / 'state.pt', cfg, mmap=True)

def _card(m: PixelViT, model: str, checkpoint: str, dataset: str, cfg: FinetuneConfig, train_fraction: float) -> dict:
    "The model card of a finetuned model: base architecture plus how it was finetuned."
    return dict(base_card(model, checkpoint), finetune=asdict(cfg), base_model=model, base_checkpoint=checkpoint, dataset=dataset,
                train_fraction=train_fraction, mean=m.mean.flatten().tolist(), std=m.std.flatten().tolist())



# %% [markdown]
# Bad parameters fail at once with a clear message, before any training:

# %%
test_fail(lambda: run_finetune(FinetuneConfig(method='fgsm')), contains='unknown method')
test_fail(lambda: run_finetune(FinetuneConfig(eps=0)), contains='eps must be > 0')
test_fail(lambda: run_finetune(FinetuneConfig(), model='resnet18'), contains='not a timm VisionTransformer')
test_fail(lambda: run_finetune(FinetuneConfig(), dataset='/nonexistent/imagenet'), contains='does not exist')
test_fail(lambda: run_finetune(FinetuneConfig(), train_fraction=0), contains='train_fraction')
_cfg = FinetuneConfig()
test_fail(lambda: run_finetune(_cfg, dataset='/nonexistent/imagenet'), contains='does not exist')
test_eq(_cfg.augment, True)  # the caller's config is never changed


# %% [markdown]
# ## Run records: results that outlive their run folders
# A run folder holds the finetuned weights; a *run record* holds what a study reads from a run once it has been scored:
# every metric's per-image results with the key they were scored under (weights digest, scoring version, images,
# attack code), the run's noise logs, and measurements added later (the mechanism). Records are small (tens of kB), so
# the study commits them (`reports/ledger/`): a new machine, whose run folders are gone, rebuilds the study's tables
# from them without retraining, and a record whose key differs from today's scoring (other images, other attack code,
# another scoring version) is stale and the run is retrained, never served. A damaged record is reported and ignored.

# %%
#| export
RECORD_FORMAT = 1  # bump when a record's content changes: records of another format are never served

def record_path(ledger: str | Path, run: str) -> Path:
    "The record of run folder name `run` in the ledger folder `ledger`."
    return Path(ledger) / f'{run}.pt'

def save_run_record(ledger: str | Path,  # folder of run records, e.g. reports/ledger
                    run: str,  # the run folder's name (`run_name`: method, ε, config digest, base weights)
                    scores,  # the table `evaluate` returned for the run's model (its `attrs['entries']` are recorded)
                    logs: list,  # the run's logs (metrics.json's `logs`)
                    extra: dict | None = None,  # further measurements, e.g. {'tolerated': {key: {...}}}
                    ) -> Path:
    "Write the record of a finished, scored run atomically (one file, with its sha256)."
    entries = getattr(scores, 'attrs', {}).get('entries')
    if not entries: raise ValueError('scores holds no recorded results: pass the table evaluate() returned')
    return save_entry(dict(run=run, logs=logs, entries=dict(entries), extra=extra or {}), record_path(ledger, run),
                      meta=dict(format=RECORD_FORMAT, run=run))

def load_run_record(ledger: str | Path, run: str, quiet: bool = False) -> dict | None:
    "The record of `run`; None if there is none, or (with a warning unless `quiet`) if it is damaged or of another format."
    return load_entry(record_path(ledger, run), meta=dict(format=RECORD_FORMAT, run=run), quiet=quiet)


# %%
import tempfile, warnings
import pandas as pd
from ns_vit.evaluate import evaluate, evaluate_recorded
from ns_vit.models import create_vit
_m = create_vit('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
_s = evaluate(_m, ['clean'], n=20, quiet=True, cache=False)
with tempfile.TemporaryDirectory() as d:
    test_fail(lambda: save_run_record(d, 'r', pd.DataFrame(), []), contains='no recorded results')
    p = save_run_record(d, 'none-eps0.03-abc-def', _s, [{'step': 1}], extra={'tolerated': {'k': {'norm_at_eps': 1.5}}})
    rec = load_run_record(d, 'none-eps0.03-abc-def')
    test_eq(rec['logs'], [{'step': 1}]); test_eq(rec['extra']['tolerated']['k']['norm_at_eps'], 1.5)
    again = evaluate_recorded(rec['entries'], ['clean'], n=20)  # the table, rebuilt without the model
    test_eq(again[['metric', 'value', 'n']].to_dict('records'), _s[['metric', 'value', 'n']].to_dict('records'))
    assert torch.equal(again.attrs['correct']['clean'], _s.attrs['correct']['clean'])
    test_eq(evaluate_recorded(rec['entries'], ['clean'], n=10), None)  # other images: stale, never served
    test_eq(evaluate_recorded(rec['entries'], ['clean', 'fgsm_small'], n=20), None)  # a metric it lacks
    test_eq(again.attrs['regenerated'], {})  # scored on today's images: nothing flagged
    (meta, res), = rec['entries'].values()
    moved = {'clean': ({**meta, 'data': 'another-digest'}, res)}  # the same key but the images' digest (a set generated elsewhere)
    test_eq(evaluate_recorded(moved, ['clean'], n=20), None)  # strict by default: stale
    served = evaluate_recorded(moved, ['clean'], n=20, regenerated=('clean',))  # allowed for this metric: served, and flagged
    test_eq(served.value.tolist(), _s.value.tolist()); test_eq(served.attrs['regenerated']['clean']['recorded'], 'another-digest')
    test_eq(served.attrs['regenerated']['clean']['today'], meta['data'])
    test_eq(evaluate_recorded({'clean': ({**meta, 'data': 'x', 'seed': 7}, res)}, ['clean'], n=20, regenerated=('clean',)), None)  # anything else differs: stale
    test_eq(load_run_record(d, 'other-run'), None)  # no record
    p.write_bytes(p.read_bytes()[:-10])  # truncated: reported, not served
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); test_eq(load_run_record(d, 'none-eps0.03-abc-def'), None)
    assert any('truncated' in str(x.message) for x in w)


# %% [markdown]
# ## Command line and multi-process runs
# `ns-vit-finetune` exposes `run_finetune` (every `FinetuneConfig` field is a flag). Each flag's help is its field's (or
# `run_finetune` parameter's) trailing comment, read by fastcore's `docments`, so the comment in the code is the one
# description, with the default and, for `method`, `noise_source` and `loss`, the choices (`ns-vit-finetune --help`). Under
# `torchrun --nproc_per_node=K ns-vit-finetune ...` it joins the process group (NCCL on GPUs, gloo on CPUs), each
# rank takes its slice of every batch, and rank 0 writes the outputs.

# %%
#| export
def _bool(s: str) -> bool:
    "argparse type: true/false/1/0 (any case), nothing else."
    v = s.strip().lower()
    if v in ('true', '1'): return True
    if v in ('false', '0'): return False
    raise argparse.ArgumentTypeError(f'expected true, false, 1 or 0, got {s!r}')

def _finite(s: str) -> float:
    "argparse type: a finite float (inf and nan are refused)."
    try: v = float(s)
    except ValueError: raise argparse.ArgumentTypeError(f'{s!r} is not a number') from None
    if not math.isfinite(v): raise argparse.ArgumentTypeError(f'must be a finite number, got {s}')
    return v

def _numbers_joined(argv: list[str]) -> list[str]:
    "`--lr -1e-4` → `--lr=-1e-4`: argparse takes '-1e-4' (a negative number in exponent form) for an option otherwise."
    out = []
    for tok in argv:
        try: number = tok.startswith('-') and math.isfinite(float(tok)) or tok.lower() in ('-inf', '-nan')
        except ValueError: number = False
        if number and out and out[-1].startswith('--') and '=' not in out[-1]: out[-1] += '=' + tok
        else: out.append(tok)
    return out

_TYPES = {bool: _bool, int: int, float: _finite, str: str}
_METAVARS = {_bool: 'BOOL', int: 'INT', _finite: 'FLOAT', str: 'STR'}
# the fields with a fixed set of values; the test below checks each set against `FinetuneConfig.validate`
CHOICES = {'method': METHODS, 'noise_source': NOISE_SOURCES, 'loss': ('clean+noisy', 'noisy')}
RUN_OPTIONS = {'model': str, 'checkpoint': str, 'dataset': str, 'train_fraction': _finite, 'eval_size': int, 'eval_every': int,
               'heldout_size': int, 'out': str, 'device': str, 'num_workers': int, 'stop_after': int}  # `run_finetune`'s, as options
FINETUNE_EXAMPLE = """prints the path of the finetuned model, <out>/model.safetensors (score it with ns-vit-evaluate --checkpoint).

examples:
  ns-vit-finetune --method ns --eps 0.03 --out runs/finetune/my-ns     # Algorithm 1 on the embedded CIFAR-10 ViT
  ns-vit-finetune --method none --out runs/finetune/my-plain            # the plain-finetuning control
  torchrun --nproc_per_node 4 -m ns_vit.experiments --model vit_base_patch16_224 --checkpoint hub --dataset path/to/imagenet --device cuda"""

def option_help(doc: str | None, choices: tuple | None = None) -> str:
    "An option's help from a field's or parameter's comment (docments), with its choices; `%` escaped for argparse."
    if not doc: raise ValueError('an option without a comment: give its field or parameter a trailing # comment')
    return doc.replace('%', '%%') + (f"; choices: {', '.join(choices)}" if choices else '')

def cli_parser() -> argparse.ArgumentParser:
    "The options of `ns-vit-finetune`: every `FinetuneConfig` field, then `run_finetune`'s; each help is its trailing comment."
    p = argparse.ArgumentParser(prog='ns-vit-finetune', description='Nullspace-augmented finetuning of a ViT (Algorithm 1) and its baselines.',
                                epilog=FINETUNE_EXAMPLE, formatter_class=CliHelp)
    g, docs = p.add_argument_group('finetuning (FinetuneConfig)'), docments(FinetuneConfig)
    for k, v in asdict(FinetuneConfig()).items():
        g.add_argument(f'--{k.replace("_", "-")}', type=_TYPES[type(v)], default=v, metavar=type(v).__name__.upper(),
                       help=option_help(docs[k], CHOICES.get(k)))
    g, run = p.add_argument_group('model, data and run folder (run_finetune)'), docments(run_finetune, full=True)
    for k, t in RUN_OPTIONS.items():
        default = ('cuda' if torch.cuda.is_available() else 'cpu') if k == 'device' else run[k]['default']
        g.add_argument(f'--{k.replace("_", "-")}', type=t, default=default, metavar=_METAVARS[t], help=option_help(run[k]['docment']))
    return p

def finetune_command(run_dir: str | Path) -> str:
    "The `ns-vit-finetune` command that starts or resumes the run in `run_dir`: its folder and the options of its run.json that are not defaults."
    spec, run, defaults = json.loads((Path(run_dir) / 'run.json').read_text()), docments(run_finetune, full=True), asdict(FinetuneConfig())
    opts = {k: spec[k] for k in ('model', 'checkpoint', 'dataset', 'train_fraction') if spec[k] != run[k]['default']}
    opts |= {k: v for k, v in spec['config'].items() if k in defaults and v != defaults[k]}
    words = [w for k, v in opts.items() for w in (f'--{k.replace("_", "-")}', str(v).lower() if isinstance(v, bool) else str(v))]
    return shlex.join(['ns-vit-finetune', '--out', str(run_dir), *words])

def main(argv: list[str] | None = None) -> None:
    "Console entry point `ns-vit-finetune`; works alone or under torchrun."
    p = cli_parser()
    a = vars(p.parse_args(_numbers_joined(sys.argv[1:] if argv is None else list(argv))))
    try: cfg = FinetuneConfig(**{k: a.pop(k) for k in asdict(FinetuneConfig())}).validate()
    except (TypeError, ValueError) as e: p.error(str(e))  # exit 2 with the message, before any work
    stop_after = a.pop('stop_after')
    if stop_after is not None and stop_after < 1: p.error(f'--stop-after must be >= 1, got {stop_after}')
    if a['checkpoint'] not in ('', 'hub'):
        try: checkpoint_file(a['checkpoint'])  # a missing file or an unfinished run folder: say so before any work
        except FileNotFoundError as e: p.error(str(e))
    if int(os.environ.get('WORLD_SIZE', 1)) > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if a['device'].startswith('cuda') else 'gloo')
        if a['device'].startswith('cuda'): a['device'] = f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}'
    try:
        r = run_finetune(cfg, **a, stop_after=stop_after, quiet=rank_world()[0] != 0)  # a partial run claims and locks its folder too
        if rank_world()[0] == 0:
            print(f"finetuned model: {r['run_dir'] / 'model.safetensors'}" if r['done'] else
                  f"stopped after {stop_after} steps; the state is in {r['run_dir'] / 'state.pt'}: run again without --stop-after to resume")
    finally:
        if dist.is_initialized(): dist.destroy_process_group()


# %%
import contextlib, io
def cli_error(argv: list[str]) -> str:
    "The message `ns-vit-finetune` exits with (status 2) on `argv`, before any work."
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try: main(argv)
        except SystemExit as e: test_eq(e.code, 2)
        else: raise AssertionError(f'{argv} was accepted')
    return err.getvalue()
assert 'eps must be > 0' in cli_error(['--eps', '0', '--steps', '1'])
assert 'unknown method' in cli_error(['--method', 'fgsm'])
assert "expected true, false, 1 or 0, got 'ture'" in cli_error(['--augment', 'ture'])
assert 'must be a finite number, got inf' in cli_error(['--eps', 'inf']) and 'finite number, got nan' in cli_error(['--eps', 'nan'])
assert 'eps must be > 0' in cli_error(['--eps', '-0.03'])
assert 'lr must be > 0' in cli_error(['--lr', '-1e-4'])  # a negative number in exponent form is a value, not an option
test_eq(_numbers_joined(['--lr', '-1e-4', '--steps', '3']), ['--lr=-1e-4', '--steps', '3'])
test_eq(cli_parser().parse_args(_numbers_joined(['--trades-beta', '-1e-1'])).trades_beta, -0.1)
for k, values in CHOICES.items():  # every listed value is accepted, and nothing else
    for v in values: FinetuneConfig(**{k: v}).validate()
    test_fail(lambda: FinetuneConfig(**{k: 'nonsense'}).validate())
_p = cli_parser(); _help = _p.format_help()
test_eq([a.dest for a in _p._actions if not (a.help or '').strip()], [])  # every option says what it does
assert "'trades'; choices: ns, none, gaussian, madry, trades (default: ns)" in ' '.join(_help.split())  # the field's comment, choices, default
test_eq({a.dest: a.help for a in _p._actions}['noise_stop_window'], docments(FinetuneConfig)['noise_stop_window'])
assert '10% of the loader' in ' '.join(_help.split()) and _help.rstrip().endswith('--dataset path/to/imagenet --device cuda')
test_fail(lambda: option_help(''), contains='trailing # comment')
assert 'checkpoint /nonexistent/base.pth does not exist: pass a finetune run folder' in cli_error(['--checkpoint', '/nonexistent/base.pth'])


# %% [markdown]
# An image folder is loaded at the base model's input size (`loader_size`): the embedded 32-pixel model finetunes on a
# folder of CIFAR-10-class images (which used to be loaded at 224 pixels, so the model refused them). A finished run
# folder is a checkpoint (`get_model(model, run_dir)`, `--checkpoint <run folder>`). An unfinished run folder gives an
# error that prints the command that finishes it, and running that command finishes the run:

# %%
import shlex, tempfile
import numpy as np
from PIL import Image
from ns_vit.data import CIFAR10_CLASSES
from ns_vit.models import DEFAULT_ARCH_KWARGS
_tmp, _rng = Path(tempfile.mkdtemp()), np.random.default_rng(0)
for split in ('train', 'val'):
    for c in CIFAR10_CLASSES:
        (_tmp / 'folder' / split / c).mkdir(parents=True)
        for i in range(2): Image.fromarray(_rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(_tmp / 'folder' / split / c / f'{i}.png')
test_eq(train_data(str(_tmp / 'folder'), 1.0, **loader_size(get_model()))[0][0].shape, (3, 32, 32))
_small = FinetuneConfig(method='none', steps=2, batch_size=4, noise_batch=4, warmup_steps=1)
_kw = dict(dataset=str(_tmp / 'folder'), train_fraction=1.0, eval_size=4, eval_every=1, out=str(_tmp / 'run'), num_workers=0)
test_eq(run_finetune(_small, **_kw, stop_after=1)['done'], False)
_cmd = finetune_command(_tmp / 'run')
_a = vars(cli_parser().parse_args(_numbers_joined(shlex.split(_cmd)[1:])))  # the command holds the run's parameters
test_eq(FinetuneConfig(**{k: _a[k] for k in asdict(_small)}), replace(_small, augment=False))  # (an image folder is not augmented)
test_eq((_a['out'], _a['dataset'], _a['train_fraction']), (_kw['out'], _kw['dataset'], 1.0))
test_fail(lambda: get_model('default', _kw['out']), contains=f'run folder {_tmp / "run"} holds an unfinished run: it has no model.safetensors '
          f'yet (its resume state state.pt is there). Finish it by running the command that started it again, which resumes it: `{_cmd}`')
assert f'holds an unfinished run' in cli_error(['--checkpoint', _kw['out']])  # as the base of another run, before any work
_w1 = torch.load(_tmp / 'run' / 'state.pt', weights_only=True)['logs']['seconds']['wall']  # the first sitting's wall clock
_r = run_finetune(_small, **_kw)  # the same call (or command) finishes it
test_eq(_r['done'], True)
_m = json.loads((_tmp / 'run' / 'metrics.json').read_text())  # its training time counts both sittings
test_eq(_m['wall_time_s'], _m['logs']['seconds']['wall']); assert _m['wall_time_s'] > _w1 > 0
test_eq(training_seconds(dict(seconds=dict(noise=3.0, train=5.0, heldout=1.0)), 4.0), 9.0)  # logs older than the wall clock: the summed parts
test_eq(training_seconds(dict(seconds=dict(noise=1.0, train=2.0)), 7.5), 7.5)  # ... or the last sitting when that is larger
test_eq(weights_digest(get_model('default', _kw['out'])), weights_digest(_r['model']))
test_eq(load_checkpoint(_tmp / 'run' / 'model.safetensors')[1]['arch_kwargs'], DEFAULT_ARCH_KWARGS)  # the card names the architecture


# %% [markdown]
# ## Comparing methods (Tables 3 and 4)
# `compare_methods` finetunes the same base model once per configuration (reusing finished run folders) and evaluates
# the base and every finetuned model on the same test images, attacks and corrupted copies.

# %%
#| export
def compare_methods(configs: dict[str, FinetuneConfig], *, model: str = 'default', checkpoint: str = '',
                    dataset: str = 'cifar10', train_fraction: float = 1.0, suite: str | list[str] = 'cifar10',
                    n: int | dict | None = None, data: dict | None = None, seed: int = 0, device: str = 'cpu',
                    eval_every: int = 0, quiet: bool = True, runs_root: str = '', reference: str = 'base'):
    "Finetune once per labelled config, evaluate base + all models on the same images: (table, runs, results, paired tests)."
    for c in configs.values(): c.validate()  # every config checked before any training
    runs = {label: run_finetune(c, model=model, checkpoint=checkpoint, dataset=dataset, train_fraction=train_fraction,
                                eval_size=0, eval_every=eval_every, device=device, quiet=quiet, runs_root=runs_root)
            for label, c in tqdm(configs.items(), desc='runs', disable=quiet)}
    models = {'base': next(iter(runs.values()))['base'], **{k: r['model'] for k, r in runs.items()}}
    if dataset != 'cifar10': data = {'val': str(Path(dataset) / 'val'), **(data or {})}
    table, results, paired = evaluate_models(models, suite, n, data, seed, reference, quiet)
    return table, runs, results, paired



# %% [markdown]
# Table 3's adversarial rows use the budgets a sweep chose (notebook 07, `make adv-sweep`). `sweep_choice` reads that choice
# back from the sweep's committed table, so a later `make reports` reruns Table 3 at the same budgets (and reuses their run
# folders) instead of falling back to `FinetuneConfig`'s 8/255 × 400 steps.

# %%
#| export
def sweep_choice(path: str | Path,  # a sweep table written by notebook 07 (`sweep.csv`: method, adv_eps, steps, chosen)
                 methods: tuple = ('madry', 'trades'),  # the methods whose chosen budget is wanted
                 ) -> dict[str, dict]:
    "The adversarial-training budgets a sweep chose: method → dict(adv_eps, steps); {} when there is no sweep table."
    import pandas as pd
    path = Path(path)
    if not path.exists(): return {}
    df = pd.read_csv(path)
    missing = {'method', 'adv_eps', 'steps', 'chosen'} - set(df.columns)
    if missing: raise ValueError(f'{path} lacks the columns {sorted(missing)}: rerun the sweep (make adv-sweep)')
    rows = df[df.chosen.astype(str).str.lower().eq('true') & df.method.isin(methods)]
    if rows.method.duplicated().any(): raise ValueError(f'{path} marks several chosen budgets for {sorted(set(rows.method[rows.method.duplicated()]))}')
    return {r.method: dict(adv_eps=float(r.adv_eps), steps=int(r.steps)) for r in rows.itertuples()}



# %%
import tempfile, pandas as pd
with tempfile.TemporaryDirectory() as d:
    f = Path(d) / 'sweep.csv'
    test_eq(sweep_choice(f), {})  # no sweep yet: the config's budget
    pd.DataFrame(dict(method=['madry', 'madry', 'trades', 'trades'], adv_eps=[0.0078, 0.0157, 0.0078, 0.0157], steps=[400, 1600, 400, 400],
                      clean=[.7, .6, .7, .65], chosen=[False, True, True, False])).to_csv(f, index=False)
    test_eq(sweep_choice(f), dict(madry=dict(adv_eps=0.0157, steps=1600), trades=dict(adv_eps=0.0078, steps=400)))
    test_eq(sweep_choice(f, ('madry',)), dict(madry=dict(adv_eps=0.0157, steps=1600)))
    pd.DataFrame(dict(method=['madry'], adv_eps=[0.0078])).to_csv(f, index=False)
    test_fail(lambda: sweep_choice(f), contains='make adv-sweep')


# %% [markdown]
# The sweep is expensive (one 1,600-step PGD-5 run takes about half an hour of a core), so it does two things to cost
# less and to lose nothing. **It prunes by length** (successive halving): the lengths run shortest first, and a method at a
# training ε is trained for the next length only if it kept clean accuracy within `max_clean_drop` of the base at the
# shorter one. Adversarial finetuning for longer at the same ε and peak rate moves further from the base model, so a setting
# that already lost too much is not expected to come back; the settings that run at both lengths show whether that holds
# (`sweep_skip` says why a setting was not trained). **It records every scored setting** in the ledger
# (`reports/ledger/sweep/`, `save_sweep_record`): its selection scores and training curve, keyed by the run folder's name and
# by how the selection was scored, so a machine whose run folders are gone rebuilds the sweep from the records and trains
# again only the chosen settings, which Table 3 scores.

# %%
#| export
SWEEP_FORMAT = 1  # bump when a sweep record's content changes: records of another format are never served

def sweep_skip(method: str,  # the setting's method ('madry' or 'trades')
               adv_eps: float,  # its training ε
               steps: int,  # its length
               scored: list[dict],  # the settings already decided: dicts with method, adv_eps, steps, clean_drop (nan: not trained)
               max_clean_drop: float,  # a setting qualifies when its clean accuracy is within this of the base model's
               ) -> str:
    "'' when the sweep trains this setting; else why not: at the next shorter length the same method and ε lost more than\n"
    "`max_clean_drop` clean accuracy, or was not trained either (successive halving over lengths)."
    shorter = [r for r in scored if r['method'] == method and math.isclose(r['adv_eps'], adv_eps) and r['steps'] < steps]
    if not shorter: return ''
    prev = max(shorter, key=lambda r: r['steps'])
    if math.isnan(prev['clean_drop']): return f"not trained: {prev['steps']} steps at this ε was not trained either"
    if prev['clean_drop'] > max_clean_drop:
        return (f"not trained: at {prev['steps']} steps it already lost {100 * prev['clean_drop']:.1f} clean points "
                f"(more than {100 * max_clean_drop:g})")
    return ''

def _sweep_meta(run: str, select: dict) -> dict: return dict(format=SWEEP_FORMAT, run=run, select=select)

def save_sweep_record(ledger: str | Path,  # folder of run records, e.g. reports/ledger (sweep records go to its sweep/ folder)
                      run: str,  # the run folder's name (`run_name`)
                      select: dict,  # how the selection was scored (images, seed, attack): a record scored otherwise is stale
                      scores: dict,  # the selection scores, e.g. dict(clean=0.71, pgd=0.30)
                      curve: list,  # the run's training curve (metrics.json's logs['eval'])
                      ) -> Path:
    "Write the record of one scored sweep setting atomically (one file, with its sha256)."
    return save_entry(dict(run=run, scores={k: float(v) for k, v in scores.items()}, curve=list(curve)),
                      Path(ledger) / 'sweep' / f'{run}.pt', meta=_sweep_meta(run, select))

def load_sweep_record(ledger: str | Path, run: str, select: dict, quiet: bool = False) -> dict | None:
    "The record of sweep setting `run` scored as `select`; None if there is none, or if it is damaged, stale or of another format."
    return load_entry(Path(ledger) / 'sweep' / f'{run}.pt', meta=_sweep_meta(run, select), quiet=quiet)



# %%
import math
rows = [dict(method='madry', adv_eps=2 / 255, steps=400, clean_drop=0.02), dict(method='madry', adv_eps=8 / 255, steps=400, clean_drop=0.32)]
test_eq(sweep_skip('madry', 2 / 255, 400, [], 0.1), '')  # the shortest length always trains
test_eq(sweep_skip('madry', 2 / 255, 1600, rows, 0.1), '')  # qualified at 400 steps: trained at 1,600
assert 'lost 32.0 clean points' in sweep_skip('madry', 8 / 255, 1600, rows, 0.1)  # lost too much at 400: pruned
test_eq(sweep_skip('trades', 8 / 255, 1600, rows, 0.1), '')  # another method's result decides nothing
rows.append(dict(method='madry', adv_eps=8 / 255, steps=1600, clean_drop=float('nan')))
assert 'not trained either' in sweep_skip('madry', 8 / 255, 3200, rows, 0.1)  # pruned once, pruned for every longer length
assert sweep_skip('madry', 2 / 255, 1600, rows, 0.5) == '' and sweep_skip('madry', 8 / 255, 1600, rows, 0.5) == ''  # the threshold decides
with tempfile.TemporaryDirectory() as d:
    sel = dict(n=1000, seed=7, attack='pgd', eps=8 / 255, steps=10)
    test_eq(load_sweep_record(d, 'madry-x', sel), None)  # no record: train
    p = save_sweep_record(d, 'madry-x', sel, dict(clean=0.7, pgd=0.3), [dict(step=100, val_clean=0.72, val_fgsm=0.4)])
    rec = load_sweep_record(d, 'madry-x', sel)
    test_eq(rec['scores'], dict(clean=0.7, pgd=0.3)); test_eq(rec['curve'][0]['val_fgsm'], 0.4)
    test_eq(load_sweep_record(d, 'madry-x', sel | dict(steps=20), quiet=True), None)  # scored otherwise: stale, never served
    test_eq(load_sweep_record(d, 'madry-y', sel, quiet=True), None)  # another run's name
    p.write_bytes(p.read_bytes()[:-5])
    test_eq(load_sweep_record(d, 'madry-x', sel, quiet=True), None)  # damaged: regenerated, never served


# %%
#| export
#| notest
if __name__ == '__main__' and not IN_NOTEBOOK: main()  # python -m ns_vit.experiments / torchrun -m ns_vit.experiments

