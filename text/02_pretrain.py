# %% [markdown]
# # Pretraining the embedded default ViT
# > Train the small CIFAR-10 ViT that every embedded experiment studies, from scratch, on the CPU, resumably.

# %%
#| default_exp pretrain

# %%
#| export
from __future__ import annotations
import time
from dataclasses import dataclass
from pathlib import Path
import torch
import torch.nn.functional as F
from ns_vit.progress import tqdm
from ns_vit.data import UInt8Images, augment
from dataclasses import asdict
from ns_vit.training import cosine_lr, read_state, save_state
from ns_vit.models import PixelViT, accuracy, model_device

# %%
#| hide
import tempfile, warnings, math
from fastcore.test import test_eq, test_close, test_fail


# %% [markdown]
# The paper finetunes ImageNet-pretrained ViTs. Here nothing can be downloaded, so the embedded experiments pretrain
# their own small ViTs (`EMBEDDED_MODELS` in `01_models`), by this notebook with parameters:
# - `default`: 8×8 patches on 32×32 images (16 tokens), D = 128 < C·P² = 192, so the patch embedding has a 64-dimensional
#   nullspace, like ViT-S/16 (768 > 384). 1.0 M parameters.
# - `vit-ti8`: timm's ViT-Ti (width 192, depth 12, 3 heads, MLP ratio 4) with the same 8×8 patches and 16 tokens,
#   5.4 M parameters (5.3× the default). C·P² = 192 = D, so, like ViT-B/16 (768 = 768), its patch embedding has no exact
#   nullspace: the paper's second model mirrored on the size axis. Of the shapes timed in issue 26 it is one of the two
#   cheapest per parameter (patch 4 quadruples the tokens), and it keeps the default's token count so that the noise δ
#   (N × D) differs only in width. Stochastic depth 0.1 (DeiT-Ti's) because a 5 M-parameter ViT over-fits 50,000 images.
#   Its recipe (`make pretrain-ti8`): peak rate 1e-3, two cosine cycles of 30 epochs, the second a warm restart at half
#   the peak rate. One cycle left it under-fitted (test accuracy still rising as the rate reached 0, and training accuracy
#   only a few points above it: `reports/pretrain/vit-ti8` at commit 7e62b8b); the second cycle continues that finished
#   run rather than starting over (`extends` below).
#
# The recipe is the usual one for ViTs from scratch: AdamW, linear warm-up then cosine decay, label smoothing, random
# crop + flip. Training is kill-safe: the state (weights, optimiser, schedule, RNG, history, configuration) is written
# atomically after every epoch and a rerun of the same command resumes from it, bit-identically (the test below); a state
# saved under another configuration is refused, an unreadable one is set aside and the run starts over (`training.save_state`
# and `read_state`, the resume mechanism finetuning uses too).
#

# %% [markdown]
# ## The training loop

# %%
#| export
@dataclass
class TrainConfig:
    "Hyper-parameters of supervised training."
    epochs: int = 40  # passes over the training set
    batch_size: int = 256  # images per step
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.05  # AdamW weight decay
    warmup_epochs: float = 3.0  # linear warm-up length
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    seed: int = 0  # seeds initial order, augmentation and everything random
    restarts: tuple = ()  # epochs at which the cosine schedule restarts (warm restarts, SGDR); () = one cycle
    restart_lr: float = 0.5  # peak learning rate of cycle k is lr × restart_lr**k

    def __post_init__(self):
        self.restarts = tuple(int(r) for r in self.restarts)
        if any(not 0 < r < self.epochs for r in self.restarts) or list(self.restarts) != sorted(set(self.restarts)):
            raise ValueError(f'restarts must be increasing epochs strictly between 0 and epochs={self.epochs}, got {list(self.restarts)}')

    def first_cycles(self) -> 'TrainConfig':
        "The recipe without its last restart: a finished run of it is this recipe's first `restarts[-1]` epochs."
        if not self.restarts: raise ValueError('a recipe without restarts has no earlier cycles')
        return TrainConfig(**{**asdict(self), 'epochs': self.restarts[-1], 'restarts': self.restarts[:-1]})

def cycle_lr(step: int, bounds: list[int], warmup: int, scale: float) -> float:
    "Learning-rate multiplier of cosine cycles with warm restarts: cycle k spans steps bounds[k]..bounds[k+1], warms up for `warmup` steps, peaks at scale**k."
    k = max(i for i in range(len(bounds) - 1) if bounds[i] <= step)
    return scale ** k * cosine_lr(step - bounds[k], bounds[k + 1] - bounds[k], warmup)



# %%
#| export
def _state(model, opt, sched, epoch, history) -> dict:
    "Everything needed to resume at the start of `epoch`."
    return dict(model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(), epoch=epoch,
                history=history, rng=torch.get_rng_state())

def train_epoch(model: PixelViT, data: UInt8Images, opt, sched, cfg: TrainConfig, epoch: int, quiet: bool = False) -> float:
    "One pass over `data` in a seeded order with batch augmentation; returns the mean training loss."
    dev = model_device(model); model.train()
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = torch.randperm(len(data), generator=g)
    total, n = 0.0, 0
    for i in tqdm(range(0, len(order) - cfg.batch_size + 1, cfg.batch_size), desc=f'epoch {epoch}', leave=False, disable=quiet):
        x, y = data.tensors(order[i:i + cfg.batch_size])
        x = augment(x, generator=g).to(dev)  # (B, 3, 32, 32)
        loss = F.cross_entropy(model(x), y.to(dev), label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
        total, n = total + loss.item(), n + 1
    return total / max(n, 1)


# %%
#| export
def train_classifier(model: PixelViT, train: UInt8Images, cfg: TrainConfig, val: UInt8Images | None = None,
                     state_path: str | Path | None = None, quiet: bool = False, stop_after: int | None = None,
                     extends: str | Path | None = None,  # state of a run of `cfg.first_cycles()`: a new run starts from it
                     ) -> list[dict]:
    "Train `model` on `train`; checkpoint to `state_path` after each epoch and resume from it; returns history."
    torch.manual_seed(cfg.seed)
    steps = (len(train) // cfg.batch_size) * cfg.epochs
    if steps == 0: raise ValueError(f'{len(train)} training images is fewer than one batch of {cfg.batch_size}')
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = int(cfg.warmup_epochs * len(train) // cfg.batch_size)
    per = len(train) // cfg.batch_size
    bounds = [0, *(r * per for r in cfg.restarts), steps]
    lam = lambda s: cycle_lr(s, bounds, warm, cfg.restart_lr)  # one cycle: cosine_lr(s, steps, warm)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    start, history = 0, []
    st = read_state(state_path, cfg) if state_path else None  # `training.read_state`: checks `cfg`, sets a damaged file aside
    if st is None and extends is not None:  # a longer schedule continues a run of its first cycles (same steps, same RNG)
        st = read_state(extends, cfg.first_cycles())
        if st is None: raise FileNotFoundError(f'{extends}: no readable state of the first cycles to extend')
    if st is not None:
        model.load_state_dict(st['model']); opt.load_state_dict(st['opt']); sched.load_state_dict(st['sched'])
        start, history = st['epoch'], st['history']; torch.set_rng_state(st['rng'])
        for g in opt.param_groups: g['lr'] = g['initial_lr'] * lam(sched.last_epoch)  # an extended state: this schedule's rate
    end = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)  # stop_after: simulate a kill (tests)
    for epoch in tqdm(range(start, end), desc='pretrain', disable=quiet, initial=start, total=cfg.epochs):
        t0 = time.time()
        loss = train_epoch(model, train, opt, sched, cfg, epoch, quiet=True)
        rec = dict(epoch=epoch + 1, loss=loss, lr=sched.get_last_lr()[0], seconds=time.time() - t0)
        if val is not None: rec['val_acc'] = accuracy(model, *val.tensors())
        history.append(rec)
        if not quiet: print(rec, flush=True)
        if state_path: save_state(state_path, _state(model, opt, sched, epoch + 1, history), cfg)
    return history



# %% [markdown]
# A tiny run learns a separable toy problem, and a run interrupted after one epoch resumes to the same weights as an
# uninterrupted run:

# %%
from ns_vit.models import create_vit
def _toy(n=256):
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 2
    imgs = (torch.rand(n, 32, 32, 3, generator=g) * 100 + 155 * y[:, None, None, None]).to(torch.uint8)
    return UInt8Images(imgs, y, ('dark', 'light'))
def _tiny(): 
    torch.manual_seed(0)
    return create_vit('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2)
cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-3, warmup_epochs=0.5)
toy = _toy()
m_full = _tiny(); train_classifier(m_full, toy, cfg, quiet=True)
test_eq(accuracy(m_full, *toy.tensors()) > 0.9, True)
with tempfile.TemporaryDirectory() as d:
    m_a = _tiny(); train_classifier(m_a, toy, cfg, state_path=Path(d) / 's.pt', quiet=True, stop_after=1)
    test_eq(torch.load(Path(d) / 's.pt', weights_only=True)['epoch'], 1)
    m_b = _tiny(); hist = train_classifier(m_b, toy, cfg, state_path=Path(d) / 's.pt', quiet=True)  # resumes
test_eq([h['epoch'] for h in hist], [1, 2])
for k, v in m_full.state_dict().items(): test_close(m_b.state_dict()[k], v, eps=1e-6)
test_fail(lambda: train_classifier(_tiny(), toy, TrainConfig(batch_size=1000)), contains='fewer than one batch')
with tempfile.TemporaryDirectory() as d:  # a state saved under another recipe is refused, naming the field; a damaged one set aside
    p = Path(d) / 's.pt'; train_classifier(_tiny(), toy, cfg, state_path=p, quiet=True, stop_after=1)
    test_eq(sorted(torch.load(p, weights_only=True)), ['cfg', 'epoch', 'history', 'model', 'opt', 'rng', 'sched'])  # the keys resumed runs read
    test_fail(lambda: train_classifier(_tiny(), toy, TrainConfig(epochs=2, batch_size=32, lr=5e-4, warmup_epochs=0.5), state_path=p, quiet=True),
              contains='was saved by a run with other settings (lr: 0.001 → 0.0005)')
    p.write_bytes(p.read_bytes()[:100])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); m_c = _tiny(); hist = train_classifier(m_c, toy, cfg, state_path=p, quiet=True)
    test_eq([h['epoch'] for h in hist], [1, 2]); test_eq(any('unreadable' in str(x.message) for x in w), True)
    test_eq(len(list(Path(d).glob('s.pt.unreadable-*'))), 1)  # set aside, and the run started over to the same weights
    for k, v in m_full.state_dict().items(): test_close(m_c.state_dict()[k], v, eps=1e-6)


# %% [markdown]
# A schedule can be extended by warm restarts (`restarts`, SGDR): cycle k starts again from a linear warm-up and peaks at
# `lr × restart_lr**k`. A run of the longer schedule whose state is missing can start from a finished (or partial) run of
# its first cycles (`extends`): the first cycles are the same steps with the same rates and random streams, so it reaches
# the same weights as the longer schedule run from scratch (the test below), and an under-fitted model is trained on
# without repeating its first cycles.

# %%
test_eq([round(cycle_lr(s, [0, 10, 30], 2, 0.5), 4) for s in (0, 1, 9, 10, 11, 29)],
        [0.5, 1.0, round(0.5 * (1 + math.cos(math.pi * 7 / 8)), 4), 0.25, 0.5, round(0.25 * (1 + math.cos(math.pi * 17 / 18)), 4)])
test_eq([cycle_lr(s, [0, 40], 3, 0.5) for s in range(40)], [cosine_lr(s, 40, 3) for s in range(40)])  # one cycle: unchanged
cfg3 = TrainConfig(epochs=3, batch_size=32, lr=1e-3, warmup_epochs=0.5, restarts=(2,))
test_eq(cfg3.first_cycles(), cfg)
test_fail(lambda: TrainConfig(epochs=3, restarts=(3,)), contains='strictly between 0 and epochs=3')
test_fail(lambda: TrainConfig(epochs=3, restarts=(2, 1)), contains='increasing')
m_3 = _tiny(); h3 = train_classifier(m_3, toy, cfg3, quiet=True)
with tempfile.TemporaryDirectory() as d:
    first, p3 = Path(d) / 'first.pt', Path(d) / 'three.pt'
    train_classifier(_tiny(), toy, cfg, state_path=first, quiet=True)  # the 2-epoch run, finished
    m_e = _tiny(); he = train_classifier(m_e, toy, cfg3, state_path=p3, extends=first, quiet=True)
    test_eq([h['epoch'] for h in he], [1, 2, 3]); test_eq(torch.load(p3, weights_only=True)['epoch'], 3)
    test_fail(lambda: train_classifier(_tiny(), toy, cfg3, state_path=Path(d) / 'x.pt', extends=Path(d) / 'none.pt', quiet=True),
              contains='no readable state of the first cycles')
    test_fail(lambda: train_classifier(_tiny(), toy, TrainConfig(epochs=3, batch_size=32, lr=5e-4, warmup_epochs=0.5, restarts=(2,)),
                                       state_path=Path(d) / 'y.pt', extends=first, quiet=True), contains='lr: 0.001 → 0.0005')
for k, v in m_3.state_dict().items(): test_close(m_e.state_dict()[k], v, eps=1e-6)  # extended == the longer schedule from scratch

# %% [markdown]
# ## Experiment: the embedded models
# `papermill nbs/02_pretrain.ipynb /dev/null` trains the default model on the 50,000 CIFAR-10 training images and
# writes `data/default_vit.safetensors` with its card (command, recipe, measured test accuracy) and
# `reports/pretrain/`; `-p model vit-ti8` (with its recipe, `make pretrain-ti8`) trains the larger model into
# `data/vit_ti8.safetensors` and `reports/pretrain/vit-ti8/`. Test accuracy is recorded after every epoch as a curve
# only: nothing is selected on it (the weights are the last epoch's). With `-p smoke True` (and under `nbdev_test`) it
# trains briefly on a subset and writes under `runs/smoke/` instead, leaving the committed weights alone.
#

# %% tags=["parameters"]
model: str = 'default'  # embedded model to train: 'default' or 'vit-ti8' (EMBEDDED_MODELS)
epochs: int = 40  # passes over the 50,000 training images
batch_size: int = 256  # images per step
lr: float = 2e-3  # peak AdamW learning rate
weight_decay: float = 0.05  # AdamW weight decay
warmup_epochs: float = 3.0  # linear warm-up, in epochs
label_smoothing: float = 0.1  # cross-entropy label smoothing
seed: int = 0  # seed of initialisation, data order and augmentation
restarts: list = []  # epochs at which the cosine schedule restarts with a new warm-up (SGDR); []: one cycle
restart_lr: float = 0.5  # peak learning rate of cycle k: lr × restart_lr**k
val_each_epoch: bool = True  # test accuracy after every epoch (a curve; nothing is selected on it)
threads: int = 2  # CPU threads for torch
device: str = 'cpu'  # 'cpu', 'cuda', 'cuda:1', ...
smoke: bool = False  # tiny run for tests: 1 epoch on 1,024 images, written under runs/smoke/
report: str = ''  # folder under reports/ for this run; '' → pretrain (default model) or pretrain/<model>. A named folder is written whatever the parameters (unnamed, a non-default run goes to runs/reports/<artifact>-<digest>)
commit_report: bool = False  # write into the committed reports/ folder even when the parameters differ from its meta.json (make reports and make study do)


# %%
import os, json, sys, time
from dataclasses import asdict
import pandas as pd, matplotlib.pyplot as plt
from ns_vit.data import cifar10, repo_root
from ns_vit.models import embedded_vit, save_checkpoint, model_card, EMBEDDED_MODELS
from ns_vit.report import report_dir, write_meta, save_table, save_figure, in_test, write_json, param
if model not in EMBEDDED_MODELS: raise ValueError(f'model must be one of {list(EMBEDDED_MODELS)}, got {model!r}')
smoke = smoke or in_test()
if smoke: epochs, n_train, n_test, restarts = 1, 1024, 1000, []
else: n_train, n_test = 50_000, 10_000
torch.set_num_threads(threads)
params = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
              label_smoothing=label_smoothing, seed=seed, device=device, smoke=smoke)
restarts = param(restarts)
if restarts: params = {**{k: v for k, v in params.items() if k not in ('device', 'smoke')}, 'restarts': '+'.join(map(str, restarts)),
                       'restart_lr': restart_lr, 'device': device, 'smoke': smoke}  # a one-cycle recipe keeps its names
if model != 'default': params = dict(model=model) | params  # the default's state and command keep their names
arch = EMBEDDED_MODELS[model]
root = repo_root()
run_dir = root / ('runs/smoke/pretrain' if smoke else 'runs/pretrain'); run_dir.mkdir(parents=True, exist_ok=True)
out = (run_dir / Path(arch['checkpoint']).name) if smoke else root / arch['checkpoint']
rep = report_dir(report or ('pretrain' if model == 'default' else f'pretrain/{model}'), smoke, params=params, commit=commit_report or bool(report))
if not smoke and not rep.is_relative_to(root / 'reports'): out = rep / out.name  # a trial run keeps the committed weights too
t0 = time.time()


# %%
train_ds, test_ds = cifar10('train').subset(n_train, seed), cifar10('test').subset(n_test, seed)
cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                  label_smoothing=label_smoothing, seed=seed, restarts=tuple(restarts), restart_lr=restart_lr)
torch.manual_seed(seed)
net = embedded_vit(model).to(device)
state_of = lambda p: run_dir / f'state-{"-".join(f"{k}={v}" for k, v in p.items())}.pt'
if restarts:  # the state of the same recipe without its last restart (a finished shorter run) is where a new run starts
    first = {k: v for k, v in params.items() if k not in ('restarts', 'restart_lr')} | dict(epochs=restarts[-1])
    if len(restarts) > 1: first = {k: v for k, v in params.items()} | dict(epochs=restarts[-1], restarts='+'.join(map(str, restarts[:-1])))
    extends = state_of(first) if state_of(first).exists() else None
    print(f'cycles start at epochs {[0, *restarts]}; first cycles from {extends.name if extends else "scratch"}')
else: extends = None
history = train_classifier(net, train_ds, cfg, val=test_ds if (smoke or val_each_epoch) else None,
                           state_path=state_of(params), extends=extends)


# %%
test_acc = accuracy(net, *test_ds.tensors())
train_acc = accuracy(net, *train_ds.subset(10_000, 1).tensors())
print(f'{model}: test accuracy {test_acc:.4f} on {len(test_ds)} images; train accuracy {train_acc:.4f} (10k subset)')
cmd = 'papermill nbs/02_pretrain.ipynb /dev/null' + ''.join(f" -p {k} {v}" if k != 'restarts' else f" -p restarts '[{v.replace('+', ', ')}]'"
                                                         for k, v in params.items() if k != 'smoke')
train_s = round(sum(h['seconds'] for h in history))  # over every session of a resumed run
card = model_card(net, arch['arch'], arch['kwargs'], data='CIFAR-10 train (50,000 JPEG-encoded images)',
                  recipe=asdict(cfg), command=cmd, metrics={'test_acc': test_acc, 'test_images': len(test_ds),
                  'train_acc_10k': train_acc}, wall_time_s=train_s, device=str(device),
                  params=sum(p.numel() for p in net.parameters()), name=model)
save_checkpoint(net.cpu(), out, card)
print(f'wrote {out.relative_to(root)} ({out.stat().st_size / 1e6:.1f} MB)')


# %%
hist = pd.DataFrame(history)
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(hist.epoch, hist.loss, label='train loss'); ax.set_xlabel('epoch'); ax.set_ylabel('loss')
if 'val_acc' in hist:
    ax2 = ax.twinx(); ax2.plot(hist.epoch, hist.val_acc, color='C1', label=f'test accuracy ({len(test_ds):,} images)')
    ax2.set_ylabel('test accuracy'); ax2.legend(loc='center right')
ax.set_title(f'{model} ViT pretraining: test acc {test_acc:.1%}'); ax.legend(loc='upper right')
save_figure(fig, rep, 'pretrain_loss'); plt.close(fig)
save_table(hist, rep, 'pretrain_epochs')
save_table(pd.DataFrame([{'model': model, 'test_acc': test_acc, 'test_images': len(test_ds), 'train_acc_10k': train_acc,
                          'epochs': epochs, 'params': card['params'], 'wall_time_s': card['wall_time_s']}]), rep, 'pretrain')
write_meta(rep, params, t0, device, outputs=[out, out.with_suffix('.json')])  # its weights and card: not 'dirty'
assert 0.0 <= test_acc <= 1.0

