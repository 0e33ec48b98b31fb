# %% [markdown]
# # DamageNet-style transfer set
# > The CIFAR-10 analogue of DamageNet: Chen et al.'s attack on attention, run once on an in-project CNN surrogate and cached with integrity checks.
#
# Table 2 of the paper scores each model on DamageNet: adversarial ImageNet images made on a VGG19 that transfer to
# other networks. No CIFAR-10 version exists, so this notebook builds one the same way: a surrogate CNN (a different
# architecture from the ViTs it is used on), DamageNet's attack on its attention, and a cached set of the attacked test
# images. The loaders of the other shifted sets (and of the real ImageNet DamageNet folder) are in `06c_shifts`.

# %%
#| default_exp damagenet

# %%
#| export
from __future__ import annotations
import hashlib, inspect, json, time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Callable
import torch
from torch import nn, Tensor
import torch.nn.functional as F
from ns_vit.progress import tqdm
import ns_vit
from ns_vit.data import UInt8Images, cifar10, cache_dir, repo_root
from ns_vit.models import CIFAR10_MEAN, CIFAR10_STD, accuracy, model_device, weights_digest, frozen, save_checkpoint, load_checkpoint
from ns_vit.pretrain import TrainConfig, train_classifier
from ns_vit.cache import cached, content_digest

# %%
from fastcore.test import test_eq, test_close, test_fail
import io, tempfile, os, warnings
from ns_vit.cache import save_entry


# %% [markdown]
# ## A surrogate of a different architecture
#
# DamageNet (Chen et al., TPAMI 2020) attacks a VGG19 and evaluates the result black-box on other networks. Our
# models are ViTs, so the surrogate is a CNN: a ResNet-9-style net (the DAWNBench design of Page, 2018: two conv
# stages, residual blocks, max-pooling) narrowed to widths 16-32-64-128 so it trains on one CPU thread in minutes.
# Its head is global *average* pooling + linear, which makes Grad-CAM at the last conv stage exactly CAM
# (α_k^c = W_ck / HW), the attention proxy of the attack below. Like every ns_vit model it takes [0, 1] images and
# normalises them itself.

# %%
#| export
def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    "3×3 conv (no bias) + BatchNorm + ReLU."
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

class Residual(nn.Module):
    "x + two conv-bn-relu layers at constant width."
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c))
    def forward(self, x: Tensor) -> Tensor: return x + self.body(x)

class SurrogateCNN(nn.Module):
    "ResNet-9-style CNN on [0, 1] images, normalisation inside; `stage3` is the last conv stage (CAM layer)."
    def __init__(self, width: int = 16, num_classes: int = 10, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        w = width
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.stem = _conv_bn(3, w)                                                            # (B, w, 32, 32)
        self.stage1 = nn.Sequential(_conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w))      # (B, 2w, 16, 16)
        self.stage2 = nn.Sequential(_conv_bn(2 * w, 4 * w), nn.MaxPool2d(2))                  # (B, 4w, 8, 8)
        self.stage3 = nn.Sequential(_conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w))  # (B, 8w, 4, 4)
        self.fc = nn.Linear(8 * w, num_classes)
    def forward_features(self, x: Tensor) -> Tensor:
        "Activations of the last conv stage (B, 8w, H/8, W/8)."
        return self.stage3(self.stage2(self.stage1(self.stem((x - self.mean) / self.std))))
    def forward_head(self, a: Tensor) -> Tensor: return self.fc(a.mean((2, 3)))  # (B, num_classes)
    def forward(self, x: Tensor) -> Tensor: return self.forward_head(self.forward_features(x))

SURROGATE_ARCH = dict(width=16, num_classes=10)
SURROGATE_PATH = 'data/surrogate_cnn.safetensors'
SURROGATE_COMMAND = 'python -c "from ns_vit.damagenet import train_surrogate; train_surrogate()"'  # recorded in the card
SURROGATE_HOWTO = ('train them by running nbs/06d_damagenet.ipynb (e.g. `papermill nbs/06d_damagenet.ipynb out.ipynb`), '
                   f'which trains them when absent (about 15 CPU minutes), or with `{SURROGATE_COMMAND}`')

def surrogate_cnn(**kw) -> SurrogateCNN:
    "A freshly initialised surrogate CNN (ResNet-9-style, widths 16-32-64-128 by default)."
    return SurrogateCNN(**{**SURROGATE_ARCH, **kw})


# %%
m = surrogate_cnn()
n_params = sum(p.numel() for p in m.parameters())
print(f'{n_params:,} parameters = {n_params * 4 / 1e6:.2f} MB as float32')
assert n_params * 4 < 5e6
x = torch.rand(2, 3, 32, 32)
test_eq(m(x).shape, (2, 10))
test_eq(m.forward_features(x).shape, (2, 128, 4, 4))
# the surrogate is not a ViT: ns_vit's ViT helpers refuse it
from ns_vit.models import as_vit
test_fail(lambda: as_vit(m), contains='not a timm VisionTransformer')

# %% [markdown]
# ## Training the surrogate and its card
#
# `train_surrogate` reuses the ViT's training loop (`ns_vit.pretrain.train_classifier`: AdamW, warm-up + cosine,
# label smoothing, random crop + flip from `ns_vit.data.augment`, resumable from a state file through
# `training.read_state`: another recipe's state refused, a damaged one set aside), scores all 10,000 test images, and
# writes the weights (safetensors, the card in its metadata) and the card as JSON next to them, atomically, with
# `models.save_checkpoint`, the writer of every ns_vit checkpoint. The card carries `weights_sha256`
# (`ns_vit.models.weights_digest`, the one digest of the project, as in the ViT checkpoints' cards), and
# `load_surrogate` (`models.load_checkpoint`) refuses weights that do not match it, naming the file. The default recipe
# was chosen from a measured epoch (≈ 1.4 min at one CPU thread) to stay within ~15 minutes single-threaded.

# %%
#| export
SURROGATE_RECIPE = TrainConfig(epochs=8, batch_size=256, lr=3e-3, weight_decay=0.05, warmup_epochs=1.0,
                               label_smoothing=0.1, seed=0)

def save_surrogate(model: SurrogateCNN, card: dict, path: str | Path | None = None) -> Path:
    "Write the surrogate's weights and card with `models.save_checkpoint` (safetensors + .json, atomic, `weights_sha256`)."
    return save_checkpoint(model, path or repo_root() / SURROGATE_PATH, card)


# %%
#| export
def train_surrogate(epochs: int = SURROGATE_RECIPE.epochs,  # passes over the 50,000 training images
                    cfg: TrainConfig | None = None,  # full recipe (its `epochs` is replaced by `epochs`)
                    n_train: int | None = None,  # train on a seeded subset (tests); None = all
                    n_test: int | None = None,  # score a seeded test subset (tests); None = all 10,000
                    path: str | Path | None = None,  # where to write; default `data/surrogate_cnn.safetensors`
                    state_path: str | Path | None = None,  # resume file (default under the cache folder)
                    command: str = SURROGATE_COMMAND,  # recorded in the card
                    quiet: bool = False,  # no progress bar
                    ) -> SurrogateCNN:
    "Train the surrogate CNN on CIFAR-10 train, score it on all test images, save weights + card (also `model.card`)."
    t0 = time.time()
    cfg = TrainConfig(**{**asdict(cfg or SURROGATE_RECIPE), 'epochs': epochs})
    train = cifar10('train')
    if n_train is not None: train = train.subset(n_train, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = surrogate_cnn()
    state_path = state_path or cache_dir() / f'surrogate-train-{hashlib.sha256(repr((asdict(cfg), n_train)).encode()).hexdigest()[:10]}.pt'
    history = train_classifier(model, train, cfg, state_path=state_path, quiet=quiet)
    model.eval()
    test = cifar10('test')
    if n_test is not None: test = test.subset(n_test, cfg.seed)
    acc = accuracy(model, *test.tensors())
    n_params = sum(p.numel() for p in model.parameters())
    card = dict(arch='SurrogateCNN (ResNet-9-style, ns_vit.damagenet)', arch_kwargs=SURROGATE_ARCH, params=n_params,
                normalisation=dict(mean=CIFAR10_MEAN, std=CIFAR10_STD), recipe=asdict(cfg), n_train=len(train),
                augmentation='ns_vit.data.augment (pad-4 random crop + horizontal flip)', optimizer='AdamW, warm-up + cosine',
                test_accuracy=acc, test_n=len(test), history=history, wall_time_s=round(time.time() - t0, 1),
                threads=torch.get_num_threads(), command=command, ns_vit=ns_vit.__version__,
                created=time.strftime('%Y-%m-%d %H:%M:%S'))
    card['weights_sha256'] = weights_digest(model, 64)
    save_surrogate(model, card, path)
    Path(state_path).unlink(missing_ok=True)
    model.card = card
    return model


# %%
#| export
def load_surrogate(path: str | Path | None = None, map_location: str | torch.device = 'cpu') -> SurrogateCNN:
    "The trained surrogate CNN in eval mode, its card as `.card`, its weights checked against the card's digest."
    path = Path(path).expanduser() if path else repo_root() / SURROGATE_PATH
    if not path.is_file(): raise FileNotFoundError(f'surrogate weights {path} not found: {SURROGATE_HOWTO}')
    try: model, card = load_checkpoint(path, map_location, build=lambda card: surrogate_cnn(**card.get('arch_kwargs', {})))
    except (ValueError, RuntimeError) as e:  # corrupt, edited, or another network's weights
        raise ValueError(f'{str(e).splitlines()[0].rstrip(":")}. To make it anew, delete {path} and {SURROGATE_HOWTO}') from None
    model.card = card
    return model


# %% [markdown]
# A one-batch run on 256 images, written to a temporary folder: the card records architecture, recipe, test accuracy,
# wall time, the command and the weights digest; the weights fit the 5 MB budget; `load_surrogate` returns the same
# network, says how to make it when it is missing (a command a user can type: no lock files, no virtualenv paths),
# and refuses a file whose bytes were changed behind its card's back.

# %%
with tempfile.TemporaryDirectory() as d:
    p = Path(d) / 'surrogate_cnn.safetensors'
    (Path(d) / 'state.pt').write_bytes(b'PK half a state')  # a damaged resume state (`training.read_state`): set aside, training starts over
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        m1 = train_surrogate(epochs=1, n_train=256, n_test=100, path=p, state_path=Path(d) / 'state.pt', quiet=True)
    assert any('unreadable' in str(x.message) for x in w) and len(list(Path(d).glob('state.pt.unreadable-*'))) == 1
    card = m1.card
    assert p.exists() and p.with_suffix('.json').exists() and not (Path(d) / 'state.pt').exists()
    assert p.stat().st_size < 5e6
    for k in ('arch', 'recipe', 'test_accuracy', 'test_n', 'wall_time_s', 'command', 'weights_sha256'): assert k in card, k
    test_eq(card['test_n'], 100); test_eq(card['recipe']['epochs'], 1)
    m2 = load_surrogate(p)
    test_eq(m2.card, json.loads(p.with_suffix('.json').read_text()))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad(): test_close(m1.eval()(x), m2(x), eps=1e-6)
    test_eq(weights_digest(m2, 64), card['weights_sha256'])
    missing = Path(d) / 'missing.safetensors'
    test_fail(lambda: load_surrogate(missing), contains='06d_damagenet.ipynb')
    try: load_surrogate(missing)
    except FileNotFoundError as e: assert 'flock' not in str(e) and '.venv' not in str(e) and '/tmp/' not in SURROGATE_HOWTO
    raw = bytearray(p.read_bytes()); raw[-5] ^= 0xFF; p.write_bytes(bytes(raw))  # one weight byte flipped, header intact
    test_fail(lambda: load_surrogate(p), contains='do not match the sha256 in its card')
    p.write_bytes(bytes(raw[:100]))  # truncated
    test_fail(lambda: load_surrogate(p), contains='corrupt')

# %%
# the command that "surrogate weights not found" tells users to run passes no state path: its resume file goes to the
# cache folder under a name hashed from the recipe (this once failed with NameError: hashlib was not imported)
before = set(cache_dir().glob('surrogate-train-*.pt'))
with tempfile.TemporaryDirectory() as d:
    p = Path(d) / 'surrogate_cnn.safetensors'
    m3 = train_surrogate(epochs=1, n_train=256, n_test=32, path=p, quiet=True)
    test_eq(m3.card['test_n'], 32)
    test_eq(load_surrogate(p).card['weights_sha256'], m3.card['weights_sha256'])
test_eq(set(cache_dir().glob('surrogate-train-*.pt')), before)  # the resume file is removed once training ends

# %% [markdown]
# ## Attention maps: the proxy that replaces SGLRP
#
# DamageNet's attention is SGLRP (selective gradient LRP, from Keras/iNNvestigate), which has no maintained torch
# port. We use **Grad-CAM at the last conv stage** (`stage3`, a 4×4 grid on 32×32 images, the same grid as the 8-px
# patches of the default ViT): h_c = ReLU(Σ_k α_k^c A^k) with α_k^c the spatial mean of ∂z_c/∂A^k. The generic version
# differentiates through the gradient (`create_graph=True`) so it works for any CNN given its layer; for
# `SurrogateCNN`, whose head is average pooling + linear, α_k^c = W_ck/HW exactly, so Grad-CAM equals CAM and we use
# that closed form (the test below checks the two agree). Gradient × input (`proxy='gradxinput'`,
# h_c = ReLU(Σ_channels x ⊙ ∂z_c/∂x)) is offered as the second proxy.

# %%
#| export
PROXIES = ('gradcam', 'gradxinput')

def _gradcam(model: nn.Module, x: Tensor, classes: Tensor, layer: nn.Module) -> tuple[Tensor, Tensor]:
    "Generic Grad-CAM at `layer`, differentiable in x: (logits (B, K0), maps (B, K, h, w))."
    store = {}
    hook = layer.register_forward_hook(lambda m, i, o: store.__setitem__('a', o))
    try: logits = model(x)
    finally: hook.remove()
    a = store['a']  # (B, C, h, w)
    maps = []
    for k in range(classes.shape[1]):
        g = torch.autograd.grad(logits.gather(1, classes[:, k:k + 1]).sum(), a, create_graph=True)[0]  # (B, C, h, w)
        maps.append(F.relu((g.mean((2, 3), keepdim=True) * a).sum(1)))  # (B, h, w)
    return logits, torch.stack(maps, 1)

def attention_maps(model: nn.Module, x: Tensor, classes: Tensor, proxy: str = 'gradcam',
                   layer: nn.Module | None = None) -> tuple[Tensor, Tensor]:
    "Logits and class-attention maps (B, K, h, w) of `model` at images x for classes (B, K); differentiable in x."
    if proxy not in PROXIES: raise ValueError(f'proxy must be one of {PROXIES}, not {proxy!r}')
    if proxy == 'gradxinput':
        logits = model(x)
        maps = [F.relu((torch.autograd.grad(logits.gather(1, classes[:, k:k + 1]).sum(), x, create_graph=True)[0] * x).sum(1))
                for k in range(classes.shape[1])]
        return logits, torch.stack(maps, 1)  # (B, K, H, W)
    if isinstance(model, SurrogateCNN) and layer is None:  # closed form: Grad-CAM = CAM for an avg-pool + linear head
        a = model.forward_features(x)  # (B, C, h, w)
        w = model.fc.weight[classes] / (a.shape[2] * a.shape[3])  # (B, K, C)
        return model.forward_head(a), F.relu(torch.einsum('bkc,bchw->bkhw', w, a))
    layer = layer or getattr(model, 'stage3', None)
    if layer is None: raise ValueError('pass `layer`, the last conv stage of the surrogate, for Grad-CAM')
    return _gradcam(model, x, classes, layer)


# %%
torch.manual_seed(0)
m = surrogate_cnn().eval()
x = torch.rand(3, 3, 32, 32, requires_grad=True)
cls = torch.tensor([[0, 1], [2, 3], [4, 5]])
logits, fast = attention_maps(m, x, cls)
logits2, slow = attention_maps(m, x, cls, layer=m.stage3)  # generic autograd Grad-CAM
test_close(logits, logits2, eps=1e-5)
test_eq(fast.shape, (3, 2, 4, 4))
test_close(fast, slow, eps=1e-5)
_, gxi = attention_maps(m, x, cls, proxy='gradxinput')
test_eq(gxi.shape, (3, 2, 32, 32))
assert (fast >= 0).all() and (gxi >= 0).all()
assert torch.autograd.grad(fast.sum(), x)[0].abs().sum() > 0  # differentiable in the image
test_fail(lambda: attention_maps(m, x, cls, proxy='sglrp'), contains='proxy must be one of')

# %% [markdown]
# ## The attack on attention (DamageNet recipe)
#
# **Sources.** S. Chen, Z. He, C. Sun, J. Yang, X. Huang, *Universal Adversarial Attack on Attention and the Resulting
# Dataset DAmageNet*, IEEE TPAMI 2022 (early access 2020, https://ieeexplore.ieee.org/document/9238430; preprint
# arXiv:1912.07160, "DAmageNet: A Universal Adversarial Dataset"), and the authors' code,
# https://github.com/Sizhe-Chen/DAmageNet (commit 2e71091): `damagenet.py` (`AoA`), `transfers.py` (`build_direction`,
# `update_sample`), `lrp.py` (`build_lrp`). The paper takes scale invariance (SI) from Lin et al. (ICLR 2020); which
# copies are used and how they are combined is read from the code, as derived below.
#
# For each image x₀ with label y, at every step, at the current image x:
#
# - **Loss** L(x) = log(mean h_y(x) / mean h_{y₂}(x)) + log p_y(x), to be *decreased* (attention moves away from the
#   true class towards the runner-up, and the true class's probability falls). y₂ is the top class other than y at
#   the image the loss is evaluated on: `build_lrp(out=prob_tensor, out_ori=label)` zeroes y's probability and takes
#   the argmax, inside the graph, so every scaled copy below gets its own y₂.
# - **SI copies.** `update_sample` evaluates the direction first at the fed image x and then, with SI on, at x·0.5ⁱ for
#   i = 0…3: the copies are s ∈ S = (1, 1, ½, ¼, ⅛) (x counted twice; the smallest scale is ⅛).
# - **Each copy's gradient is L1-normalised before averaging.** `build_direction` returns g·N/‖g‖₁ (N = C·H·W values
#   of the image, so mean |·| = 1), and `update_sample` averages those five *directions*, without renormalising the
#   mean. With g_s = ∇ₓ L(s·x) = s·(∇L)(s·x), per image:
#
#   d_s = N·g_s/‖g_s‖₁ = N·(∇L)(s·x)/‖(∇L)(s·x)‖₁  (the factor s > 0 cancels, so differentiating w.r.t. x or w.r.t.
#   the scaled copy, as TensorFlow's `tf.gradients(loss, input)` does, gives the same d_s),
#
#   d = (1/|S|)·Σ_{s∈S} d_s,  so mean |d| ≤ 1, with equality when every copy agrees in sign.
#
#   Every copy thus has the same weight whatever the size of its raw gradient. (ns_vit's previous generator summed
#   the raw gradients of L(x·0.5ⁱ), i = 0…4, and normalised the sum: copy i was weighted by 2⁻ⁱ·‖(∇L)(x·0.5ⁱ)‖₁, x
#   counted once, and the smallest scale was 1/16. Sets built by it are never served: `DAMAGENET_VERSION` is in the
#   cache key.)
# - **Update** x ← clip(x − α·d, 0, 1), then clip to x₀ ± ε (DamageNet: α = 2, ε = 25.5 on the 0–255 scale).
# - **Stop** an image when its RMSD to x₀ exceeds the target (7 on the 0–255 scale), not on success.
#
# Departures, all recorded in the returned info and the cache manifest: the surrogate is our ResNet-9-style CNN on
# 32×32 CIFAR-10 (not VGG19 on 224×224 ImageNet); SGLRP is replaced by Grad-CAM (above); pixel values are in [0, 1],
# so DamageNet's step 2, bound 25.5 and RMSD 7 on the 0–255 scale become α = 2/255, ε = 0.1, RMSD 7/255; DamageNet
# loops `while 1` until the RMSD stop (or NaN), we cap the loop at `steps` iterations (an image that never reaches
# the RMSD target keeps its last iterate); the heat-map means get a floor of 1e-12 before the log, and a copy whose
# gradient is exactly 0 contributes a zero direction (DamageNet stops on NaN instead); the result is rounded to uint8
# as DamageNet's PNGs are. A deterministic copy that appears twice (x) is evaluated once with weight 2.

# %%
#| export
SI_SCALES = (1.0, 1.0, 0.5, 0.25, 0.125)  # DamageNet's SI copies: x, then x·0.5^i for i = 0…3 (transfers.update_sample)

def _rmsd(x: Tensor, x0: Tensor) -> Tensor: return (x - x0).flatten(1).pow(2).mean(1).sqrt()  # (B,)

def runner_up(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    "The top class other than y at images x (B,)."
    with torch.no_grad(): return model(x).scatter(1, y[:, None], float('-inf')).argmax(1)

def aoa_loss(model: nn.Module, x: Tensor, y: Tensor, y2: Tensor | None = None, proxy: str = 'gradcam',
             layer: nn.Module | None = None, floor: float = 1e-12) -> Tensor:
    "DamageNet's loss per image (B,): log(mean h_y / mean h_y2) + log p_y, y2 the runner-up class (default: at x)."
    y2 = runner_up(model, x, y) if y2 is None else y2
    logits, h = attention_maps(model, x, torch.stack([y, y2], 1), proxy, layer)  # h: (B, 2, h, w)
    hm = h.flatten(2).mean(2).clamp_min(floor)  # (B, 2)
    return hm[:, 0].log() - hm[:, 1].log() + F.log_softmax(logits, 1).gather(1, y[:, None])[:, 0]

def si_direction(loss_fn: Callable[[Tensor], Tensor],  # per-image losses (B,) of a batch of (scaled) images
                 x: Tensor,  # current images (B, C, H, W)
                 scales: tuple[float, ...] = SI_SCALES,  # the copies s·x; a repeated scale counts that many times
                 ) -> Tensor:
    "DamageNet's SI direction (B, C, H, W): the mean over copies s·x of each copy's gradient scaled to mean |·| = 1."
    n, d = x[0].numel(), torch.zeros_like(x)
    for s, count in Counter(scales).items():
        xs = x.detach().clone().requires_grad_(True)
        g, = torch.autograd.grad(loss_fn(xs * s).sum(), xs)  # (B, C, H, W) = s·(∇L)(s·x)
        d += count * g * n / g.flatten(1).abs().sum(1).clamp_min(1e-30).view(-1, 1, 1, 1)  # mean |·| = 1 per copy
    return d / len(scales)


# %% [markdown]
# The SI direction checked by hand. For the per-image loss L(x′) = ½‖x′ − c‖², (∇L)(s·x) = s·x − c, so by the
# derivation d = (1/5)·Σ_s N·(s·x − c)/‖s·x − c‖₁ over s ∈ (1, 1, ½, ¼, ⅛). A loss that records what it is called
# with shows the copies; one copy gives mean |d| = 1 exactly; the real loss on the surrogate gives the mean of the
# separately normalised autograd gradients of its copies, each with its own runner-up:

# %%
torch.manual_seed(0)
xq, cq = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
quad = lambda xs: 0.5 * (xs - cq).flatten(1).pow(2).sum(1)  # (B,)
N = xq[0].numel()
by_hand = sum(N * (s * xq - cq) / (s * xq - cq).flatten(1).abs().sum(1).view(-1, 1, 1, 1) for s in SI_SCALES) / 5
test_close(si_direction(quad, xq), by_hand, eps=1e-5)
raw = sum(s * (s * xq - cq) for s in (1, 0.5, 0.25, 0.125, 0.0625))  # the previous generator: ∇ₓ L(x·0.5ⁱ) summed ...
old = raw * N / raw.flatten(1).abs().sum(1).view(-1, 1, 1, 1)
assert (old - by_hand).abs().max() > 0.05  # ... gives another direction
seen = []
si_direction(lambda xs: (seen.append(round((xs / xq).mean().item(), 6)), quad(xs))[1], xq)
test_eq(sorted(seen), [0.125, 0.25, 0.5, 1.0])  # each distinct copy evaluated once (x with weight 2)
test_close(si_direction(quad, xq, scales=(1.0,)).abs().flatten(1).mean(1), torch.ones(3), eps=1e-5)
test_close(si_direction(quad, xq, scales=(0.5,)), si_direction(quad, xq, scales=(0.5, 0.5)), eps=1e-6)
assert (si_direction(quad, xq).abs().flatten(1).mean(1) <= 1 + 1e-6).all()

m = surrogate_cnn().eval()
x = torch.rand(4, 3, 32, 32); y = torch.arange(4)
d = si_direction(lambda xs: aoa_loss(m, xs, y), x)
parts = []
for s in SI_SCALES:
    xs = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(aoa_loss(m, xs * s, y, runner_up(m, x * s, y)).sum(), xs)
    parts.append(g / g.flatten(1).abs().mean(1).view(-1, 1, 1, 1))
test_close(d, torch.stack(parts).mean(0), eps=1e-4)


# %%
#| export
def _aoa_batch(model, x0, y, eps, steps, alpha, rmsd, scales, proxy, layer) -> tuple[Tensor, Tensor]:
    "Attack one batch; returns (adversarial images, steps taken per image)."
    x, done = x0.clone(), torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
    taken = torch.zeros(len(x0), dtype=torch.long)
    for _ in range(steps):
        act = (~done).nonzero()[:, 0]
        if len(act) == 0: break
        ya = y[act]
        d = si_direction(lambda xs: aoa_loss(model, xs, ya, None, proxy, layer), x[act], scales)  # (b, C, H, W)
        xn = (x[act] - alpha * d).clamp(0, 1)
        xn = torch.minimum(torch.maximum(xn, x0[act] - eps), x0[act] + eps)
        x[act] = xn; taken[act.cpu()] += 1
        done[act] = _rmsd(xn, x0[act]) > rmsd
    return x, taken

def damagenet_attack(surrogate: nn.Module, images: Tensor, labels: Tensor, *,
                     eps: float = 0.1,  # L∞ bound around the clean image (DamageNet: 25.5 / 255)
                     steps: int = 20,  # cap on iterations (DamageNet: unbounded, stops on RMSD only)
                     alpha: float = 2 / 255,  # step size on the SI direction (DamageNet: 2 / 255)
                     rmsd: float = 7 / 255,  # stop an image once its RMSD to the clean one exceeds this
                     scales: tuple[float, ...] = SI_SCALES,  # scale-invariance copies s·x (DamageNet: 1, 1, ½, ¼, ⅛)
                     proxy: str = 'gradcam',  # attention proxy replacing SGLRP: 'gradcam' | 'gradxinput'
                     layer: nn.Module | None = None,  # Grad-CAM layer for surrogates other than SurrogateCNN
                     batch_size: int = 250,  # images per batch
                     quantize: bool = True,  # round to uint8 levels as DamageNet's PNGs
                     return_info: bool = False,  # also return a dict of settings and per-image steps, RMSD, L∞
                     quiet: bool = True):  # no progress bar
    "DamageNet's attack on attention against `surrogate`: adversarial images in [0, 1] (and, optionally, info)."
    if eps <= 0 or alpha <= 0 or rmsd <= 0: raise ValueError('eps, alpha and rmsd must be positive')
    if not scales or min(scales) <= 0: raise ValueError(f'scales must be positive numbers, got {scales!r}')
    dev = model_device(surrogate)
    out, taken = [], []
    with frozen(surrogate):
        for i in tqdm(range(0, len(images), batch_size), desc='damagenet', disable=quiet):
            xb, yb = images[i:i + batch_size].to(dev), labels[i:i + batch_size].to(dev)
            adv, t = _aoa_batch(surrogate, xb, yb, eps, steps, alpha, rmsd, tuple(scales), proxy, layer)
            out.append(adv.detach().cpu()); taken.append(t)
    adv = torch.cat(out) if out else images.clone()
    if quantize: adv = (adv * 255).round() / 255
    if not return_info: return adv
    taken = torch.cat(taken) if taken else torch.zeros(0, dtype=torch.long)
    info = dict(proxy=proxy, proxy_layer='stage3 (last conv stage)' if layer is None else str(layer), eps=eps, steps=steps,
                alpha=alpha, rmsd_target=rmsd, scales=list(scales), quantize=quantize, steps_taken=taken,
                rmsd=_rmsd(adv, images), linf=(adv - images).flatten(1).abs().amax(1))
    return adv, info


# %%
torch.manual_seed(0)
m = surrogate_cnn().eval()
x0 = (torch.rand(6, 3, 32, 32) * 255).round() / 255
y0 = torch.arange(6)
adv, info = damagenet_attack(m, x0, y0, steps=4, return_info=True)
test_eq(adv.shape, x0.shape)
assert adv.min() >= 0 and adv.max() <= 1
assert (info['linf'] <= 0.1 + 0.5 / 255 + 1e-6).all()  # ε plus at most half a uint8 level from rounding
test_close(adv * 255, (adv * 255).round(), eps=1e-4)  # on the uint8 grid
# each image stopped at the RMSD target or ran out of steps
assert ((info['steps_taken'] == 4) | (info['rmsd'] > 7 / 255 - 0.5 / 255)).all(), info
raw = damagenet_attack(m, x0, y0, steps=4, quantize=False)
with torch.no_grad(): assert aoa_loss(m, raw, y0).mean() < aoa_loss(m, x0, y0).mean()  # the attack lowers its loss
one = damagenet_attack(m, x0, y0, steps=1, quantize=False, rmsd=1.0)  # one step is x − α·d with the SI direction
test_close(one, (x0 - 2 / 255 * si_direction(lambda xs: aoa_loss(m, xs, y0), x0)).clamp(0, 1), eps=1e-5)
test_eq(damagenet_attack(m, x0, y0, steps=0), x0)  # zero steps: the clean images
test_fail(lambda: damagenet_attack(m, x0, y0, eps=0), contains='positive')
test_fail(lambda: damagenet_attack(m, x0, y0, scales=(1.0, 0.0)), contains='scales')
print({k: v for k, v in info.items() if not isinstance(v, Tensor)}, info['steps_taken'].tolist())

# %% [markdown]
# ## The cached CIFAR-10 transfer set
#
# `damagenet_cifar10` attacks a seeded sample of the test images once and keeps the result (uint8 images, labels and
# the generation statistics) as one entry of the project's cache (`ns_vit.cache.cached`, under
# `ns_vit.data.cache_dir()/damagenet_cifar10/`). What makes it trustworthy:
#
# - **The key is the content** of everything that determines the set (`damagenet_key`): the sha256 of the source
#   sample's images *and* labels (a repaired or different CIFAR-10 copy is a different request), the attack
#   parameters, `DAMAGENET_VERSION` (the generator's version, bumped whenever the algorithm changes, so a set made by
#   older code is never served) and the surrogate's `weights_digest`. An entry made for another key is stale.
# - **The entry checks itself**: it stores the sha256 of its payload, verified on every read, so an edited label, a
#   flipped byte or a truncated file is caught before anything is loaded (and loading is `weights_only`).
# - A stale, corrupt or truncated entry, and a file in the previous (pre-cache) layout, is reported with its path in a
#   `CacheWarning` and regenerated: never served, never a bare torch zip or JSON error. Writes are atomic, one process
#   generates while others wait, and temp files left by a killed writer are removed.
#
# Cost: every set records its generation statistics (mean steps per image, RMSD, L∞, seconds, threads) in its
# manifest, and the experiment below writes them to `reports/damagenet_cifar10/meta.json`. With the trained surrogate
# an image takes a few steps (4 distinct SI copies each) until its RMSD passes 7/255, so the whole test set takes
# minutes on one CPU thread, once; the default is therefore n = 10,000 (all test images, Wilson half-width ≤ 1 point),
# the same images as the clean column of Table 2.

# %%
#| export
DAMAGENET_N = 10000
DAMAGENET_VERSION = 2  # 2: SI copies (1, 1, ½, ¼, ⅛), each gradient L1-normalised before averaging, runner-up per copy

def damagenet_key(surrogate: nn.Module, source: UInt8Images, seed: int, attack_kw: dict) -> dict:
    "What a cached transfer set is made from: source images and labels, attack parameters, generator version, surrogate."
    sig = inspect.signature(damagenet_attack).parameters
    attack = {k: sig[k].default for k in ('eps', 'steps', 'alpha', 'rmsd', 'scales', 'proxy', 'quantize')} | attack_kw
    return dict(dataset='cifar10-test', n=len(source), seed=seed, source_sha256=content_digest(source.images, source.labels),
                attack=attack, generator=DAMAGENET_VERSION, surrogate=type(surrogate).__name__,
                surrogate_weights=weights_digest(surrogate, 16))

def _generate(surrogate: nn.Module, source: UInt8Images, attack_kw: dict, quiet: bool) -> dict:
    "The cache entry of a transfer set: uint8 images (n, H, W, C) as `UInt8Images` holds them, labels, generation info."
    t0 = time.time()
    x0, y = source.tensors()
    adv, info = damagenet_attack(surrogate, x0, y, return_info=True, quiet=quiet, **attack_kw)
    stats = dict(steps_mean=info['steps_taken'].float().mean().item(), rmsd_mean=info['rmsd'].mean().item() * 255,
                 linf_max=info['linf'].max().item() * 255, seconds=round(time.time() - t0, 1), threads=torch.get_num_threads())
    return {'images': (adv * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous(), 'labels': y.long(),
            'info': dict(proxy_layer=info['proxy_layer'], generation=stats, ns_vit=ns_vit.__version__,
                         departures='SGLRP -> Grad-CAM; 32 px CIFAR-10 + ResNet-9-style CNN; steps capped; see ns_vit.damagenet')}


# %%
#| export
def damagenet_cifar10(n: int = DAMAGENET_N,  # test images attacked (a seeded sample; 10,000 = all)
                      seed: int = 0,  # seed of the sample
                      *,
                      surrogate: nn.Module | None = None,  # default: `load_surrogate()`
                      cache: str | Path | None = None,  # cache folder (default `cache_dir()/damagenet_cifar10`)
                      return_manifest: bool = False,  # also return the key and the generation info
                      quiet: bool = False,  # no progress bar
                      **attack_kw) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict]:
    "The DamageNet-style transfer set on `n` seeded CIFAR-10 test images: (images float [0, 1], labels); cached."
    surrogate = surrogate if surrogate is not None else load_surrogate()
    source = cifar10('test').subset(n, seed)
    key = damagenet_key(surrogate, source, seed, attack_kw)
    path = (Path(cache) if cache is not None else cache_dir() / 'damagenet_cifar10') / f'damagenet-cifar10-n{len(source)}-seed{seed}.pt'
    path.with_suffix('.json').unlink(missing_ok=True)  # the manifest of the previous (pre-cache) layout
    entry, hit = cached(path, lambda: _generate(surrogate, source, attack_kw, quiet), meta=key)
    images = entry['images'].permute(0, 3, 1, 2).float().div(255)  # (n, C, H, W)
    manifest = {**json.loads(json.dumps(key)), **entry['info'], 'cache': dict(path=path.name, served_from_cache=hit)}
    return (images, entry['labels'], manifest) if return_manifest else (images, entry['labels'])


# %% [markdown]
# On a random-init surrogate and a temporary cache folder: the second call reads the cache without rewriting it; a
# different surrogate or parameter is a different key (stale: rebuilt with a warning); a set made by an older
# generator version is rebuilt; a label changed behind the cache's back is caught by the checksum and the set comes
# back with the correct labels; a truncated entry, a damaged header and a file in the previous `.pt` + `.json` layout
# are reported with their path and regenerated, never a torch zip or JSON error.

# %%
def warned(fn) -> tuple[object, list[str]]:
    "fn()'s result and the messages of the warnings it raised."
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); r = fn()
    return r, [str(x.message) for x in w]

def edit_entry(p: Path, fn) -> None:
    "Apply fn to the tensors in cache entry `p` and write them back under the old header (an edit behind the cache's back)."
    magic, head, payload = p.read_bytes().split(b'\n', 2)
    d = torch.load(io.BytesIO(payload), weights_only=True); fn(d)
    buf = io.BytesIO(); torch.save(d, buf); p.write_bytes(magic + b'\n' + head + b'\n' + buf.getvalue())

with tempfile.TemporaryDirectory() as d:
    p = Path(d) / 'damagenet-cifar10-n4-seed0.pt'
    get = lambda s, **kw: damagenet_cifar10(4, surrogate=s, cache=d, return_manifest=True, quiet=True, **{'steps': 2, **kw})
    torch.manual_seed(0); s1 = surrogate_cnn().eval()
    (x1, y1, m1), msgs = warned(lambda: get(s1))
    test_eq(msgs, []); test_eq(x1.shape, (4, 3, 32, 32)); test_eq(m1['surrogate_weights'], weights_digest(s1, 16))
    test_eq(m1['generator'], DAMAGENET_VERSION); test_eq(m1['attack']['scales'], list(SI_SCALES))
    test_eq(m1['cache']['served_from_cache'], False)
    y_true = cifar10('test').subset(4, 0).labels
    test_eq(y1, y_true)
    x0 = cifar10('test').subset(4, 0).tensors()[0]
    assert (x1 - x0).abs().amax() > 0 and (x1 - x0).abs().amax() <= 0.1 + 1 / 255
    t = os.path.getmtime(p)
    (x2, _, m2), msgs = warned(lambda: get(s1))  # cache hit: same tensors, no rewrite, no warning
    test_eq(x2, x1); test_eq(os.path.getmtime(p), t); test_eq(msgs, []); test_eq(m2['cache']['served_from_cache'], True)

    torch.manual_seed(1); s2 = surrogate_cnn().eval()
    _, msgs = warned(lambda: get(s2))  # another surrogate
    assert len(msgs) == 1 and 'stale' in msgs[0] and 'surrogate_weights' in msgs[0] and str(p) in msgs[0], msgs
    (_, _, m3), msgs = warned(lambda: get(s2, steps=1))  # another parameter
    assert 'stale' in msgs[0] and 'attack' in msgs[0]; test_eq(m3['attack']['steps'], 1)

    old = damagenet_key(s2, cifar10('test').subset(4, 0), 0, {'steps': 1}) | {'generator': 1}  # made by the old generator
    save_entry(torch.load(io.BytesIO(p.read_bytes().split(b'\n', 2)[2]), weights_only=True), p, meta=old)
    _, msgs = warned(lambda: get(s2, steps=1))
    assert 'stale' in msgs[0] and 'generator' in msgs[0], msgs

    edit_entry(p, lambda e: e['labels'].__setitem__(0, (e['labels'][0] + 1) % 10))  # change a label
    (_, y4, _), msgs = warned(lambda: get(s2, steps=1))
    assert len(msgs) == 1 and 'sha256' in msgs[0] and str(p) in msgs[0], msgs
    test_eq(y4, y_true)  # regenerated with the correct labels

    legacy = lambda: (torch.save({'images': torch.zeros(4, 32, 32, 3, dtype=torch.uint8), 'labels': y_true}, p),
                      p.with_suffix('.json').write_text('{"n": 4'))  # the previous layout, its manifest truncated
    for damage, expect in ((lambda: p.write_bytes(p.read_bytes()[:-1000]), 'truncated'),
                           (lambda: p.write_bytes(p.read_bytes().replace(b'"format"', b'"form\x00t', 1)), 'header'),
                           (lambda: p.write_bytes(b''), 'not an ns_vit cache entry'),
                           (legacy, 'not an ns_vit cache entry')):
        damage()
        (x5, y5, _), msgs = warned(lambda: get(s2, steps=1))
        assert len(msgs) == 1 and expect in msgs[0] and str(p) in msgs[0], (expect, msgs)
        test_eq(y5, y_true); test_eq(x5.shape, (4, 3, 32, 32)); assert (x5 != 0).any()
        test_eq(warned(lambda: get(s2, steps=1))[1], [])  # and the regenerated entry is served
    assert not p.with_suffix('.json').exists() and not list(Path(d).glob('.*.tmp'))

# %% [markdown]
# ## Experiment
#
# The DamageNet-style column of Table 2 on CIFAR-10: load the committed surrogate (or train it when
# `data/surrogate_cnn.safetensors` is absent), build the cached transfer set on `n` seeded test images, and score the
# surrogate (white-box: it is the model attacked) and the embedded default ViT (black-box transfer) on the clean and
# the adversarial versions of the same images, with Wilson 95% intervals and a paired McNemar test of clean vs
# transfer accuracy for each model.

# %% tags=["parameters"]
n: int = 10000  # CIFAR-10 test images attacked (seeded sample); 10000: the whole test set
seed: int = 0  # seed of the sample
eps: float = 0.1  # L∞ bound of the attack (DamageNet: 25.5/255)
steps: int = 20  # cap on attack iterations (DamageNet stops on RMSD only)
rmsd: float = 7 / 255  # stop an image once its RMSD to the clean image exceeds this (DamageNet: 7/255)
proxy: str = 'gradcam'  # attention proxy replacing SGLRP: 'gradcam' | 'gradxinput'
surrogate_epochs: int = 8  # epochs if the surrogate has to be trained
model: str = 'default'  # the ViT evaluated black-box: 'default' (embedded CIFAR-10 ViT) or a timm ViT name
checkpoint: str = ''  # its weights: '' (the default model's), a local file, or 'hub'
device: str = 'cpu'  # 'cpu', 'cuda', ...
threads: int = 2  # CPU threads for torch
smoke: bool = False  # tiny run for tests (random-ish surrogate, a few images; written under runs/smoke/)
report: str = ''  # folder under reports/ for this run; '' → damagenet_cifar10. A named folder is written whatever the parameters (unnamed, a non-default run goes to runs/reports/<artifact>-<digest>)
commit_report: bool = False  # write into the committed reports/ folder even when the parameters differ from its meta.json (make reports and make study do)


# %%
import pandas as pd, matplotlib.pyplot as plt
from ns_vit.models import get_model, predict
from ns_vit.data import CIFAR10_CLASSES
from ns_vit.report import report_dir, write_meta, save_table, save_figure, in_test
from ns_vit.stats import accuracy_ci, mcnemar, fmt_ci
smoke = smoke or in_test()
if smoke: n, steps, threads = 8, 2, 1
torch.set_num_threads(threads)
params = dict(n=n, seed=seed, eps=eps, steps=steps, rmsd=rmsd, proxy=proxy, surrogate_epochs=surrogate_epochs, model=model,
              checkpoint=checkpoint, device=device, threads=threads, smoke=smoke)
out = report_dir(report or 'damagenet_cifar10', smoke, params=params, commit=commit_report or bool(report))
t0 = time.time()

# %%
if smoke:  # one batch on 256 images: the pipeline, not the numbers
    sp = repo_root() / 'runs/smoke/surrogate_cnn.safetensors'
    surrogate = train_surrogate(epochs=1, n_train=256, n_test=100, path=sp, state_path=sp.with_suffix('.state.pt'), quiet=True)
    cache = repo_root() / 'runs/smoke/cache'
elif (repo_root() / SURROGATE_PATH).exists():
    surrogate = load_surrogate()
    cache = None
else:
    surrogate = train_surrogate(epochs=surrogate_epochs)
    cache = None
surrogate, card = surrogate.to(device).eval(), surrogate.card
print(f"surrogate: {card['params']:,} parameters, test accuracy {card['test_accuracy']:.4f} on {card['test_n']} images, "
      f"trained in {card['wall_time_s'] / 60:.1f} min ({card['threads']} thread(s))")

# %%
x_clean, y = cifar10('test').subset(n, seed).tensors()
t1 = time.time()
x_adv, y_adv, manifest = damagenet_cifar10(n, seed, surrogate=surrogate, cache=cache, return_manifest=True, quiet=smoke,
                                            eps=eps, steps=steps, rmsd=rmsd, proxy=proxy)
t_set = time.time() - t1
assert torch.equal(y_adv, y)
print('generation:', manifest['generation'], f'(this call: {t_set:.1f} s)')

# %%
vit = get_model(model, checkpoint, device)
rows, tests, correct = [], [], {}
for name, net in (('surrogate CNN (white-box)', surrogate), (f'{model} ViT (transfer)', vit)):
    for split, xs in (('clean', x_clean), ('DamageNet-style', x_adv)):
        correct[name, split] = predict(net, xs).argmax(1) == y
        rows.append(dict(model=name, images=split, **accuracy_ci(correct[name, split])))
    mc = mcnemar(correct[name, 'clean'], correct[name, 'DamageNet-style'])
    tests.append(dict(model=name, clean_minus_adv=mc['diff'], ci_low=mc['ci_low'], ci_high=mc['ci_high'],
                      p_value=mc['p_value'], only_clean=mc['only_a'], only_adv=mc['only_b'], n=mc['n']))
acc, paired = pd.DataFrame(rows), pd.DataFrame(tests)
acc['95% CI'] = [fmt_ci(r.value, r.ci_low, r.ci_high) for r in acc.itertuples()]
delta = x_adv - x_clean
size = pd.DataFrame([dict(linf_max_255=delta.flatten(1).abs().amax(1).max().item() * 255,
                          linf_mean_255=delta.flatten(1).abs().amax(1).mean().item() * 255,
                          l2_mean=delta.flatten(1).norm(dim=1).mean().item(), l2_median=delta.flatten(1).norm(dim=1).median().item(),
                          rmsd_mean_255=delta.flatten(1).pow(2).mean(1).sqrt().mean().item() * 255, n=n)])
save_table(acc, out, 'accuracy'); save_table(paired, out, 'mcnemar'); save_table(size, out, 'perturbation')
print(acc.to_string(index=False)); print(paired.to_string(index=False)); print(size.to_string(index=False))

# %%
sel = torch.tensor([int((y == c).nonzero()[0, 0]) for c in range(10) if (y == c).any()][:6])  # one image per class
k = len(sel)
pred_vit = {s: predict(vit, xs[sel]).argmax(1) for s, xs in (('clean', x_clean), ('adv', x_adv))}
fig, axes = plt.subplots(3, k, figsize=(1.9 * k, 6.2), squeeze=False)
for j, t in enumerate(sel.tolist()):
    d = delta[t]
    for i, (img, title) in enumerate(((x_clean[t], f"clean: {CIFAR10_CLASSES[y[t]]}\nViT: {CIFAR10_CLASSES[pred_vit['clean'][j]]}"),
                                      (x_adv[t], f"adversarial\nViT: {CIFAR10_CLASSES[pred_vit['adv'][j]]}"),
                                      ((d / (2 * d.abs().max().clamp_min(1e-8)) + 0.5), 'perturbation\n(rescaled)'))):
        axes[i, j].imshow(img.permute(1, 2, 0).clamp(0, 1).numpy()); axes[i, j].set_title(title, fontsize=8); axes[i, j].axis('off')
fig.suptitle(f'DamageNet-style transfer set (surrogate CNN, {proxy} attention, L∞ ≤ {eps:.3g}, RMSD stop {rmsd * 255:.3g}/255)', fontsize=9)
save_figure(fig, out, 'examples'); plt.close(fig)

# %%
write_meta(out, params, t0, device, surrogate={k: v for k, v in card.items() if k != 'history'}, manifest=manifest,
           generation_seconds_this_call=round(t_set, 1))
print('wrote', sorted(p.name for p in out.iterdir()), f'in {time.time() - t0:.0f} s')

# %% [markdown]
# Reading the result: the surrogate's white-box row says how strong the attack is on the network it was made on; the
# ViT's row is the black-box transfer that Table 2's DamageNet column measures. Both compare the same `n` images
# clean and attacked, so the McNemar test (`mcnemar.md`) decides whether the drop is real; `perturbation.md` gives
# the size of what was added (RMSD ≈ 7/255 by construction, L∞ ≤ ε up to uint8 rounding).
