# %% [markdown]
# # The exact nullspace of the patch embedding
# > The patch embedding maps C·P² pixels to D < C·P² numbers: noise in its nullspace leaves a ViT's output unchanged.

# %%
#| default_exp nullspace

# %%
#| export
from __future__ import annotations
import torch
from torch import nn, Tensor
import torch.nn.functional as F
from ns_vit.models import PixelViT, as_vit, check_vit, eval_mode, patch_size, in_chans, input_size  # `patch_size` re-exported here (`_all_`)
_all_ = ['patch_size']

# %%
#| hide
import os, timm
from fastcore.test import test_eq, test_fail, test_close
torch.manual_seed(0)
from ns_vit.models import create_vit, default_vit, load_default_model, DEFAULT_CHECKPOINT
from ns_vit.data import repo_root


# %% [markdown]
# Paper §3.1. A ViT cuts an image into non-overlapping P×P patches and maps each flattened patch
# p ∈ ℝ^{C·P²} linearly to a token e = W p + b ∈ ℝ^D. Everything after the patch embedding sees the image only through
# these tokens. By rank–nullity, W (D × C·P²) has a nullspace of dimension C·P² − rank W ≥ C·P² − D, and any pixel
# noise whose every patch lies in that nullspace leaves every token, hence every logit, exactly unchanged.

# %% [markdown]
# ## The patch embedding as a matrix
# The conv weight (D, C, P, P) flattened to (D, C·P·P) *over all input channels jointly*: a patch is one vector of
# C·P² numbers, and the nullspace lives in that joint space. (The reference implementation takes the SVD of each
# channel's (D, P²) slice separately; for ViT-S/16 every slice (384 × 256) has full column rank, so it finds no
# nullspace at all, where the joint (384 × 768) matrix has a 384-dimensional one.)
#
# ns_vit models take pixels in [0, 1] and normalise inside (`PixelViT`): the conv sees (x − μ)/σ. The shift by μ only
# adds a constant to each token, so the linear map from *pixel* patches is W_pix = W · diag(1/σ), with σ repeated over
# the P² positions of each channel. For a bare timm ViT the matrix is W itself. The matrix is returned in float64, so
# everything computed from it is done in double precision.

# %%
#| export
def _f64(device: torch.device) -> torch.dtype:
    "float64 where the device has it (not on Apple MPS)."
    return torch.float32 if torch.device(device).type == 'mps' else torch.float64

def patch_embed_matrix(model: nn.Module) -> Tensor:
    "The linear map (D, C·P·P) from flattened pixel patches to tokens, joint over channels, in float64."
    w = check_vit(as_vit(model)).patch_embed.proj.weight.detach()  # (D, C, P, P)
    W = w.to(_f64(w.device)).reshape(w.shape[0], -1)  # (D, C*P*P), flattened (c, i, j) as F.unfold does
    if isinstance(model, PixelViT):  # normalisation (x - mean) / std: only the 1/std scaling is linear
        inv_std = 1 / model.std.to(W).flatten().repeat_interleave(w.shape[2] * w.shape[3])  # (C*P*P,)
        W = W * inv_std[None]
    return W


# %% [markdown]
# The matrix reproduces the conv on normalised pixels, patch for patch, with `F.unfold`'s flattening order:

# %%
d0 = default_vit().eval()
W = patch_embed_matrix(d0)
test_eq(W.shape, (128, 192)); test_eq(W.dtype, torch.float64)
x = torch.rand(2, 3, 32, 32)
conv = d0.vit.patch_embed.proj
tokens = conv(d0.normalize(x)) - conv(d0.normalize(torch.zeros_like(x)))  # (B, D, 4, 4): bias and mean shift removed
patches = F.unfold(x.double(), 8, stride=8)  # (B, C*P*P, L)
test_close((W @ patches).float(), tokens.flatten(2), eps=1e-5)
test_eq(patch_embed_matrix(d0.vit), conv.weight.detach().double().reshape(128, -1))  # bare ViT: no 1/std
test_eq(patch_size(d0), (8, 8))  # `models.patch_size`, re-exported here
test_eq(patch_size(create_vit('vit_tiny_patch16_224', img_size=(16, 32), patch_size=(4, 8), embed_dim=32, depth=1, num_heads=2)), (4, 8))


# %% [markdown]
# ## An orthonormal basis of the nullspace
# The SVD W = U S Vᵀ (float64) gives the basis as the rows of Vᵀ beyond the numerical rank. The rank counts singular
# values above `rtol · σ_max`, with numpy's `matrix_rank` default `rtol = max(D, C·P²) · eps` of the weights' dtype
# (1.19e-7 for float32), since the weights are only known to that precision. Half-precision weights use float32's
# eps: max(D, C·P²) times bfloat16's eps (7.8e-3) would exceed 1 and call every direction null. Within the nullspace
# the basis is any orthonormal one (zero singular values are degenerate), so single vectors mean nothing, only the span.

# %%
#| export
def _numerical_rank(S: Tensor, shape: tuple[int, int], dtype: torch.dtype, rtol: float | None = None) -> int:
    "Number of singular values `S` above rtol·σ_max; default rtol = max(shape)·eps(dtype), numpy's convention."
    if rtol is None: rtol = max(shape) * torch.finfo(torch.promote_types(dtype, torch.float32)).eps  # half: float32's eps
    return int((S > rtol * S.max()).sum())

def patch_embed_nullspace(model: nn.Module, rtol: float | None = None) -> Tensor:
    "Orthonormal basis (k, C·P·P) of the nullspace of the patch embedding (pixel space for a `PixelViT`), float64."
    W = patch_embed_matrix(model)  # (D, N)
    _, S, Vh = torch.linalg.svd(W, full_matrices=True)  # S (min(D, N),), Vh (N, N)
    return Vh[_numerical_rank(S, W.shape, as_vit(model).patch_embed.proj.weight.dtype, rtol):]  # (k, N), k = N - rank

def null_dims(model: nn.Module, rtol: float | None = None) -> dict:
    "Patch size, D, C·P², nullspace dimension by rank–nullity (C·P² − min(D, C·P²)) and numerically (at `rtol`)."
    w = check_vit(as_vit(model)).patch_embed.proj.weight  # (D, C, ph, pw)
    (D, C, ph, pw), W = w.shape, patch_embed_matrix(model)  # W (D, C*ph*pw)
    N = C * ph * pw
    return dict(patch=ph if ph == pw else (ph, pw), embed_dim=D, input_dim=N, null_dim_rank_nullity=N - min(D, N),
                null_dim_numerical=N - _numerical_rank(torch.linalg.svdvals(W), W.shape, w.dtype, rtol))


# %% [markdown]
# ViT-S/16 (random init; the dimension does not depend on the weights unless they are rank-deficient) has
# 3·16² − 384 = 384 null dimensions, half its input space, and the embedded default ViT 3·8² − 128 = 64. Taken per
# channel, as the reference code does, every slice has full column rank and no nullspace shows up:

# %%
vit_s = create_vit('vit_small_patch16_224')
test_eq(null_dims(vit_s), dict(patch=16, embed_dim=384, input_dim=768, null_dim_rank_nullity=384, null_dim_numerical=384))
test_eq(null_dims(d0), dict(patch=8, embed_dim=128, input_dim=192, null_dim_rank_nullity=64, null_dim_numerical=64))
w_s = vit_s.vit.patch_embed.proj.weight.detach()  # (384, 3, 16, 16)
test_eq([256 - torch.linalg.matrix_rank(w_s[:, c].reshape(384, -1)).item() for c in range(3)], [0, 0, 0])  # per channel
Q = patch_embed_nullspace(d0)
test_eq(Q.shape, (64, 192))
test_close(Q @ Q.T, torch.eye(64, dtype=torch.float64), eps=1e-12)  # orthonormal
assert (W @ Q.T).abs().max() < 1e-12 * W.abs().max()  # in the nullspace

# %% [markdown]
# The numerical rank sees rank-deficient weights that rank–nullity cannot: a patch embedding of rank 100 has
# 192 − 100 = 92 null dimensions. A tolerance of 1 counts no singular value, so the whole input space is "null":

# %%
_m = default_vit()
low_rank = torch.randn(128, 100) @ torch.randn(100, 192)  # (D, C*P*P) of rank 100
with torch.no_grad(): _m.vit.patch_embed.proj.weight.copy_(low_rank.view(128, 3, 8, 8))
test_eq(null_dims(_m)['null_dim_numerical'], 92); test_eq(null_dims(_m)['null_dim_rank_nullity'], 64)
test_eq(null_dims(d0, rtol=1.0)['null_dim_numerical'], 192)
test_eq(null_dims(default_vit().to(torch.bfloat16))['null_dim_numerical'], 64)  # not 192: eps is float32's at most


# %% [markdown]
# ## Nullspace noise in image space
# Eq. 2: for every patch independently, a random combination of the basis vectors with standard Gaussian
# coefficients, folded back into an image. Each noise image is then rescaled to a given L2 norm over all its pixels
# (`norm`: one number, or one per image, e.g. `x.flatten(1).norm(dim=1)` for noise as large as the images
# themselves). Noise is drawn and combined in float64 and returned in the weights' dtype.

# %%
#| export
def _check_img_size(img_size: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
    "`img_size` as (H, W) if it is a multiple of the patch size; a clear error otherwise."
    H, W = img_size
    if H % patch[0] or W % patch[1]:
        raise ValueError(f'image size {H}×{W} is not a multiple of the patch size {patch[0]}×{patch[1]}: the nullspace '
                         'acts patch by patch, so crop or resize the images to a multiple of the patch size.')
    return H, W

def nullspace_noise(model: nn.Module,
                    n: int = 1,  # number of noise images
                    norm: float | Tensor = 1.0,  # L2 norm of each noise image: a number or one per image (n,)
                    img_size: int | tuple[int, int] | None = None,  # (H, W); default: the model's image size
                    basis: Tensor | None = None,  # precomputed `patch_embed_nullspace(model)`, to skip the SVD
                    generator: torch.Generator | None = None) -> Tensor:
    "`n` noise images (n, C, H, W) in the patch embedding's nullspace (Eq. 2), each of L2 norm `norm`."
    vit = check_vit(as_vit(model))
    w = vit.patch_embed.proj.weight  # (D, C, ph, pw)
    P = tuple(w.shape[2:])
    img_size = img_size or input_size(model)
    if img_size is None: raise ValueError('the model has no fixed image size: pass img_size')
    H, W = _check_img_size((img_size, img_size) if isinstance(img_size, int) else tuple(img_size), P)
    Q = patch_embed_nullspace(model) if basis is None else basis  # (k, C*ph*pw)
    if len(Q) == 0: raise ValueError(f'the patch embedding has no nullspace ({null_dims(model)}): D ≥ C·P² and full rank')
    dev = generator.device if generator is not None else w.device
    Q = Q.to(dev, _f64(dev))
    z = torch.randn(n, (H // P[0]) * (W // P[1]), len(Q), generator=generator, device=dev, dtype=Q.dtype)  # (n, L, k)
    v = F.fold((z @ Q).transpose(1, 2), (H, W), P, stride=P)  # (n, L, C*ph*pw) -> (n, C, H, W)
    norm = torch.as_tensor(norm, device=dev, dtype=Q.dtype).reshape(-1, 1, 1, 1)  # (n or 1, 1, 1, 1)
    return (v * norm / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).to(w.device, w.dtype)


# %% [markdown]
# The noise has the requested norms, and it does not change the patch tokens (up to float32 round-off):

# %%
g = torch.Generator().manual_seed(0)
x = torch.rand(4, 3, 32, 32)
v = nullspace_noise(d0, 4, norm=x.flatten(1).norm(dim=1), generator=g)
test_eq(v.shape, x.shape); test_eq(v.dtype, torch.float32)
test_close(v.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), eps=1e-4)
test_close(d0.vit.patch_embed(d0.normalize(x + v)), d0.vit.patch_embed(d0.normalize(x)), eps=1e-4)
v0 = nullspace_noise(d0, 2, norm=torch.tensor([0.0, 2.0]), generator=g)
test_eq(v0[0].abs().max().item(), 0.0); test_close(v0[1].norm(), 2.0, eps=1e-5)
test_eq(nullspace_noise(d0, 1, img_size=(16, 48), generator=g).shape, (1, 3, 16, 48))
test_fail(lambda: nullspace_noise(d0, 1, img_size=30), contains='multiple of the patch size')
_full = create_vit('vit_tiny_patch16_224', img_size=32, patch_size=8)  # D = 192 = C·P²: full rank, no nullspace
test_fail(lambda: nullspace_noise(_full), contains='no nullspace')


# %% [markdown]
# ## The model does not see it
# Noise as large as the image itself (‖v‖ = ‖x‖, added without clipping) moves the logits by float32 round-off only:
# max |Δlogit| ≤ 1e-4 · max |logit|, on the default architecture and on random-init timm ViTs with a class token,
# a distillation token and register tokens (at small image sizes to keep the tests fast). Gaussian noise of the same
# norm moves them by the order of the logits themselves, and in float64 the nullspace error drops to ~1e-15.

# %%
#| export
@torch.no_grad()
def logit_change(model: nn.Module, x: Tensor, noise: Tensor) -> dict:
    "How much adding `noise` (unclipped) to images `x` moves the logits: max |Δlogit|, max |logit|, ratio, flips."
    p = next(model.parameters())
    x, noise = x.to(p.device, p.dtype), noise.to(p.device, p.dtype)
    with eval_mode(model): l0, l1 = model(x), model(x + noise)  # (B, num_classes)
    d, m = (l1 - l0).abs().max().item(), l0.abs().max().item()
    return dict(max_abs_dlogit=d, max_abs_logit=m, rel_err=d / m, pred_flips=int((l0.argmax(1) != l1.argmax(1)).sum()))


# %%
def _invariance(model, img_size, seed=0, dtype=torch.float32):
    "logit_change under nullspace noise and same-norm Gaussian noise, on random images."
    g = torch.Generator().manual_seed(seed)
    model = model.to(dtype).eval()
    x = torch.rand(4, 3, img_size, img_size, generator=g, dtype=dtype)
    norms = x.flatten(1).norm(dim=1)
    gauss = torch.randn(x.shape, generator=g, dtype=dtype)
    gauss = gauss * (norms / gauss.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
    return logit_change(model, x, nullspace_noise(model, 4, norms, generator=g)), logit_change(model, x, gauss)

torch.manual_seed(0)
_sizes = {'default': 32, 'vit_tiny_patch16_224': 64, 'deit_tiny_distilled_patch16_224': 64, 'vit_small_patch14_reg4_dinov2': 56}
for name, s in _sizes.items():
    ns, gs = _invariance(default_vit() if name == 'default' else create_vit(name, img_size=s), s)
    print(f"{name:32s} nullspace rel_err {ns['rel_err']:.1e}  gaussian rel_err {gs['rel_err']:.1e}")
    assert ns['rel_err'] <= 1e-4 and gs['rel_err'] > 1e-2 and ns['pred_flips'] == 0
ns64, _ = _invariance(default_vit(), 32, dtype=torch.float64)
print(f"default in float64: nullspace rel_err {ns64['rel_err']:.1e}")
assert ns64['rel_err'] < 1e-12, ns64

# %% [markdown]
# The same holds for the trained default model, when its weights are there (not part of the tests):

# %%
#| notest
if (repo_root() / DEFAULT_CHECKPOINT).exists():
    ns, gs = _invariance(load_default_model(), 32)
    print(f"trained default: nullspace rel_err {ns['rel_err']:.1e}  gaussian rel_err {gs['rel_err']:.1e}")
    assert ns['rel_err'] <= 1e-4
else: print(f'{DEFAULT_CHECKPOINT} not trained yet')


# %% [markdown]
# ## Projecting onto the nullspace
# Any image-space tensor splits into its nullspace part, which the model cannot see, and the rest.
# `project_to_nullspace` unfolds the images into patches (in the conv weight's (C, P, P) order), applies Q Qᵀ to each
# (Q: the basis as rows) and folds them back, in float64.

# %%
#| export
def project_to_nullspace(model: nn.Module, x: Tensor, basis: Tensor | None = None) -> Tensor:
    "Orthogonal projection of images `x` (B, C, H, W) onto the patch embedding's nullspace, patch by patch."
    P = patch_size(model)
    C = in_chans(model)
    if x.ndim != 4 or x.shape[1] != C: raise ValueError(f'expected images (B, {C}, H, W), got shape {tuple(x.shape)}')
    H, W = _check_img_size(tuple(x.shape[-2:]), P)
    Q = (patch_embed_nullspace(model) if basis is None else basis).to(x.device, _f64(x.device))  # (k, C*ph*pw)
    p = F.unfold(x.to(Q.dtype), P, stride=P)  # (B, C*ph*pw, L)
    p = Q.T @ (Q @ p)  # (B, C*ph*pw, L)
    return F.fold(p, (H, W), P, stride=P).to(x.dtype)  # (B, C, H, W)


# %% [markdown]
# The projection is idempotent, leaves nullspace noise unchanged, and what it removes is orthogonal to what it keeps
# and is all the model sees: the projected part alone does not change the tokens.

# %%
x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
px = project_to_nullspace(d0, x)
test_close(project_to_nullspace(d0, px), px, eps=1e-12)  # idempotent
test_close(((x - px) * px).sum(), 0.0, eps=1e-9)  # x - Px ⟂ Px
assert (W @ F.unfold(px, 8, stride=8)).abs().max() < 1e-10  # Px is orthogonal to the row space of W
test_close(project_to_nullspace(d0, v), v, eps=1e-5)  # nullspace noise is already in the nullspace
test_fail(lambda: project_to_nullspace(d0, torch.rand(1, 3, 30, 32)), contains='multiple of the patch size')
test_fail(lambda: project_to_nullspace(d0, torch.rand(1, 1, 32, 32)), contains='expected images')
x32 = torch.rand(2, 3, 32, 32)
tok = lambda x: d0.vit.patch_embed(d0.normalize(x))  # (B, N, D)
test_close(tok(x32 + project_to_nullspace(d0, torch.randn_like(x32))), tok(x32), eps=1e-4)

# %% [markdown]
# ## Which pixel patterns the nullspace holds
# Which directions of a patch the model cannot see decides what nullspace noise can do to an image (Figure 7). Each
# P×P 2-D DCT-II pattern (orthonormal; Ahmed, Natarajan & Rao, "Discrete Cosine Transform", IEEE Trans. Computers 1974)
# is put into colour as luminance (the same pattern in R, G and B) or as one of two opponent chroma directions (R − G,
# R + G − 2B), normalised; `null_spectrum` measures the share of each such pattern's energy that lies in the nullspace,
# ‖Q v‖² for the orthonormal basis rows Q. The 3·P² coloured patterns are an orthonormal basis of the patch space, so the
# shares sum to the nullspace dimension, and a random subspace of that dimension gives every pattern the same share on
# average (k / 3P², 1/3 for the default model).

# %%
#| export
OPPONENT_COLOURS = dict(luminance=(1., 1., 1.), red_green=(1., -1., 0.), blue_yellow=(1., 1., -2.))  # normalised in use

def dct_basis(p: int) -> Tensor:
    "Orthonormal 2-D DCT-II patterns of a p×p patch, (p·p, p, p) float64, ordered by frequency (u, v)."
    i = torch.arange(p, dtype=torch.float64)
    c = torch.cos(torch.pi * (2 * i[None] + 1) * i[:, None] / (2 * p)) * (2 / p) ** 0.5  # (u, i)
    c[0] /= 2 ** 0.5
    return torch.einsum('ui,vj->uvij', c, c).reshape(p * p, p, p)

def null_spectrum(basis: Tensor, p: int) -> dict[str, Tensor]:
    "Share of each coloured DCT pattern's energy in the span of `basis` (k, 3·p·p) orthonormal rows: {colouring: (p, p)}."
    if basis.ndim != 2 or basis.shape[1] != 3 * p * p:
        raise ValueError(f'basis must be (k, 3·{p}·{p} = {3 * p * p}) with rows over (channel, row, column); got {tuple(basis.shape)}')
    d, out = dct_basis(p), {}
    for name, colour in OPPONENT_COLOURS.items():
        c = torch.tensor(colour, dtype=torch.float64); c = c / c.norm()
        patterns = (c[None, :, None, None] * d[:, None]).reshape(p * p, -1)  # (p·p, 3·p·p), unit norm each
        out[name] = (basis.double() @ patterns.T).pow(2).sum(0).view(p, p)
    return out


# %%
D = dct_basis(8).reshape(64, 64)
test_close(D @ D.T, torch.eye(64, dtype=torch.float64), eps=1e-12)  # orthonormal
test_close(torch.stack(list(null_spectrum(torch.eye(192), 8).values())), torch.ones(3, 8, 8), eps=1e-12)  # the whole space
test_eq(torch.stack(list(null_spectrum(torch.zeros(0, 192), 8).values())).abs().sum().item(), 0)  # nothing
dc = (torch.ones(3, 8, 8, dtype=torch.float64) / (3 * 64) ** 0.5).reshape(1, -1)  # the grey DC pattern alone
s = null_spectrum(dc, 8); test_close(s['luminance'][0, 0].item(), 1.0); test_close(sum(v.sum() for v in s.values()).item(), 1.0)
spec = null_spectrum(patch_embed_nullspace(d0), 8)  # shares sum to the nullspace dimension
test_close(sum(v.sum() for v in spec.values()).item(), float(null_dims(d0)['null_dim_numerical']), eps=1e-9)
test_fail(lambda: null_spectrum(torch.zeros(2, 190), 8), contains='(k, 3·8·8 = 192)')

# %% [markdown]
# ## Models without a patch-wise nullspace
# An overlapping patch embedding (kernel 16, stride 8) mixes neighbouring patches, so there is no patch-wise
# nullspace; a CNN has no patch embedding at all. Both get a clear error:

# %%
_ov = create_vit('vit_tiny_patch16_224', img_size=64)
_ov.vit.patch_embed.proj = nn.Conv2d(3, 192, kernel_size=16, stride=8)
for f in (patch_embed_matrix, patch_embed_nullspace, null_dims, nullspace_noise):
    test_fail(lambda: f(_ov), contains='not a non-overlapping linear map')
test_fail(lambda: project_to_nullspace(_ov, torch.rand(1, 3, 64, 64)), contains='not a non-overlapping linear map')
resnet = timm.create_model('resnet18')
for f in (patch_embed_matrix, patch_embed_nullspace, null_dims, nullspace_noise):
    test_fail(lambda: f(resnet), contains='not a timm VisionTransformer')
try: patch_embed_nullspace(resnet)
except TypeError as e: print(e)

# %% [markdown]
# ## Experiment
# **Table 1** lists the nullspace dimension of the patch embeddings of the standard ViT sizes. **Figure 2** shows the
# nullspace of the embedded default ViT and what its noise does to CIFAR-10 test images: nothing, as far as the
# model can tell. `papermill nbs/03_nullspace.ipynb /dev/null` writes `reports/table1_nullspace_dims/` and
# `reports/fig2_exact_nullspace/` from the trained default model; `-p smoke True` (and `nbdev_test`) writes a
# smaller version under `runs/smoke/`, falling back to a random-init default model when the trained one is missing.

# %% tags=["parameters"]
pretrained: bool = False  # use timm hub weights for Table 1 (needs internet)
n_images: int = 8  # CIFAR-10 test images in the invariance check (Figure 2 shows the first 4)
seed: int = 0  # seed of the image subset and of the noise
smoke: bool = False  # tiny run for tests
device: str = 'cpu'  # 'cpu', 'cuda', 'cuda:1', ...
report: str = ''  # folder under reports/ for this run; '' → table1_nullspace_dims and fig2_exact_nullspace (a named folder holds both as subfolders). A named folder is written whatever the parameters (unnamed, a non-default run goes to runs/reports/<artifact>-<digest>)
commit_report: bool = False  # write into the committed reports/ folder even when the parameters differ from its meta.json (make reports and make study do)


# %%
import time, json, copy
import pandas as pd, matplotlib.pyplot as plt
from ns_vit.data import cifar10, CIFAR10_CLASSES
from ns_vit.report import report_dir, save_table, save_figure, write_meta, in_test
smoke = smoke or in_test()
params = dict(pretrained=pretrained, n_images=n_images, seed=seed, smoke=smoke, device=device)
sizes, patches = (('tiny', 'small') if smoke else ('tiny', 'small', 'base', 'large')), (8, 16, 32)
table1_names = [n for s in sizes for p in patches if (n := f'vit_{s}_patch{p}_224') in timm.list_models()]
check_models = {'vit_tiny_patch16_224': 64, 'deit_tiny_distilled_patch16_224': 64, 'vit_small_patch14_reg4_dinov2': 56}
n_show = min(4, n_images)  # images in Figure 2
have_trained = (repo_root() / DEFAULT_CHECKPOINT).exists()
t0 = time.time()


# %% [markdown]
# ### Table 1: nullspace dimensions
# Only the patch embedding matters, so for random init each model is built on the `meta` device (no memory, no
# time) and only its `patch_embed` is materialised and initialised the way timm does (PyTorch's default conv init);
# with `pretrained=True` the whole model is loaded from timm's hub. The default model's row uses its trained
# weights (random init only in a smoke run without them).

# %%
def patch_embed_only(name: str, pretrained: bool) -> nn.Module:
    "A timm ViT whose patch embedding is real (hub weights, or random init with the rest left on the meta device)."
    if pretrained: return create_vit(name, pretrained=True)
    with torch.device('meta'): vit = timm.create_model(name)
    vit.patch_embed.to_empty(device='cpu'); vit.patch_embed.proj.reset_parameters()
    return vit

if have_trained or not smoke:  # the default run needs the trained model: FileNotFoundError says how to make it
    default_model, default_weights = load_default_model(map_location=device), 'trained (02_pretrain)'
else: torch.manual_seed(seed); default_model, default_weights = default_vit().to(device).eval(), 'random init (smoke)'
rows = [dict(model=n, weights='timm hub' if pretrained else 'random init', **null_dims(patch_embed_only(n, pretrained)))
        for n in table1_names]
rows.append(dict(model='ns_vit default (CIFAR-10)', weights=default_weights, **null_dims(default_model)))
from ns_vit.models import EMBEDDED_MODELS, embedded_vit, load_embedded_model
for name_e, e in EMBEDDED_MODELS.items():  # the other embedded models: trained weights when committed, else the architecture's init
    if name_e == 'default': continue
    trained = (repo_root() / e['checkpoint']).exists()
    torch.manual_seed(seed); m_e = load_embedded_model(name_e) if trained else embedded_vit(name_e)
    rows.append(dict(model=f'ns_vit {name_e} (CIFAR-10)', weights='trained (02_pretrain)' if trained else 'random init', **null_dims(m_e)))
table1 = pd.DataFrame(rows).rename(columns={'null_dim_rank_nullity': 'null_dim'})
table1 = table1[['model', 'patch', 'embed_dim', 'input_dim', 'null_dim', 'null_dim_numerical', 'weights']]
rep1 = report_dir(f'{report}/table1_nullspace_dims' if report else 'table1_nullspace_dims', smoke, params=params, commit=commit_report or bool(report))
save_table(table1, rep1, 'table1'); write_meta(rep1, params, t0, device)
table1

# %% [markdown]
# Whenever C·P² > D the patch embedding has a nullspace, and it is large: ViT-Ti/16 ignores 576 of the 768
# dimensions of each patch, ViT-S/16 half of them, and every /32 model at least two thirds of its 3072. Models whose
# embedding is at least as wide as a patch (ViT-B/16: D = 768 = 3·16²; ViT-L/16; every /8 model; and the embedded
# `vit-ti8`, D = 192 = 3·8², the second model of the study, chosen to mirror ViT-B/16) have none, and for
# them the exact nullspace offers nothing, which is why the paper turns to an approximate one. Random-init weights
# are full rank, so the numerical dimension equals the rank–nullity one; a rank-deficient embedding can only have more.

# %%
assert (table1.null_dim == (table1.input_dim - table1[['input_dim', 'embed_dim']].min(axis=1))).all()
assert (table1.null_dim_numerical >= table1.null_dim).all()
if 'vit_small_patch16_224' in table1_names: test_eq(table1.set_index('model').loc['vit_small_patch16_224', 'null_dim'], 384)

# %% [markdown]
# ### Figure 2: the exact nullspace of the default ViT
# Nullspace noise is drawn at the norm of each CIFAR-10 test image and added *without clipping*: clipping to [0, 1]
# would leave the nullspace. The invariance is measured on these unclipped sums; for display each noise and each sum is
# min–max rescaled to [0, 1]. The same check is repeated, on the same images resized, for the random-init timm ViTs.
# The embedded `vit-ti8` has no exact nullspace (Table 1: null dimension 0), so it has no row here: for it, as for
# ViT-B/16 in the paper, only the approximate nullspace of the encoder exists (Figure 3, `04a -p model vit-ti8`).

# %%
x, y = cifar10('test').subset(n_images, seed).tensors()  # (n, 3, 32, 32)
g = torch.Generator().manual_seed(seed)
basis = patch_embed_nullspace(default_model)  # (64, 192)
def same_norm_gaussian(x, g):
    "Gaussian noise with the L2 norm of each image of `x`."
    z = torch.randn(x.shape, generator=g, dtype=x.dtype)
    return z * (x.flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
def invariance_row(name, weights, model, x, g):
    "One row of the invariance table: nullspace noise at the images' norm vs Gaussian noise of that norm."
    noise = lambda m, x: nullspace_noise(m, len(x), x.flatten(1).norm(dim=1), tuple(x.shape[-2:]), generator=g).cpu()
    v = noise(model, x)
    ns, gs = logit_change(model, x, v), logit_change(model, x, same_norm_gaussian(x, g))
    m64 = copy.deepcopy(model).double()  # the same check in float64: what is left of the error is round-off
    ns64 = logit_change(m64, x.double(), noise(m64, x.double()))
    return v, dict(model=name, weights=weights, img_size=x.shape[-1], images=len(x), **ns, rel_err_fp64=ns64['rel_err'],
                   rel_err_gaussian=gs['rel_err'], pred_flips_gaussian=gs['pred_flips'])
v, row = invariance_row('ns_vit default (CIFAR-10)', default_weights, default_model, x, g)
rows = [row]
for name, s in check_models.items():
    torch.manual_seed(seed)
    m = create_vit(name, img_size=s).to(device).eval()
    xs = F.interpolate(x, size=s, mode='bilinear', align_corners=False).clamp(0, 1)  # (n, 3, s, s)
    rows.append(invariance_row(name, 'random init', m, xs, g)[1])
invariance = pd.DataFrame(rows)
with torch.no_grad():
    l0, l1 = default_model(x.to(device)).cpu(), default_model((x + v).to(device)).cpu()
invariance

# %%
assert (invariance.rel_err <= 1e-4).all() and (invariance.rel_err_fp64 <= 1e-12).all(), invariance
assert (invariance.pred_flips == 0).all() and (invariance.rel_err_gaussian > 100 * invariance.rel_err).all()


# %%
def show(ax, img, title=''):
    "Show a (C, H, W) tensor, min-max rescaled to [0, 1]."
    img = (img - img.min()) / (img.max() - img.min() + 1e-12)
    ax.imshow(img.permute(1, 2, 0).numpy()); ax.set_title(title, fontsize=7); ax.axis('off')

n_basis = min(16, len(basis))
fig = plt.figure(figsize=(8, 7.2))
top, bottom = fig.subfigures(2, 1, height_ratios=[1, 3])
top.suptitle(f'(a) first {n_basis} of {len(basis)} nullspace basis vectors (3×8×8 pixel patches, min–max scaled)',
             fontsize=9)
for i, ax in enumerate(top.subplots(2, 8).flat):
    if i < n_basis: show(ax, basis[i].float().view(3, 8, 8))
    else: ax.axis('off')
bottom.suptitle('(b) image, nullspace noise with ‖v‖ = ‖x‖, and x + v (unclipped; noise and sum min–max scaled)', fontsize=9)
axes = bottom.subplots(3, n_show, squeeze=False, gridspec_kw=dict(hspace=0.5))
for j in range(n_show):
    c0, c1, dl = CIFAR10_CLASSES[l0[j].argmax()], CIFAR10_CLASSES[l1[j].argmax()], (l1[j] - l0[j]).abs().max().item()
    show(axes[0, j], x[j], f'{CIFAR10_CLASSES[y[j]]}\npred: {c0}')
    show(axes[1, j], v[j], f'‖v‖ = {v[j].norm():.1f} = ‖x‖')
    show(axes[2, j], x[j] + v[j], f'pred: {c1}\nmax|Δlogit| = {dl:.1e}')
for ax, lab in zip(axes[:, 0], ('x', 'v', 'x + v')):
    ax.text(-0.15, 0.5, lab, transform=ax.transAxes, ha='right', va='center')
rep2 = report_dir(f'{report}/fig2_exact_nullspace' if report else 'fig2_exact_nullspace', smoke, params=params, commit=commit_report or bool(report))
save_figure(fig, rep2, 'fig2'); save_table(invariance, rep2, 'invariance', floatfmt='.2e')
write_meta(rep2, params, t0, device, default_model_weights=default_weights);

# %% [markdown]
# The basis vectors are unstructured colour patterns within an 8×8 patch: directions the patch embedding throws
# away entirely. Noise built from them is as large as the image and buries it in what looks like patchwise colour
# noise, yet the prediction and every logit stay the same up to float32 round-off (about 1e-6 of the logits; about
# 1e-15 in float64), while Gaussian noise of the same norm moves the logits by the order of their own size and flips
# predictions. So a ViT is exactly invariant to a large linear subspace of its inputs, by construction and whatever
# its training. The paper's question follows from this: is there a much broader set of perturbations, an
# *approximate* nullspace that also exists when D ≥ C·P², to which the model is nearly invariant, and does training
# the model to stay invariant to it make it more robust? Notebook 04 learns that set.
