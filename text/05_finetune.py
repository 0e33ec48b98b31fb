# %% [markdown]
# # Nullspace-augmented finetuning
# > Algorithm 1: every `refresh_every` steps learn an ε-noise on fresh training batches, then finetune on clean and noisy inputs.
#
# The noise lies on the boundary of the ε-approximate nullspace, so the nullspace the model tolerates grows. Plain,
# random-noise, PGD-AT and TRADES finetuning run from the same loop as baselines. Running experiments (run folders, the
# command line, method comparisons) is `ns_vit.experiments` (notebook 05a).
#

# %%
#| default_exp finetune

# %%
#| export
from __future__ import annotations
import hashlib, json, math, time
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Callable, Iterator
import torch
from torch import nn, Tensor
import torch.nn.functional as F
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from ns_vit.progress import tqdm
from ns_vit.data import augment
from ns_vit.training import cosine_lr, seed_of, rank_world, step_batches, gather, read_state, save_state  # `read_state` re-exported here (`_all_`)
from ns_vit.models import PixelViT, model_device, frozen
from ns_vit.noise import eps_noise, gaussian_like, embedding_noise, embed_forward, prob_change
from ns_vit.attacks import make_attack
_all_ = ['read_state']


# %%
#| hide
import tempfile, warnings
from fastcore.test import test_eq, test_close, test_fail
from ns_vit.models import create_vit, accuracy
from ns_vit.noise import embed_shape
from ns_vit.data import UInt8Images


# %% [markdown]
# Paper §4 casts robust finetuning as a bi-level problem (Eq. 6–8): the inner level finds noise δ of the largest norm
# that still lies in the ε-approximate nullspace (mean squared change of the probabilities < ε); the outer level
# trains the model to classify correctly with that noise added, which enlarges the approximate nullspace. Algorithm 1
# alternates the two: every `refresh_every` (40) steps a new δ is synthesised with `eps_noise` and the current model,
# then the model trains for `refresh_every` steps on CE(f(x)) + CE(f(x; δ)) — the reference implementation's loss; the
# paper's noisy-only form is `loss='noisy'`.
#
# **How the noise is synthesised.** The paper's equations are missing from our copy, and its text leaves the inner loop
# to the authors' code (the public repository [Liu-Hy/ns-vit](https://github.com/Liu-Hy/ns-vit), `utils.py`,
# `encoder_level_epsilon_noise`, called from `train_single.py` and `hfai/train_hfai.py`), which ns_vit follows by
# default (`noise_source='stream'`): δ ~ U(−lim, lim) is drawn at the start of every round; each descent step draws a
# *fresh* shuffled batch of training images (same data and augmentation as training, the round's own seeded order, no
# image reused within a round while unused ones remain); before descending on it, the mean Σ_k (p_k − p'_k)² of the
# current δ on that batch is measured, and the round stops as soon as it is below ε, so the stop is a test on images
# the noise was never fitted to. The loss is the mean L2 distance between noisy and clean logits (no norm term), with
# AdamW (β1 0.9, weight decay 0.01) and a cosine schedule whose period is 3 passes over the training loader. Under
# DDP every rank descends on its slice of each fresh batch and the gradient of δ and the stop statistic are summed over
# ranks (one δ everywhere).
#
# **Departures from the authors' code, and why** (each is a `FinetuneConfig` field whose comment gives the
# reference's value):
# - *Stream batch, and a confirmed stop* (`noise_batch=32`, `noise_stop_images=128`; reference: the training batch,
#   128, and a stop on that batch alone). Each descent step uses 32 fresh images. The authors' rule is kept: the noise
#   returned is the one found inside ε on 128 training images it was never fitted to. When the current δ is inside ε on
#   its fresh batch of 32, the same δ is measured on three further fresh batches, and the round ends only if the mean
#   over those 128 images is below ε (else the descent goes on). Table 5 reports that statistic and its image count per
#   round. On a CPU this costs about half as much per round as descending on 128 images (`make bench`:
#   `reports/benchmarks/ns_vs_plain.md`). `noise_variant('reference')` runs the authors' batch of 128 (its stop batch
#   is then 128 images already); `noise_variant('window')` runs ns_vit's earlier stop, on the mean of the last four
#   batches of 32, each measured on a different iterate of δ: the returned δ was tested on its own 32 images only, and
#   in the committed runs of that rule two rounds stopped with it at 1.2–1.3 ε there.
# - *Start* `lim=4` (reference 3 in the multi-GPU scripts, 1 in `train_single.py`): the default model's patch tokens
#   have norm ≈ 12, and U(−4, 4) starts well outside ε on it; the reference's values are for ImageNet ViTs.
# - *Cap* `noise_max_steps=200` then a bisection down to the ε boundary on the last batch (reference: 3 passes over 10%
#   of the loader, then the noise is used as it is). We prefer that every round's noise is an ε-noise, and log
#   `converged=False` when the cap was hit.
# - *Held-out measurement.* Every round's noise is also measured on a fixed sample of 512 test images, beside a
#   Gaussian noise of the same norm (Table 5): the property that makes it an approximate nullspace *of the model*.
# - *Bugs of the reference not reproduced:* the exact nullspace is the patch embedding's on the flattened C·P²
#   input, not per channel (notebook 03), and FGSM works in pixel space, not on normalised inputs (notebook 06a).
#
# **The fixed-batch variant** (`noise_variant('fixed')`, ns_vit's loop before the stream): one batch of 128 images per
# round, descent on its halves in turn (AdamW lr 0.3, β1 0.85, −0.1·log‖δ‖), stop once that batch is inside ε. Its noise
# fits its batch and does not carry over to unseen images (Table 5's held-out columns); it is kept to compare the two.
#
# ## Configuration
#

# %%
#| export
METHODS = ('ns', 'none', 'gaussian', 'madry', 'trades')
NOISE_SOURCES = ('stream', 'fixed')

@dataclass
class FinetuneConfig:
    "Hyper-parameters of one finetuning run (all methods share the loop, data and schedule)."
    method: str = 'ns'  # 'ns' (Algorithm 1), 'none' (plain), 'gaussian' (norm-matched random noise), 'madry', 'trades'
    eps: float = 0.03  # ε of the approximate nullspace (mean squared change of probabilities); reference 0.01–0.03
    steps: int = 400  # optimiser steps
    batch_size: int = 128  # images per step (global, split across ranks)
    lr: float = 1e-4  # peak AdamW learning rate
    weight_decay: float = 0.05  # AdamW weight decay
    warmup_steps: int = 20  # linear warm-up, then cosine decay to 0
    refresh_every: int = 40  # steps between noise syntheses (Algorithm 1; reference 40)
    noise_source: str = 'stream'  # 'stream': a fresh training batch per descent step, stop tested on it first (reference); 'fixed': one batch a round
    lim: float = 4.0  # start δ ~ U(−lim, lim), drawn every round (reference: 3 multi-GPU, 1 single-GPU; 4 starts outside ε here)
    noise_lr: float = 0.1  # AdamW rate of δ (reference: 0.1 multi-GPU, 0.02 single-GPU)
    noise_beta1: float = 0.9  # AdamW β1 of δ (reference: torch's default 0.9)
    noise_weight_decay: float = 0.01  # AdamW weight decay of δ (reference: torch's default 0.01)
    noise_schedule_steps: int = 1170  # cosine period of the δ rate (reference: 3 passes × 390 batches of CIFAR-10 at 128); 0: constant
    noise_lam: float = 0.0  # λ of the −λ·log‖δ‖ term (reference: 0, no norm term; the paper's Eq. 4 writes one)
    noise_max_steps: int = 200  # cap on descent steps, then δ is scaled down to ε (reference: 3 passes × 10% of the loader = 117)
    noise_batch: int = 32  # images per descent step (stream; reference: the training batch, 128) or in the round's batch (fixed)
    noise_stop_window: int = 1  # stream: the cheap stop test is the mean over the last this many fresh batches (reference: 1; the 'window' variant: 4)
    noise_stop_images: int = 128  # stream: the returned δ itself must be inside ε on at least this many fresh images it was never fitted to (reference: its stop batch of 128; 0: the cheap test alone)
    noise_chunks: int = 1  # fixed: descent steps alternate over this many chunks of the batch, stop confirmed on all
    noise_warm_start: bool = False  # start each round from 1.5 × the previous round's noise instead of U(−lim, lim) (not the reference)
    loss: str = 'clean+noisy'  # 'clean+noisy' (reference code) or 'noisy' (paper's Eq. 8)
    ema_decay: float = 0.0  # EMA of weights used for evaluation and the saved model; 0 disables it
    adv_eps: float = 8 / 255  # L∞ budget of the PGD-AT / TRADES inner attack, pixels in [0, 1]
    adv_steps: int = 5  # steps of that attack
    trades_beta: float = 6.0  # TRADES trade-off β
    augment: bool = True  # random crop + flip on training (and stream) batches (CIFAR-sized tensors)
    seed: int = 0  # seeds data order, augmentation, noise starts and attacks

    def validate(self) -> 'FinetuneConfig':
        "Fail at once, with a clear message, on parameters that cannot work."
        if self.method not in METHODS: raise ValueError(f'unknown method {self.method!r}; choose from {METHODS}')
        if self.noise_source not in NOISE_SOURCES: raise ValueError(f'unknown noise_source {self.noise_source!r}; choose from {NOISE_SOURCES}')
        _check_types(self)
        if self.method in ('ns', 'gaussian') and not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f'eps must be > 0 and finite, got {self.eps}')
        if self.loss not in ('clean+noisy', 'noisy'): raise ValueError(f"loss must be 'clean+noisy' or 'noisy', not {self.loss!r}")
        for k in ('steps', 'batch_size', 'refresh_every', 'noise_batch', 'noise_chunks', 'noise_stop_window'):
            if getattr(self, k) < 1: raise ValueError(f'{k} must be >= 1, got {getattr(self, k)}')
        for k in ('noise_max_steps', 'noise_schedule_steps', 'warmup_steps', 'adv_steps', 'noise_stop_images'):
            if getattr(self, k) < 0: raise ValueError(f'{k} must be >= 0, got {getattr(self, k)}')
        for k in ('lr', 'noise_lr', 'lim'):
            if not (math.isfinite(getattr(self, k)) and getattr(self, k) > 0): raise ValueError(f'{k} must be > 0 and finite, got {getattr(self, k)}')
        if not 0 <= self.ema_decay < 1: raise ValueError(f'ema_decay must be in [0, 1), got {self.ema_decay}')
        return self

    def digest(self) -> str:
        "A short hash of the configuration, naming its run folder."
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

def _check_types(cfg: FinetuneConfig) -> None:
    "Every field holds a value of its declared type (ints accepted for floats), e.g. not the string '0.03' from papermill."
    for k, v in asdict(cfg).items():
        want = type(getattr(FinetuneConfig, k))
        ok = isinstance(v, want) and not (want is int and isinstance(v, bool)) or (want is float and isinstance(v, int) and not isinstance(v, bool))
        if not ok: raise TypeError(f"{k} must be {'an int' if want is int else 'a ' + want.__name__}, got {v!r} ({type(v).__name__})")

# The fixed-batch loop of earlier ns_vit versions, kept as a named variant to compare with the authors' stream.
NOISE_VARIANTS = dict(
    stream={},  # the default: the authors' loop and stop (δ inside ε on 128 fresh images), descending on batches of 32
    reference=dict(noise_batch=128, noise_stop_window=1),  # the stream at the authors' batch: a whole training batch per step
    window=dict(noise_stop_window=4, noise_stop_images=0),  # ns_vit's earlier stop: the mean of the last 4 batches of 32, each on another δ
    fixed=dict(noise_source='fixed', noise_batch=128, noise_lr=0.3, noise_beta1=0.85, noise_chunks=2, noise_lam=0.1,
               noise_weight_decay=0.0, noise_schedule_steps=0),
)

def noise_variant(name: str, **overrides) -> FinetuneConfig:
    "A `FinetuneConfig` of the named noise loop ('stream' or 'fixed') with `overrides` on top."
    if name not in NOISE_VARIANTS: raise ValueError(f'unknown noise variant {name!r}; choose from {tuple(NOISE_VARIANTS)}')
    return FinetuneConfig(**{**NOISE_VARIANTS[name], **overrides}).validate()



# %%
test_eq(FinetuneConfig().validate().method, 'ns')
test_eq(FinetuneConfig().noise_source, 'stream')
test_fail(lambda: FinetuneConfig(method='fgsm').validate(), contains='unknown method')
test_fail(lambda: FinetuneConfig(eps=0).validate(), contains='eps must be > 0')
test_fail(lambda: FinetuneConfig(eps=float('inf')).validate(), contains='eps must be > 0 and finite')
test_fail(lambda: FinetuneConfig(eps=-1, method='gaussian').validate(), contains='eps must be > 0')
test_fail(lambda: FinetuneConfig(eps='0.03').validate(), contains='eps must be a float')  # papermill -p eps with a string
test_fail(lambda: FinetuneConfig(augment='ture').validate(), contains='augment must be a bool')
test_fail(lambda: FinetuneConfig(noise_source='batch').validate(), contains='unknown noise_source')
test_fail(lambda: FinetuneConfig(lr=-1e-4).validate(), contains='lr must be > 0')
test_eq(FinetuneConfig(eps=1).validate().eps, 1)  # an int where a float is declared is fine
assert FinetuneConfig(eps=0.01).digest() != FinetuneConfig().digest()
fixed = noise_variant('fixed', seed=3)
test_eq((fixed.noise_source, fixed.noise_chunks, fixed.seed), ('fixed', 2, 3))
test_fail(lambda: noise_variant('chunked'), contains='unknown noise variant')


# %% [markdown]
# ## Distributed helpers
# The same loop runs on one CPU, one GPU, or many processes under `torchrun` with PyTorch's own DDP: each rank takes its
# slice of every global batch. With the streamed noise (the default, as in the authors' code) every rank descends on its
# own slice of every fresh batch, and the stop statistic and the gradient of δ are summed over ranks, so every rank
# holds the same δ (tested with two gloo processes in `tests/test_noise_ddp.py`). The fixed-batch variant synthesises on
# rank 0 and broadcasts, so its early-stop decision is identical on every rank too.
#

# %%
#| export
def broadcast_noise(delta: Tensor | None, info: dict | None) -> tuple[Tensor, dict]:
    "Send rank 0's noise and its info to every rank (a no-op on one process)."
    if rank_world()[1] == 1: return delta, info
    box = [delta.cpu() if delta is not None else None, info]
    dist.broadcast_object_list(box, src=0)
    return box[0], box[1]



# %% [markdown]
# ## One training step per method
# Every method makes a single forward pass over a concatenated batch (so DDP sees one forward per backward): `ns` and
# `gaussian` stack the clean batch with a copy that gets δ at the patch embedding (a per-sample δ of zeros for the
# clean half); `madry` trains on PGD images; `trades` stacks clean and TRADES-attacked images.

# %%
#| export
def method_loss(model: nn.Module, raw: PixelViT, x: Tensor, y: Tensor, delta: Tensor | None, cfg: FinetuneConfig) -> Tensor:
    "The training loss of `cfg.method` on batch (x, y); `model` may be DDP-wrapped, `raw` is the bare model."
    B = len(x)
    if cfg.method == 'none': return F.cross_entropy(model(x), y)
    if cfg.method in ('ns', 'gaussian'):
        if cfg.loss == 'noisy':
            with embedding_noise(raw, delta): return F.cross_entropy(model(x), y)
        d = torch.cat([torch.zeros_like(delta).expand(B, -1, -1), delta.expand(B, -1, -1)])  # (2B, N, D)
        with embedding_noise(raw, d): logits = model(torch.cat([x, x]))  # (2B, K)
        return F.cross_entropy(logits[:B], y) + F.cross_entropy(logits[B:], y)
    attack = make_attack(raw, 'pgd' if cfg.method == 'madry' else 'tpgd', eps=cfg.adv_eps, steps=cfg.adv_steps)
    attack.set_model_training_mode('eval')
    x_adv = attack(x, y).detach()
    raw.train()
    if cfg.method == 'madry': return F.cross_entropy(model(x_adv), y)
    logits = model(torch.cat([x, x_adv]))  # (2B, K)
    kl = F.kl_div(F.log_softmax(logits[B:], 1), F.softmax(logits[:B], 1), reduction='batchmean')
    return F.cross_entropy(logits[:B], y) + cfg.trades_beta * kl


# %%
torch.manual_seed(0)
_m = create_vit('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
_x, _y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
N, D = embed_shape(_m)
_zero = torch.zeros(1, N, D)
with torch.no_grad():
    ce = F.cross_entropy(_m(_x), _y)
    test_close(method_loss(_m, _m, _x, _y, None, FinetuneConfig(method='none')), ce)
    test_close(method_loss(_m, _m, _x, _y, _zero, FinetuneConfig(method='ns')), 2 * ce, eps=1e-5)  # δ = 0: twice clean CE
    test_close(method_loss(_m, _m, _x, _y, _zero, FinetuneConfig(method='ns', loss='noisy')), ce, eps=1e-5)
    assert method_loss(_m, _m, _x, _y, torch.randn(1, N, D), FinetuneConfig(method='ns')) != 2 * ce
for meth in ('madry', 'trades'):
    l = method_loss(_m, _m, _x, _y, None, FinetuneConfig(method=meth, adv_steps=2))
    assert l.requires_grad and l.item() > 0, meth


# %% [markdown]
# ## The loop
# `finetune` checkpoints its whole state (model, optimiser, scheduler, EMA, δ, step, logs) atomically every
# `refresh_every` steps into `run_dir/state.pt` and resumes from it. Randomness is re-seeded from (seed, step) at every
# step and from (seed, round) at every noise synthesis, so a resumed run replays exactly the steps an uninterrupted run
# would take and ends with the same weights.

# %%
#| export
def noise_batches(data, rnd: int, cfg: FinetuneConfig, num_workers: int = 0) -> Iterator[Tensor]:
    "This rank's slice of round `rnd`'s fresh batches: its own seeded order, no image twice before all are used, augmented as training."
    g = torch.Generator().manual_seed(seed_of(cfg.seed, rnd, 3))
    confirm = -(-cfg.noise_stop_images // cfg.noise_batch)  # batches a confirmation may draw (ceil)
    n_steps = (cfg.noise_max_steps + 1) * max(confirm, 1)  # a draw per descent step, and a confirmation at every one
    for x, _ in step_batches(data, cfg.noise_batch, seed_of(cfg.seed, rnd, 2), 0, n_steps, num_workers):
        yield augment(x, generator=g) if cfg.augment else x  # (b, C, H, W)

def _descent_kwargs(cfg: FinetuneConfig) -> dict:
    "`eps_noise` settings from a config."
    return dict(eps=cfg.eps, lim=cfg.lim, lr=cfg.noise_lr, max_steps=cfg.noise_max_steps, lam=cfg.noise_lam,
                betas=(cfg.noise_beta1, 0.999), weight_decay=cfg.noise_weight_decay, schedule_steps=cfg.noise_schedule_steps)

def synthesize_round(raw: PixelViT, data, rnd: int, cfg: FinetuneConfig, *, prev: Tensor | None = None,
                     num_workers: int = 0) -> tuple[Tensor, dict]:
    "This round's ε-noise (1, N, D) on every rank, streamed or from a fixed batch; norm-matched Gaussian for 'gaussian'."
    g = torch.Generator().manual_seed(seed_of(cfg.seed, rnd, 1))  # the same start on every rank
    warm = 1.5 * prev if cfg.noise_warm_start and cfg.method == 'ns' and prev is not None else None
    if cfg.noise_source == 'stream':  # every rank descends on its slice of the fresh batches
        delta, info = eps_noise(raw, noise_batches(data, rnd, cfg, num_workers), generator=g, init=warm,
                                stop_window=cfg.noise_stop_window, stop_images=cfg.noise_stop_images, distributed=True,
                                **_descent_kwargs(cfg))
    else:  # rank 0 descends on one fixed batch and broadcasts
        delta, info = None, None
        if rank_world()[0] == 0:
            idx = torch.randperm(len(data), generator=g)[:cfg.noise_batch]
            x = gather(data, idx, num_workers)[0]
            delta, info = eps_noise(raw, x, generator=g, init=warm, chunks=cfg.noise_chunks, **_descent_kwargs(cfg))
        delta, info = broadcast_noise(delta, info)
    if cfg.method == 'gaussian': delta = gaussian_like(delta, torch.Generator().manual_seed(seed_of(cfg.seed, rnd, 4)))
    return delta.to(model_device(raw)), info

@torch.no_grad()
def heldout_influence(model: nn.Module, images: Tensor, delta: Tensor, generator: torch.Generator | None = None,
                      batch_size: int = 512) -> dict:
    "mse_prob and prediction-kept rate of `delta` on held-out images, and of a Gaussian noise of the same norm."
    rnd, parts = gaussian_like(delta, generator), []
    with frozen(model):
        for x in images.split(batch_size):  # the clean forward once, for both noises
            p = model(x).softmax(1)  # (b, K)
            parts.append((prob_change(p, embed_forward(model, x, delta).softmax(1)), prob_change(p, embed_forward(model, x, rnd).softmax(1))))
    mean = lambda j, k: torch.cat([q[j][k] for q in parts]).mean().item()
    return dict(heldout_mse_prob=mean(0, 'mse_prob'), heldout_match=mean(0, 'match'),
                gaussian_mse_prob=mean(1, 'mse_prob'), gaussian_match=mean(1, 'match'))



# %%
#| export
def _new_state(model: PixelViT, cfg: FinetuneConfig):
    "Optimiser, scheduler and EMA for a fresh run."
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.steps, cfg.warmup_steps))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay)) if cfg.ema_decay > 0 else None
    return opt, sched, ema

def _load_state(path: Path, model, opt, sched, ema, cfg: FinetuneConfig) -> dict | None:
    "Restore a checkpointed run in place (step, delta, logs); None when there is nothing readable to restore."
    st = read_state(path, cfg, model_device(model))
    if st is None: return None
    model.load_state_dict(st['model']); opt.load_state_dict(st['opt']); sched.load_state_dict(st['sched'])
    if ema is not None: ema.load_state_dict(st['ema'])
    return st

def _save_state(path: Path, model, opt, sched, ema, step, delta, logs, cfg) -> None:
    "Checkpoint the whole run atomically (rank 0 only; `training.save_state`)."
    save_state(path, dict(model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                          ema=ema.state_dict() if ema is not None else None, step=step, delta=delta, logs=logs), cfg)


# %%
#| export
def finetune(model: PixelViT, data, cfg: FinetuneConfig, *,
             run_dir: str | Path | None = None,  # folder of `state.pt`: checkpointed every round, resumed from
             monitor: Callable[[nn.Module], dict] | None = None,  # held-out scores of the model, logged every `eval_every`
             eval_every: int = 0,  # steps between `monitor` calls (0: never)
             heldout: Tensor | None = None,  # held-out images (B, C, H, W): each round's noise is measured on them
             quiet: bool = True, stop_after: int | None = None, num_workers: int = 0) -> dict:
    "Finetune `model` on `data` with `cfg.method` (Algorithm 1 for 'ns'); resumable; returns logs and the final model."
    cfg.validate()
    if len(data) < max(cfg.batch_size, cfg.noise_batch):
        raise ValueError(f'the training set has {len(data)} images, fewer than one batch of {max(cfg.batch_size, cfg.noise_batch)}')
    rank, world = rank_world()
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt, sched, ema = _new_state(model, cfg)
    state_path = Path(run_dir) / 'state.pt' if run_dir else None
    step, delta, logs = 0, None, dict(rounds=[], train=[], eval=[])
    st = _load_state(state_path, model, opt, sched, ema, cfg) if state_path and state_path.exists() else None
    if st is not None: step, delta, logs = st['step'], st['delta'], st['logs']
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=step, desc=f'finetune {cfg.method}', disable=quiet or rank != 0)
    dev = model_device(model)
    batches = step_batches(data, cfg.batch_size, cfg.seed, step, end, num_workers, pin_memory=dev.type == 'cuda')
    timing = logs.setdefault('seconds', dict(noise=0.0, train=0.0, heldout=0.0))
    sitting, wall0 = time.perf_counter(), timing.get('wall', 0.0)  # wall clock over every sitting of a resumed run (to its last checkpoint)
    while step < end:
        if cfg.method in ('ns', 'gaussian') and step % cfg.refresh_every == 0:
            delta = _noise_round(model, data, cfg, step, delta, logs, heldout, num_workers)
        t0 = time.perf_counter()
        torch.manual_seed(seed_of(cfg.seed, step, rank))
        x, y = next(batches)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if cfg.augment: x = augment(x)
        model.train()
        loss = method_loss(net, model, x, y, delta, cfg)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
        if ema is not None: ema.update_parameters(model)
        step += 1; bar.update(1)
        logs['train'].append(dict(step=step, loss=loss.item(), lr=sched.get_last_lr()[0]))
        timing['train'] += time.perf_counter() - t0
        if monitor is not None and eval_every and (step % eval_every == 0 or step == cfg.steps) and rank == 0:
            with frozen(ema.module if ema else model) as m: logs['eval'].append(dict(step=step, **monitor(m)))
        if state_path and (step % cfg.refresh_every == 0 or step == end):
            timing['wall'] = wall0 + time.perf_counter() - sitting
            _save_state(state_path, model, opt, sched, ema, step, delta, logs, cfg)
    timing['wall'] = wall0 + time.perf_counter() - sitting
    bar.close()
    final = ema.module if ema is not None else model
    return dict(logs=logs, model=final.eval(), done=step >= cfg.steps, step=step)

def _noise_round(model, data, cfg: FinetuneConfig, step: int, prev, logs: dict, heldout, num_workers: int) -> Tensor:
    "Synthesise this round's noise, log its info (and its held-out influence, rank 0), time both."
    rnd, timing = step // cfg.refresh_every, logs['seconds']
    t0 = time.perf_counter()
    delta, info = synthesize_round(model, data, rnd, cfg, prev=prev, num_workers=num_workers)
    timing['noise'] += time.perf_counter() - t0
    row = dict(round=rnd, step=step, **info, noise_norm=delta.norm().item())
    if heldout is not None and rank_world()[0] == 0:
        t0 = time.perf_counter()
        row |= heldout_influence(model, heldout.to(model_device(model)), delta, torch.Generator().manual_seed(seed_of(cfg.seed, rnd, 5)))
        timing['heldout'] = timing.get('heldout', 0.0) + time.perf_counter() - t0
    logs['rounds'].append(row)
    return delta



# %% [markdown]
# NS finetuning runs end to end on a toy problem, logs one noise round per `refresh_every` steps with every noise
# inside the ε-nullspace, and every baseline runs from the same loop:

# %%
def _toy(n=64):
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 2
    return UInt8Images((torch.rand(n, 32, 32, 3, generator=g) * 100 + 155 * y[:, None, None, None]).to(torch.uint8), y, ('a', 'b'))
def _tiny():
    torch.manual_seed(0)
    return create_vit('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2)
toy = _toy()
small = dict(steps=6, batch_size=16, refresh_every=3, lr=1e-3, warmup_steps=1, noise_max_steps=20, noise_batch=16, adv_steps=1)
val = toy.tensors()
seen = []
out = finetune(_tiny(), toy, FinetuneConfig(method='ns', **small), monitor=lambda m: dict(val_clean=accuracy(m, *val)),
               eval_every=3, heldout=val[0][:32])
test_eq([r['step'] for r in out['logs']['rounds']], [0, 3])
assert all(r['mse_prob'] < 0.03 for r in out['logs']['rounds'])  # the returned δ's own statistic, capped or not
assert all({'heldout_mse_prob', 'heldout_match', 'gaussian_mse_prob'} <= set(r) for r in out['logs']['rounds'])
test_eq(len(out['logs']['train']), 6); test_eq([e['step'] for e in out['logs']['eval']], [3, 6])
for meth in ('none', 'gaussian', 'madry', 'trades'):
    o = finetune(_tiny(), toy, FinetuneConfig(method=meth, ema_decay=0.9, **small))
    assert math.isfinite(o['logs']['train'][-1]['loss']), meth
o = finetune(_tiny(), toy, noise_variant('fixed', **small))  # the fixed-batch variant runs from the same loop
test_eq(o['logs']['rounds'][0]['images'], 16)
test_fail(lambda: finetune(_tiny(), toy, FinetuneConfig(batch_size=128)), contains='fewer than one batch')
test_fail(lambda: finetune(_tiny(), toy, FinetuneConfig(noise_batch=128, **{k: v for k, v in small.items() if k != 'noise_batch'})),
          contains='fewer than one batch')


# %%
# the stream of a round: this round's own seeded order, no image twice until every image has been used, and the
# same batches when asked again (a resumed run replays it); another round draws another order
cfg_s = FinetuneConfig(noise_batch=16, noise_max_steps=7, noise_stop_images=0, augment=False)
test_eq(len(list(noise_batches(toy, 0, FinetuneConfig(noise_batch=16, noise_max_steps=7, augment=False)))), 8 * 8)  # room to confirm on 128
b0 = list(noise_batches(toy, 0, cfg_s)); b0_again = list(noise_batches(toy, 0, cfg_s)); b1 = list(noise_batches(toy, 1, cfg_s))
test_eq(len(b0), 8)
for a, b in zip(b0, b0_again): test_eq(a, b)
first_pass = torch.cat(b0[:4]).flatten(1)  # 4 batches of 16 = the 64 toy images once each
test_eq(len(torch.unique(first_pass, dim=0)), 64)
assert not torch.equal(b0[0], b1[0])
# each descent step of a streamed round uses one fresh batch: images used = (steps + 1) × batch
r0 = out['logs']['rounds'][0]
# and each time the stop batch says "inside", 7 more fresh batches confirm the same δ on 128 images in all
test_eq(r0['images'], 16 * (r0['steps'] + 1) + 112 * (r0['refused'] + int(r0['converged'])))
assert r0['stop_images'] >= 128 and r0['mse_prob'] < 0.03
# held-out influence: the same numbers as `noise_influence`, with the clean forward computed once for both noises
from ns_vit.noise import noise_influence
_d = torch.randn(1, 16, 32) * 3  # (1, N, D) of the tiny model
h = heldout_influence(out['model'], val[0][:40], _d, torch.Generator().manual_seed(0), batch_size=16)
test_close(h['heldout_mse_prob'], noise_influence(out['model'], val[0][:40], _d)['mse_prob'], eps=1e-6)
test_close(h['gaussian_mse_prob'], noise_influence(out['model'], val[0][:40], gaussian_like(_d, torch.Generator().manual_seed(0)))['mse_prob'], eps=1e-6)


# %% [markdown]
# Resume: a run stopped after 4 of 6 steps (its last checkpoint at step 3 plus the stop) and then resumed ends with
# exactly the weights of an uninterrupted run. (`tests/test_finetune_cli.py` does the same with a real `kill -9`.)

# %%
full = finetune(_tiny(), toy, FinetuneConfig(method='ns', ema_decay=0.5, **small))['model']
with tempfile.TemporaryDirectory() as d:
    finetune(_tiny(), toy, FinetuneConfig(method='ns', ema_decay=0.5, **small), run_dir=d, stop_after=4)
    test_eq(torch.load(Path(d) / 'state.pt', weights_only=True)['step'], 4)
    w1 = torch.load(Path(d) / 'state.pt', weights_only=True)['logs']['seconds']['wall']
    resumed = finetune(_tiny(), toy, FinetuneConfig(method='ns', ema_decay=0.5, **small), run_dir=d)
test_eq(resumed['done'], True)
assert w1 > 0 and resumed['logs']['seconds']['wall'] > w1  # the wall clock runs on over both sittings
for k, v in full.state_dict().items(): test_eq(resumed['model'].state_dict()[k], v)# a truncated state is set aside with a warning and the run starts over (to the same weights); another config's state is refused
with tempfile.TemporaryDirectory() as d:
    cfg_r = FinetuneConfig(method='ns', ema_decay=0.5, **small)
    finetune(_tiny(), toy, cfg_r, run_dir=d, stop_after=3)
    test_fail(lambda: finetune(_tiny(), toy, FinetuneConfig(method='ns', ema_decay=0.5, **(small | dict(lr=2e-3))), run_dir=d), contains='other settings (lr: 0.001 → 0.002)')
    raw = (Path(d) / 'state.pt').read_bytes(); (Path(d) / 'state.pt').write_bytes(raw[:len(raw) // 2])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        again = finetune(_tiny(), toy, cfg_r, run_dir=d)
    assert any('unreadable' in str(x.message) for x in w) and list(Path(d).glob('state.pt.unreadable-*'))
for k, v in full.state_dict().items(): test_eq(again['model'].state_dict()[k], v)


# %% [markdown]
# ## Training dynamics (Figure 4, Table 5)
# The logs of an NS run show the inner problem at work: the norm of the ε-noise found at each round, how many descent
# steps it took to enter the ε-nullspace, and the MSE of probabilities at the early stop; next to them, the held-out
# clean and FGSM accuracy.

# %%
#| export
ROUND_COLUMNS = ['round', 'step', 'noise_norm', 'steps', 'images', 'mse_prob', 'stop_images', 'refused', 'mse_window', 'converged', 'seconds',
                 'heldout_mse_prob', 'heldout_match', 'gaussian_mse_prob', 'gaussian_match']

def rounds_table(logs: dict):
    "Table 5: one row per noise round (norm, descent steps, the returned δ's mse_prob at the stop and its image count, and on held-out images beside Gaussian noise)."
    import pandas as pd
    cols = [c for c in ROUND_COLUMNS if any(c in r for r in logs['rounds'])] or ROUND_COLUMNS[:7]
    return pd.DataFrame(logs['rounds'], columns=cols).rename(columns={'steps': 'steps_to_eps', 'mse_prob': 'stop_mse_prob', 'mse_window': 'stop_window_mse_prob'})

def heldout_summary(logs: dict, eps: float) -> dict:
    "Over the rounds: how often the noise is inside ε (and 1.5 ε) on held-out images; medians of its influence."
    import numpy as np
    r = [x for x in logs['rounds'] if 'heldout_mse_prob' in x]
    if not r: return dict(rounds=0)
    h, g = np.array([x['heldout_mse_prob'] for x in r]), np.array([x['gaussian_mse_prob'] for x in r])
    return dict(rounds=len(r), within_eps=int((h <= eps).sum()), within_1_5eps=int((h <= 1.5 * eps).sum()),
                median_heldout_mse_prob=float(np.median(h)), median_ratio_to_eps=float(np.median(h) / eps),
                median_heldout_match=float(np.median([x['heldout_match'] for x in r])),
                median_gaussian_mse_prob=float(np.median(g)), median_gaussian_match=float(np.median([x['gaussian_match'] for x in r])),
                median_norm=float(np.median([x['noise_norm'] for x in r])))

def plot_dynamics(logs: dict, title: str = '', eps: float | None = None):
    "Figure 4: noise norm per round, its mse_prob at the stop and on held-out images, training loss, held-out accuracy."
    import pandas as pd, matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 4, figsize=(16, 3.2))
    r, t, e = rounds_table(logs), pd.DataFrame(logs['train']), pd.DataFrame(logs['eval'])
    if len(r): axs[0].plot(r.step, r.noise_norm, 'o-')
    axs[0].set(xlabel='step', ylabel='‖δ‖ of the ε-noise', title='tolerated noise norm')
    for c, lab in (('stop_mse_prob', 'at the stop'), ('heldout_mse_prob', 'held-out images'), ('gaussian_mse_prob', 'Gaussian, same norm')):
        if c in r: axs[1].plot(r.step, r[c], 'o-', label=lab)
    if eps: axs[1].axhline(eps, color='k', ls=':', label='ε')
    axs[1].set(xlabel='step', ylabel='mse_prob', title='noise influence', yscale='log'); axs[1].legend(fontsize=7)
    if len(t): axs[2].plot(t.step, t.loss.rolling(10, min_periods=1).mean())
    axs[2].set(xlabel='step', ylabel='train loss (rolling mean)', title='loss')
    for c in ('val_clean', 'val_fgsm'):
        if c in e: axs[3].plot(e.step, e[c], 'o-', label=c.removeprefix('val_'))
    axs[3].set(xlabel='step', ylabel='held-out accuracy', title='accuracy')
    if len(e): axs[3].legend()
    fig.suptitle(title); fig.tight_layout()
    return fig



# %%
import matplotlib.pyplot as plt
test_eq(list(rounds_table(out['logs']).step), [0, 3])
assert {'heldout_mse_prob', 'gaussian_mse_prob', 'stop_mse_prob'} <= set(rounds_table(out['logs']).columns)
s = heldout_summary(out['logs'], 0.03)
test_eq(s['rounds'], 2); assert 0 <= s['within_eps'] <= s['within_1_5eps'] <= 2
test_eq(heldout_summary(dict(rounds=[]), 0.03), dict(rounds=0))
plt.close(plot_dynamics(out['logs'], 'toy', eps=0.03))


# %% [markdown]
# ## Experiment
# `papermill nbs/05_finetune.ipynb -p eps 0.03` finetunes the embedded default model with Algorithm 1 (the streamed
# noise, as the authors ran it) **and**, with the same steps, data and schedule, the plain-finetuning control
# (`control='none'`; its run folder is shared with Tables 2–4), then scores base, NS and control on the same test
# images. It writes the run folders (`runs/finetune/<run name>/`: weights + card, `metrics.json`, `dynamics.png`) and
# `reports/finetune/<method>-eps<ε>/`: the summary with 95% intervals, the paired tests of NS against the control and
# the base, Figure 4, Table 5 (every round's noise on the images of its stop *and* on 512 held-out test images beside a
# Gaussian noise of the same norm), the held-out summary over rounds, where the minutes went, and `meta.json`.
#
# The main job scores the cheap columns (clean and the four L∞ attacks, on the suite's sample sizes); the corrupted and
# transfer sets, Patch-Fool and CW are Table 2's (notebook 09), so that a fresh clone gets this answer in minutes.
# A difference between NS and the base alone is not NS's effect: the control shows what the same finetuning does
# without the noise; one seed is one draw of training randomness, and the seeded verdict is notebook 11's.
#
# Any `FinetuneConfig` field can be changed with `overrides` (`-p overrides '{"lim": 8, "refresh_every": 10}'`);
# `-p noise fixed` runs the fixed-batch variant. For ImageNet-scale runs pass e.g. `-p model vit_small_patch16_224
# -p checkpoint hub -p dataset /data/imagenet -p device cuda -p metrics '["clean", "fgsm"]'`.
#

# %% tags=["parameters"]
eps: float = 0.03  # ε of the approximate nullspace (mean squared change of probabilities)
method: str = 'ns'  # 'ns' (Algorithm 1), 'none', 'gaussian', 'madry', 'trades'
noise: str = 'stream'  # noise loop: 'stream' (the authors': fresh batches, the returned δ inside ε on 128 unseen images), 'window' (the earlier stop) or 'fixed' (one batch a round)
control: str = 'none'  # the control finetuned with the same steps, data and schedule ('' for none)
overrides: dict = {}  # any other FinetuneConfig field, e.g. {"steps": 800, "lim": 8.0}
model: str = 'default'  # 'default' (embedded CIFAR-10 ViT) or a timm ViT name
checkpoint: str = ''  # weights: '' (default model's), a local file, or 'hub' (timm pretrained)
dataset: str = 'cifar10'  # 'cifar10' or an ImageFolder root with train/ and val/
train_fraction: float = 1.0  # share of the training set to finetune on
eval_size: int = 500  # held-out test images for the clean/FGSM curves during training
eval_every: int = 100  # steps between held-out clean/FGSM checks
heldout_size: int = 512  # held-out test images every round's noise is measured on (Table 5)
metrics: list = ['clean', 'fgsm_small', 'pgd_small', 'fgsm', 'pgd']  # evaluation columns (the full suite: notebook 09)
n: dict = {}  # images per metric, e.g. {"clean": 2000}; {} → the suite's defaults
seed: int = 0  # seed of data order, noise starts, attacks
out: str = ''  # run folder; empty: runs/finetune/<run name>
report: str = ''  # artifact folder under reports/; empty: finetune/METHOD-epsEPS (with -fixed for the fixed loop)
runs_root: str = ''  # folder of run folders; empty: runs/finetune
device: str = 'cpu'  # 'cpu', 'cuda', ...
threads: int = 2  # CPU threads for torch
smoke: bool = False  # tiny run for tests (written under runs/smoke/)
commit_report: bool = False  # write into the committed reports/ folder even when the parameters differ from its meta.json (make reports and make study do)


# %%
import pandas as pd, matplotlib.pyplot as plt
from ns_vit.report import report_dir, write_meta, save_table, save_figure, in_test, write_json, param, relative_paths
from ns_vit.evaluate import values_table, paired_tests
from ns_vit.stats import paired_table, significance_sentence
from ns_vit.experiments import run_finetune, evaluate_models
from ns_vit.data import repo_root
from ns_vit.training import atomic_save
t_start = time.time()
smoke = smoke or in_test()
metrics, overrides, n = param(metrics), param(overrides), param(n) or None
if not isinstance(overrides, dict):  # checked before any training, as are metrics and n below
    raise ValueError(f'overrides must be a JSON object of FinetuneConfig fields, e.g. -p overrides \'{{"steps": 20}}\'; got {overrides!r}')
if not isinstance(metrics, (list, str)): raise ValueError(f"metrics must be a suite name or a JSON list, e.g. -p metrics '[\"clean\"]'; got {metrics!r}")
if n is not None and not isinstance(n, (int, dict)): raise ValueError(f"n must be an integer or a JSON object metric → n; got {n!r}")
if dataset == 'cifar10':
    from ns_vit.evaluate import suite_metrics
    _known = suite_metrics(metrics)  # unknown metric names fail here
    if isinstance(n, dict) and set(n) - set(_known): raise ValueError(f'n has unknown metrics {sorted(set(n) - set(_known))}; the suite has {list(_known)}')
if smoke:
    overrides = dict(steps=4, batch_size=16, refresh_every=2, noise_max_steps=20, noise_batch=16) | overrides
    eval_size, eval_every, heldout_size = 40, 2, 64
    if dataset == 'cifar10': train_fraction = 0.002  # an ImageFolder fixture is used whole
    metrics, n = ['clean', 'fgsm_small', 'pgd_small'], n or dict(clean=200, fgsm_small=32, pgd_small=32)
    if not runs_root:  # smoke runs start afresh in their own folder (a folder the caller passed is left as it is)
        runs_root = str(repo_root() / 'runs/smoke/finetune')
        import shutil; shutil.rmtree(runs_root, ignore_errors=True)
        out = out or str(Path(runs_root) / f'{method}-eps{eps}')
torch.set_num_threads(threads)
cfg = noise_variant(noise, method=method, eps=eps, seed=seed, **overrides)  # every value checked here, before any work
from dataclasses import replace
ctl = replace(cfg, method=control).validate() if control and control != method else None
params = dict(asdict(cfg), noise=noise, control=control, overrides=overrides, model=model, checkpoint=checkpoint, dataset=dataset,
              train_fraction=train_fraction, eval_size=eval_size, eval_every=eval_every, heldout_size=heldout_size,
              metrics=metrics, n=n, out=out, runs_root=runs_root, device=device, smoke=smoke)
rep = report_dir(report or f'finetune/{method}{"-fixed" if noise == "fixed" else ""}-eps{eps:g}', smoke, params=params, commit=commit_report or bool(report))
minutes = {}


# %%
common = dict(model=model, checkpoint=checkpoint, dataset=dataset, train_fraction=train_fraction, eval_size=eval_size,
              eval_every=eval_every, heldout_size=heldout_size, device=device, runs_root=runs_root, quiet=smoke)
t0 = time.time()
run = run_finetune(cfg, out=out, **common)
run_dir, logs = run['run_dir'], run['logs']
minutes[f'train {method}' + (' (reused)' if run['cached'] else '')] = (time.time() - t0) / 60
print(f"run folder: {relative_paths(run_dir)[0]} ({'reused' if run['cached'] else 'trained'})")
if ctl is not None:
    t0 = time.time()
    crun = run_finetune(ctl, **common)
    minutes[f'train {control}' + (' (reused)' if crun['cached'] else '')] = (time.time() - t0) / 60
    print(f"control ({control}): {relative_paths(crun['run_dir'])[0]} ({'reused' if crun['cached'] else 'trained'})")


# %%
label = f'{method} (ε={eps:g})' if method in ('ns', 'gaussian') else method
models = {'base': run['base'], label: run['model'], **({f'{control} (control)': crun['model']} if ctl is not None else {})}
data = {'val': str(Path(dataset) / 'val')} if dataset != 'cifar10' else None
t0 = time.time()
table, results, paired = evaluate_models(models, metrics, n, data, seed, 'base', smoke)
if ctl is not None: paired = pd.concat([paired, paired_tests(results, f'{control} (control)')], ignore_index=True)
minutes[f'score {len(models)} models'] = (time.time() - t0) / 60
table


# %%
fig = plot_dynamics(logs, f'{method} finetuning ({noise} noise), ε = {eps:g}', eps=eps)
save_figure(fig, rep, 'fig4_dynamics'); save_figure(fig, run_dir, 'dynamics'); plt.close(fig)
save_table(table, rep, 'summary'); save_table(values_table(results), rep, 'summary_values')
save_table(paired_table(paired), rep, 'paired_tests')
save_table(rounds_table(logs), rep, 'table5_rounds')
held = heldout_summary(logs, eps)
write_json(held, rep / 'heldout_summary.json')
if ctl is None:
    summary_sentence = f'No control was run (control=""); differences from the base are not {method}\'s effect alone.'
else:
    summary_sentence = significance_sentence(paired, a=label, b=f'{control} (control)', labels=(label, f'{control} finetuning'))
if held['rounds']:
    summary_sentence += (f" On {heldout_size} held-out test images, the round's noise was inside ε in {held['within_eps']} of "
                         f"{held['rounds']} rounds and inside 1.5 ε in {held['within_1_5eps']} (median mse_prob "
                         f"{held['median_heldout_mse_prob']:.3f} = {held['median_ratio_to_eps']:.2f} ε; a Gaussian noise of the same "
                         f"norm: {held['median_gaussian_mse_prob']:.3f}).")
atomic_save(summary_sentence + '\n', rep / 'conclusion.md', lambda o, q: Path(q).write_text(o))
minutes['total'] = (time.time() - t_start) / 60
save_table(pd.DataFrame([dict(part=k, minutes=round(v, 2)) for k, v in minutes.items()]), rep, 'minutes')
write_meta(rep, params, t_start, device, run_dir=str(run_dir.relative_to(repo_root()) if run_dir.is_relative_to(repo_root()) else run_dir.name),
           conclusion=summary_sentence, minutes=minutes)
print(summary_sentence)
print('where the minutes went:', ', '.join(f'{k} {v:.1f}' for k, v in minutes.items()))
paired_table(paired)


# %%
assert set(results) == set(models) and all(df[df.n > 0].value.between(0, 1).all() for df in results.values())
if method in ('ns', 'gaussian'):
    assert len(logs['rounds']) == math.ceil(cfg.steps / cfg.refresh_every)
    assert all('heldout_mse_prob' in r for r in logs['rounds'])
if method == 'ns':  # every round's returned noise is inside ε on the images of its stop (≥ 128 unseen ones when not capped)
    assert all(r['mse_prob'] < eps for r in logs['rounds'])  # the returned δ's own statistic (on r['stop_images'] images)
rounds_table(logs)

