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
import argparse, copy, json, math, os, sys, time, warnings
from dataclasses import asdict, replace
from pathlib import Path
import torch
from torch import nn
import torch.distributed as dist
from tqdm.auto import tqdm
from fastcore.basics import IN_NOTEBOOK
from ns_vit.data import load_images, cifar10, image_folder, repo_root
from ns_vit.training import atomic_save, rank_world, claim_run_dir, run_lock, clean_tmp
from ns_vit.models import PixelViT, accuracy, get_model, save_checkpoint, load_checkpoint, weights_digest
from ns_vit.attacks import adversarial_accuracy
from ns_vit.finetune import FinetuneConfig, finetune, read_state
from ns_vit.evaluate import evaluate_models


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
def train_data(dataset: str = 'cifar10', train_fraction: float = 0.1, seed: int = 0):
    "The finetuning set: a seeded `train_fraction` of CIFAR-10 train, or of an ImageFolder's `train/` folder."
    if not 0 < train_fraction <= 1: raise ValueError(f'train_fraction must be in (0, 1], got {train_fraction}')
    if dataset == 'cifar10':
        ds = cifar10('train')
        return ds.subset(max(1, int(train_fraction * len(ds))), seed)
    root = Path(dataset).expanduser()
    ds = image_folder(root / 'train' if (root / 'train').is_dir() else root)
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
def run_finetune(cfg: FinetuneConfig, *,
                 model: str = 'default',  # 'default' (embedded CIFAR-10 ViT) or a timm ViT name
                 checkpoint: str = '',  # weights: '' (the default model's), a file, or 'hub'
                 dataset: str = 'cifar10',  # 'cifar10' or an ImageFolder root with train/ and val/
                 train_fraction: float = 0.1,  # share of the training set
                 eval_size: int = 500,  # held-out test images for the clean/FGSM curves (0: none)
                 eval_every: int = 100,  # steps between those checks
                 heldout_size: int = 512,  # held-out test images each round's noise is measured on (0: none)
                 out: str = '',  # run folder; '' → <runs_root>/<run_name>
                 device: str = 'cpu', quiet: bool = True, runs_root: str = '',
                 num_workers: int = -1,  # DataLoader workers decoding ImageFolder images (-1: auto)
                 stop_after: int | None = None,  # stop after this many steps, keeping the state (resume: call again without it)
                 ) -> dict:
    "Finetune a base model with `cfg` into a run folder and reuse the folder when it is finished: model, base, logs, done."
    cfg = replace(cfg, augment=cfg.augment and dataset == 'cifar10').validate()  # ImageFolder images come cropped; the caller's cfg is untouched
    base = get_model(model, checkpoint, device)
    data = train_data(dataset, train_fraction, cfg.seed)
    if len(data) < cfg.batch_size: raise ValueError(f'{len(data)} training images, fewer than one batch of {cfg.batch_size}')
    base_id = weights_digest(base)
    run_dir = Path(out) if out else (Path(runs_root) if runs_root else repo_root() / 'runs' / 'finetune') / run_name(cfg, base_id)
    claim_run_dir(run_dir, dict(config=asdict(cfg), base=base_id, model=model, checkpoint=checkpoint,
                                dataset=dataset, train_fraction=train_fraction))
    with run_lock(run_dir):  # another process training this run: wait for it, then reuse its result
        clean_tmp(run_dir)  # temp files of a killed run
        if (run_dir / 'model.safetensors').exists() and (run_dir / 'metrics.json').exists():
            return dict(model=load_checkpoint(run_dir / 'model.safetensors', device)[0], base=base, run_dir=run_dir,
                        logs=json.loads((run_dir / 'metrics.json').read_text())['logs'], cached=True, done=True)
        check_state(run_dir, cfg)
        val = load_images(dataset, 'test', eval_size, cfg.seed + 1) if eval_size else None
        monitor = (lambda m: dict(val_clean=accuracy(m, *val), val_fgsm=adversarial_accuracy(m, *val, 'fgsm', eps=cfg.adv_eps))) if val else None
        heldout = load_images(dataset, 'test', heldout_size, HELDOUT_SEED)[0] if heldout_size and cfg.method in ('ns', 'gaussian') else None
        num_workers = num_workers if num_workers >= 0 else (0 if dataset == 'cifar10' else min(8, os.cpu_count() or 1))
        t0 = time.time()
        res = finetune(copy.deepcopy(base), data, cfg, run_dir=run_dir, monitor=monitor, eval_every=eval_every,
                       heldout=heldout, quiet=quiet, stop_after=stop_after, num_workers=num_workers)
        if rank_world()[0] == 0 and res['done']:
            save_checkpoint(res['model'], run_dir / 'model.safetensors', _card(res['model'], model, checkpoint, dataset, cfg, train_fraction))
            atomic_save(dict(config=asdict(cfg), logs=res['logs'], wall_time_s=time.time() - t0),
                        run_dir / 'metrics.json', lambda o, p: Path(p).write_text(json.dumps(o, indent=2)))
            (run_dir / 'state.pt').unlink(missing_ok=True)  # finished: the resume state (weights + optimiser) is no longer needed
    return dict(model=res['model'], base=base, run_dir=run_dir, logs=res['logs'], cached=False, done=res['done'])

def check_state(run_dir: str | Path, cfg: FinetuneConfig) -> None:
    "Before any work: refuse `run_dir/state.pt` saved under another configuration, set an unreadable one aside (`read_state`)."
    if (Path(run_dir) / 'state.pt').exists(): read_state(Path(run_dir) / 'state.pt', cfg, mmap=True)

def _card(m: PixelViT, model: str, checkpoint: str, dataset: str, cfg: FinetuneConfig, train_fraction: float) -> dict:
    "The model card of a finetuned model: base architecture plus how it was finetuned."
    base_card = load_checkpoint(checkpoint or repo_root() / 'data/default_vit.safetensors')[1] if model == 'default' else \
        dict(arch=model, arch_kwargs={})
    return dict(base_card, finetune=asdict(cfg), base_model=model, base_checkpoint=checkpoint, dataset=dataset,
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
# ## Command line and multi-process runs
# `ns-vit-finetune` exposes `run_finetune` (every `FinetuneConfig` field is a flag). Under
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

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='ns-vit-finetune', description='Nullspace-augmented finetuning of a ViT (Algorithm 1).')
    for k, v in asdict(FinetuneConfig()).items():
        p.add_argument(f'--{k.replace("_", "-")}', type=_TYPES[type(v)], default=v, metavar=type(v).__name__.upper())
    p.add_argument('--model', default='default'); p.add_argument('--checkpoint', default='')
    p.add_argument('--dataset', default='cifar10'); p.add_argument('--train-fraction', type=_finite, default=0.1)
    p.add_argument('--eval-size', type=int, default=500); p.add_argument('--eval-every', type=int, default=100)
    p.add_argument('--heldout-size', type=int, default=512, help="held-out test images each round's noise is measured on")
    p.add_argument('--out', default=''); p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--num-workers', type=int, default=-1, help='DataLoader workers decoding ImageFolder images (-1: auto)')
    p.add_argument('--stop-after', type=int, default=None, help='stop after this many steps, keeping the state (run again without it to resume)')
    return p

def main(argv: list[str] | None = None) -> None:
    "Console entry point `ns-vit-finetune`; works alone or under torchrun."
    p = _parser()
    a = vars(p.parse_args(_numbers_joined(sys.argv[1:] if argv is None else list(argv))))
    try: cfg = FinetuneConfig(**{k: a.pop(k) for k in asdict(FinetuneConfig())}).validate()
    except (TypeError, ValueError) as e: p.error(str(e))  # exit 2 with the message, before any work
    stop_after = a.pop('stop_after')
    if stop_after is not None and stop_after < 1: p.error(f'--stop-after must be >= 1, got {stop_after}')
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
test_eq(_parser().parse_args(_numbers_joined(['--trades-beta', '-1e-1'])).trades_beta, -0.1)


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



# %%
#| export
#| notest
if __name__ == '__main__' and not IN_NOTEBOOK: main()  # python -m ns_vit.experiments / torchrun -m ns_vit.experiments

