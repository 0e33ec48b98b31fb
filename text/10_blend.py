# %% [markdown]
# # Watermarks and look-alike images from the nullspace
# > Move an image towards a target along directions the patch embedding cannot see, keeping the model's output.
#
# The target may be a watermark or another image; the model's output does not change, and the result stays a valid
# image in [0, 1].
#

# %%
#| default_exp applications

# %%
#| export
from __future__ import annotations
import io
import numpy as np
import torch
from torch import nn, Tensor
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from ns_vit.models import as_vit, eval_mode, in_chans
from ns_vit.nullspace import (patch_size, patch_embed_matrix, project_to_nullspace, null_dims,
                              _numerical_rank, _check_img_size, _f64)

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
from ns_vit.models import create_vit, default_vit
from ns_vit.nullspace import patch_embed_nullspace
torch.manual_seed(0)


# %% [markdown]
# Paper Appendix E (Eq. 12, Figure 6) and Appendix F (Figure 7). A ViT sees an image only through its patch tokens
# e_p = W p + b, so every image x′ whose patches satisfy W x′_p = W x_p is, for the model, the *same* image as x.
# Among all of them we want the one nearest to a target t — a watermark, or another image:
#
# x′ = argmin ‖x′ − t‖²  subject to  W x′_p = W x_p for every patch p,  and  0 ≤ x′ ≤ 1.
#
# **The nullspace in pixel space.** ns_vit models take pixels in [0, 1] and normalise inside (`PixelViT`): the conv
# sees (x − μ)/σ per channel. The mean only shifts every token by a constant, so the constraint is
# W diag(1/σ)(x′_p − x_p) = 0: the pixel-space nullspace is diag(σ) · null(W), *not* null(W) itself (they coincide
# only when σ is the same for all channels, as for timm's 0.5/0.5). `patch_embed_matrix` already returns
# W_pix = W diag(1/σ) and `patch_embed_nullspace` an orthonormal basis Q of its nullspace, orthonormal in *pixel*
# space, so that "nearest" is measured in pixels, as PSNR and the eye measure it.
#
# **Without the box** the problem is a least-squares projection with a closed form, patch by patch:
# x′ = x + Q Qᵀ (t − x), the image plus the nullspace part of the difference (`project_to_nullspace`). It can leave
# [0, 1]; clamping it back makes a valid image but moves it out of the constraint set, and the model sees that.
#
# **With the box** the set {same patch embeddings} ∩ [0, 1]ⁿ is the intersection of an affine subspace A and a box B,
# both convex and both separable over patches. The projection of t onto A ∩ B is computed by **Dykstra's alternating
# projections** (Boyle & Dykstra 1986): plain alternation (POCS) would only find *some* point of the intersection;
# Dykstra's correction term makes it converge to the nearest one. The constraint is linear in the pixels of each patch,
# so no gradient through the network is ever needed: the whole solve is a few matrix products per patch, batched
# over images and patches, under `torch.no_grad()`. The official code instead ran SciPy's SLSQP on an L1 objective,
# per patch and per colour channel (on 2/3 of the true nullspace for ViT-S/32), in a process pool.

# %% [markdown]
# ## The projection onto "same patch embeddings"
# A flattened pixel patch s ∈ ℝⁿ (n = C·P², in `F.unfold` order) fixes the affine set A = s + null(W_pix). With Q (k × n)
# an orthonormal basis of the nullspace and R (r × n) one of the row space (k + r = n), both from one SVD of W_pix in
# float64, the projection is P_A(y) = s + QᵀQ(y − s) = y − RᵀR(y − s). We use whichever basis is smaller: Q for the
# default model (k = 64 < r = 128), R for a patch-32 ViT-S (r = 384 ≪ k = 2688).

# %%
#| export
def embedding_bases(model: nn.Module,
                    basis: Tensor | None = None,  # precomputed `patch_embed_nullspace(model)` (k, n), to skip the full SVD
                    rtol: float | None = None) -> tuple[Tensor, Tensor]:  # rank tolerance, as in `patch_embed_nullspace`
    "Orthonormal bases (Q (k, n), R (r, n)) of the nullspace and row space of the pixel-space patch embedding, float64."
    W = patch_embed_matrix(model)  # (D, n)
    _, S, Vh = torch.linalg.svd(W, full_matrices=basis is None)  # Vh (n or min(D, n), n)
    r = _numerical_rank(S, W.shape, as_vit(model).patch_embed.proj.weight.dtype, rtol)
    Q = Vh[r:] if basis is None else basis.to(W)
    if len(Q) == 0: raise ValueError(f'the patch embedding has no nullspace ({null_dims(model)}): nothing can move')
    return Q, Vh[:r]

def affine_projector(Q: Tensor, R: Tensor):
    "P_A(y, s): the patches nearest to `y` (M, n) with the patch embeddings of `s` (M, n); Q, R from `embedding_bases`."
    if len(R) < len(Q): return lambda y, s: y - ((y - s) @ R.T.to(y)) @ R.to(y)  # (M, n)
    return lambda y, s: s + ((y - s) @ Q.T.to(y)) @ Q.to(y)  # (M, n)


# %% [markdown]
# Both forms agree, the result has the patch embeddings of s, and P_A is idempotent:

# %%
_m = default_vit().eval()
_W = patch_embed_matrix(_m)  # (128, 192)
_Q, _R = embedding_bases(_m)
test_eq((_Q.shape, _R.shape), ((64, 192), (128, 192)))
test_close(_Q @ _R.T, torch.zeros(64, 128, dtype=torch.float64), eps=1e-12)
_s, _y = torch.rand(50, 192, dtype=torch.float64), torch.randn(50, 192, dtype=torch.float64)
_pa = affine_projector(_Q, _R)
test_close(_pa(_y, _s), _y - ((_y - _s) @ _R.T) @ _R, eps=1e-12)  # the Q form equals the R form
test_close(_pa(_y, _s) @ _W.T, _s @ _W.T, eps=1e-10)  # same embeddings
test_close(_pa(_pa(_y, _s), _s), _pa(_y, _s), eps=1e-12)
_s32 = create_vit('vit_small_patch32_224', img_size=64).eval()  # r = 384 < k = 2688: the row-space form
_W32, _s2, _y2 = patch_embed_matrix(_s32), torch.rand(3, 3072, dtype=torch.float64), torch.rand(3, 3072, dtype=torch.float64)
test_close(affine_projector(*embedding_bases(_s32))(_y2, _s2) @ _W32.T, _s2 @ _W32.T, eps=1e-9)
test_eq(embedding_bases(_m, patch_embed_nullspace(_m))[1].shape, (128, 192))
test_fail(lambda: embedding_bases(create_vit('vit_tiny_patch16_224', img_size=32, patch_size=8)), contains='no nullspace')


# %% [markdown]
# ## Dykstra's algorithm for A ∩ [0, 1]ⁿ
# Starting from x₀ = t, q₀ = 0, each iteration projects onto A, then onto the box with Dykstra's correction q:
#
# y = P_A(x),  z = y + q,  x = clamp(z, 0, 1),  q = z − x.
#
# (A is affine, so the correction that Dykstra's algorithm keeps for A lies in the row space and P_A ignores it; only
# the box needs one.) The invariant t = x + p + q, with p in the row space and q in the box's normal cone at x, makes
# **x ∈ A a certificate of optimality**: then t − x lies in the normal cone of A ∩ B at x, so x is the projection. The
# residual is therefore the distance of the box iterate x to A, max over pixels |x − P_A(x)|, tracked per patch;
# a patch whose residual is below `tol` is done and leaves the batch (patches are independent problems). The returned
# point is the box iterate: in [0, 1] exactly. An image outside [0, 1] has no such point, so it is refused.

# %%
#| export
@torch.no_grad()
def dykstra_box(project, s: Tensor, t: Tensor,
                iters: int = 1000,  # most iterations
                tol: float = 1e-7,  # a patch is done when max |x − P_A(x)| < tol (pixels)
                lo: float = 0.0, hi: float = 1.0,
                x0: Tensor | None = None, q0: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, int]:  # to continue a run
    "Dykstra's projection of patches `t` (M, n) onto {same embeddings as `s`} ∩ [lo, hi]ⁿ: x, box correction q, residual, iterations."
    x = t.clone() if x0 is None else x0.clone()  # (M, n) box iterate
    q = torch.zeros_like(t) if q0 is None else q0.clone()  # (M, n) its Dykstra correction
    res = torch.full((len(t),), float('inf'), dtype=t.dtype, device=t.device)  # (M,) residual per patch
    act, it = torch.arange(len(t), device=t.device), 0  # patches still iterating
    while len(act) and it < iters:
        it += 1
        xa = x[act]
        y = project(xa, s[act])  # (m, n)
        res[act] = (xa - y).abs().amax(1)  # distance of the current box iterate to A
        keep = res[act] >= tol  # converged patches keep their box iterate
        z = y + q[act]
        xn = z.clamp(lo, hi)
        x[act[keep]], q[act[keep]] = xn[keep], (z - xn)[keep]
        act = act[keep]
    if len(act): res[act] = (x[act] - project(x[act], s[act])).abs().amax(1)
    return x, q, res, it


# %% [markdown]
# On random patches of the default architecture: the result is in the box, has the embeddings of s, and it is the
# projection — the variational inequality ⟨t − x*, z − x*⟩ ≤ 0 holds for feasible points z (other targets'
# projections), and plain alternating projections (POCS) end farther from t. With t = s nothing moves.

# %%
def _pocs(project, s, t, iters=2000):
    "Plain alternating projections: some point of A ∩ B, not the nearest."
    x = t.clone()
    for _ in range(iters): x = project(x, s).clamp(0, 1)
    return x

_s = torch.rand(64, 192, dtype=torch.float64)
_t = torch.rand(64, 192, dtype=torch.float64) * 1.6 - 0.3  # reaches outside the box
_x, _q, _res, _it = dykstra_box(_pa, _s, _t, iters=3000)
print(f'{_it} iterations, residual {_res.max():.1e}')
assert _res.max() < 1e-7 and _x.min() >= 0 and _x.max() <= 1
test_close(_x @ _W.T, _s @ _W.T, eps=1e-5)
for _ in range(3):  # feasible points: projections of other targets
    _z = dykstra_box(_pa, _s, torch.rand_like(_t) * 3 - 1, iters=3000)[0]
    assert ((_t - _x) * (_z - _x)).sum(1).max() < 1e-6
_xp = _pocs(_pa, _s, _t)
assert ((_xp - _t).norm(dim=1) >= (_x - _t).norm(dim=1) - 1e-6).all() and ((_xp - _t).norm() > (_x - _t).norm() + 1e-3)
test_eq(dykstra_box(_pa, _s, _s)[0], _s)


# %% [markdown]
# **The slow tail, and an exact finish.** Real images have saturated pixels (0 or 1). Where a source patch touches the
# box and the target pushes outwards, A and the box meet at a small angle and Dykstra's convergence becomes sublinear:
# on the default model, after 1,000 iterations a few percent of CIFAR-10 patches are still 1e-4–1e-3 away from A. For
# those we finish with a primal–dual active-set step (Hintermüller, Ito & Kunisch 2002), warm-started from the pixels
# Dykstra holds at a bound (q ≠ 0): with the active set fixed, the problem is an equality-constrained least squares,
# x_F = t_F − (Rᵀμ)_F with (R diag(f) Rᵀ) μ = R(x_fix − s), solved with a pseudo-inverse; the set is updated from the
# multipliers ν = t − x − Rᵀμ until it stops changing. A patch is replaced only if the result is **certified**: in the
# box, on A to 1e-9, and with multipliers of the right sign (KKT), which makes it the exact projection. Patches left
# after a few rounds (Dykstra, finish) are, by default (`exact=True`), moved to s + λ(P_A(x) − s) with the largest
# λ ≤ 1 that stays in the box: exactly feasible (the source s is), but not the nearest point; `info` counts them. With
# `exact=False` they keep Dykstra's box iterate and its residual.

# %%
#| export
@torch.no_grad()
def polish_box(R: Tensor, s: Tensor, t: Tensor, q: Tensor,
               lo: float = 0.0, hi: float = 1.0,
               steps: int = 15,  # most active-set updates
               feas_tol: float = 1e-9) -> tuple[Tensor, Tensor]:  # certified if |R(x − s)| < feas_tol
    "Exact projection of patches `t` (M, n) onto {Rx = Rs} ∩ box by a primal–dual active set from Dykstra's `q`; x and a certified mask."
    up, dn = q > 0, q < 0  # (M, n) pixels held at the upper / lower bound
    R = R.to(t)
    for _ in range(steps):
        f = ~(up | dn)  # free pixels
        xfix = torch.where(up, hi, torch.where(dn, lo, t))  # (M, n)
        G = torch.einsum('rn,mn,sn->mrs', R, f.to(t), R)  # (M, r, r) = R diag(f) Rᵀ
        mu = (torch.linalg.pinv(G, hermitian=True, rtol=1e-9) @ ((xfix - s) @ R.T)[..., None])[..., 0]  # (M, r)
        g = mu @ R  # (M, n)
        x = xfix - f * g
        nu = (t - x - g) * ~f  # bound multipliers: ≥ 0 at hi, ≤ 0 at lo, 0 on free pixels
        up2, dn2 = nu + (x - hi) > 0, nu + (x - lo) < 0
        same = (up2 == up).all(1) & (dn2 == dn).all(1)
        up, dn = up2, dn2
        if same.all(): break
    ok = same & (((x - s) @ R.T).abs().amax(1) < feas_tol) & (x.amin(1) >= lo - 1e-12) & (x.amax(1) <= hi + 1e-12)
    return x.clamp(lo, hi), ok


# %% [markdown]
# On saturated sources (half the pixels at 0 or 1) and far targets, a short Dykstra run leaves patches off A; the
# polish certifies them, and the certified points are the projection (variational inequality against feasible points):

# %%
torch.manual_seed(1)
_s = (torch.rand(64, 192, dtype=torch.float64) > 0.5).double()
_s = torch.where(torch.rand_like(_s) < 0.5, _s, torch.rand_like(_s))  # half the pixels saturated, half interior
_t = torch.rand_like(_s) * 3 - 1
_x, _q, _res, _ = dykstra_box(_pa, _s, _t, iters=1000)
_bad = _res >= 1e-7
_xp, _ok = polish_box(_R, _s[_bad], _t[_bad], _q[_bad])
print(f'{int(_bad.sum())} of 64 patches off A after 1000 Dykstra iterations (max residual {_res.max():.1e}); '
      f'{int(_ok.sum())} certified by the polish')
assert _bad.any() and _ok.float().mean() > 0.5
_xc, _sc, _tc = _xp[_ok], _s[_bad][_ok], _t[_bad][_ok]
test_close(_xc @ _W.T, _sc @ _W.T, eps=1e-8)
assert ((_tc - _xc) * (_sc - _xc)).sum(1).max() < 1e-9  # the source is a feasible point
for _ in range(2):  # so are certified projections of other targets
    _t2 = torch.rand_like(_tc) * 3 - 1
    _x2, _q2, _r2, _ = dykstra_box(_pa, _sc, _t2, iters=1000)
    _z, _ok2 = polish_box(_R, _sc, _t2, _q2)
    _z = torch.where(((_r2 < 1e-7) | _ok2)[:, None], torch.where(_ok2[:, None], _z, _x2), _sc)
    assert ((_tc - _xc) * (_z - _xc)).sum(1).max() < 1e-6


# %% [markdown]
# ## `nullspace_blend`
# Images are cut into patches with `F.unfold` (the conv weight's (C, P, P) order), all patches of all images are
# solved as one batch in float64, and folded back. `box=False` is the closed form x + QQᵀ(t − x)
# (`project_to_nullspace`), optionally clamped (`clamp=True`, which breaks the invariance: `info` measures by how much).
# `measure=True` runs the model on the source, the result and its 8-bit quantisation (what a PNG stores) to fill
# `info`; with `measure=False` the model's forward pass is never called — only its patch-embedding weights are read.

# %%
#| export
def _as_batch(x: Tensor, name: str) -> tuple[Tensor, bool]:
    "Images as (B, C, H, W), and whether a (C, H, W) image was given."
    if x.ndim == 3: return x[None], True
    if x.ndim != 4: raise ValueError(f'{name} must be (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}')
    return x, False

def quantize8(x: Tensor) -> Tensor:
    "What an 8-bit PNG stores of images in [0, 1]: round(255·x)/255 (values clamped to [0, 1] first)."
    return (x.clamp(0, 1) * 255).round() / 255


# %%
#| export
@torch.no_grad()
def blend_measures(model: nn.Module, image: Tensor, blended: Tensor, target: Tensor,
                   logits: bool = True,  # also run the model (logit change, predictions, 8-bit effect)
                   basis: Tensor | None = None, batch_size: int = 500) -> dict:
    "Per-image distances, nullspace share, token and logit change, prediction match of `blended` vs `image` and `target`."
    s, x, t = (a.double().flatten(1) for a in (image, blended, torch.broadcast_to(target, image.shape)))  # (B, n)
    u = project_to_nullspace(model, (t - s).view(image.shape), basis).flatten(1)  # unconstrained move
    d0, d1, nu = (s - t).pow(2).sum(1), (x - t).pow(2).sum(1), u.pow(2).sum(1)
    dv, tv = x - s, t - s
    P = patch_size(model)
    dtok = patch_embed_matrix(model).to(s) @ F.unfold((blended.double() - image.double()), P, stride=P)  # (B, D, L)
    out = dict(null_share=nu / d0.clamp_min(1e-30), share=(d0 - d1) / nu.clamp_min(1e-30), dist_target=d1.sqrt(),
               embed_change=dtok.abs().amax((1, 2)),  # max |token change| per image: 0 on the constraint set
               dist_source=dv.norm(dim=1), dist_source_target=d0.sqrt(),
               corr=F.cosine_similarity(dv - dv.mean(1, keepdim=True), tv - tv.mean(1, keepdim=True), dim=1),
               box_min=blended.min().item(), box_max=blended.max().item(),
               box_violation=max(0.0, -blended.min().item(), blended.max().item() - 1))
    if not logits: return out
    dev, dt = next(model.parameters()).device, next(model.parameters()).dtype
    f = lambda a: torch.cat([model(a[i:i + batch_size].to(dev, dt)).float().cpu() for i in range(0, len(a), batch_size)])
    with eval_mode(model): l0, l1, l8 = f(image), f(blended), f(quantize8(blended))  # (B, classes)
    c = l0.argmax(1)  # the source's assigned class
    p0 = l0.softmax(1).gather(1, c[:, None])[:, 0]
    for k, l in (('', l1), ('8bit_', l8)):
        out |= {f'{k}dlogit': (l - l0).abs().amax(1), f'{k}max_abs_dlogit': (l - l0).abs().max().item(),
                f'{k}pred': l.argmax(1), f'{k}pred_match': l.argmax(1) == c,
                f'{k}dconf': (l.softmax(1).gather(1, c[:, None])[:, 0] - p0).abs()}
    return out | dict(pred_source=c, conf_source=p0, max_abs_logit=l0.abs().max().item())


# %%
#| export
def _segment_in_box(s: Tensor, y: Tensor, lo: float = 0.0, hi: float = 1.0) -> tuple[Tensor, Tensor]:
    "Per row, s + λ(y − s) with the largest λ ∈ [0, 1] that stays in [lo, hi] (s inside), and λ."
    d = y - s  # (M, n)
    big = torch.full_like(d, float('inf'))
    lam = torch.minimum(torch.where(d > 0, (hi - s) / d, big), torch.where(d < 0, (lo - s) / d, big)).amin(1).clamp(0, 1)
    return (s + lam[:, None] * d).clamp(lo, hi), lam  # the clamp removes round-off only

@torch.no_grad()
def nullspace_blend(model: nn.Module,
                    image: Tensor,  # source images (B, C, H, W) or (C, H, W) in [0, 1]
                    target: Tensor,  # what to look like: broadcastable to `image` (a mark, or other images)
                    box: bool = True,  # stay in [0, 1] exactly (Dykstra); False: closed-form projection
                    iters: int = 1000,  # most Dykstra iterations
                    tol: float = 1e-7,  # Dykstra stops a patch at max |x − P_A(x)| < tol (pixels)
                    polish: bool = True,  # finish unconverged patches with the certified active-set step
                    rounds: int = 3,  # polish rounds, each after `iters` more Dykstra iterations on what is left
                    exact: bool = True,  # patches still off A: shrink their move towards the source until it fits the box
                    clamp: bool = False,  # box=False only: clamp the result to [0, 1] (breaks exact invariance)
                    basis: Tensor | None = None,  # precomputed `patch_embed_nullspace(model)`
                    measure: bool = True,  # run the model to fill `info` (logits, 8-bit); False: never calls it
                    batch_size: int = 500) -> tuple[Tensor, dict]:  # images per forward pass when measuring
    "The image nearest to `target` with the same patch embeddings as `image` (so the same output), and a report."
    x, single = _as_batch(image, 'image')
    try: t = torch.broadcast_to(target.to(x.device, x.dtype), x.shape)  # (B, C, H, W)
    except RuntimeError: raise ValueError(f'target of shape {tuple(target.shape)} does not broadcast to the images '
                                          f'{tuple(x.shape)}: pass one target per image or one for all') from None
    P, C = patch_size(model), in_chans(model)
    if x.shape[1] != C: raise ValueError(f'expected {C}-channel images, got shape {tuple(x.shape)}')
    H, Wd = _check_img_size(tuple(x.shape[-2:]), P)
    f64, (Q, R) = _f64(x.device), embedding_bases(model, basis)
    info = dict(box=box, clamp=clamp)
    if not box:
        out = x.to(f64) + project_to_nullspace(model, (t - x).to(f64), Q)  # (B, C, H, W)
        if clamp: out = out.clamp(0, 1)
    else:
        if x.min() < 0 or x.max() > 1: raise ValueError('box=True needs a source image in [0, 1] (else no image in '
                                                        'the box has its embeddings); use box=False for other ranges')
        unf = lambda a: F.unfold(a.to(f64), P, stride=P).transpose(1, 2).reshape(-1, C * P[0] * P[1])  # (B*L, n)
        s_p, t_p = unf(x), unf(t)
        proj = affine_projector(Q, R)
        xs, q, res, it = dykstra_box(proj, s_p, t_p, iters, tol)
        info |= dict(iters=it, patches=len(xs), dykstra_unconverged=int((res >= tol).sum()),
                     dykstra_residual=res.max().item(), polished=0)
        for r in range(rounds if polish else 0):  # certified finish; what is left gets `iters` more Dykstra iterations
            bad = (res >= tol).nonzero()[:, 0]
            if not len(bad): break
            if r:
                xs[bad], q[bad], res[bad], k = dykstra_box(proj, s_p[bad], t_p[bad], iters, tol, x0=xs[bad], q0=q[bad])
                info['iters'] += k
                bad = bad[res[bad] >= tol]
            xp, ok = polish_box(R, s_p[bad], t_p[bad], q[bad])
            i = bad[ok]
            xs[i], res[i] = xp[ok], (xp[ok] - proj(xp[ok], s_p[i])).abs().amax(1)
            info['polished'] += len(i)
        bad = (res >= tol).nonzero()[:, 0]
        info |= dict(fallback=len(bad) if exact else 0, fallback_lambda=1.0)
        if exact and len(bad):  # the feasible point s + λ(P_A(x) − s) with the largest λ ≤ 1
            xs[bad], lam = _segment_in_box(s_p[bad], proj(xs[bad], s_p[bad]))
            res[bad] = (xs[bad] - proj(xs[bad], s_p[bad])).abs().amax(1)
            info['fallback_lambda'] = lam.mean().item()
        info |= dict(unconverged=int((res >= tol).sum()), residual=res.max().item())
        out = F.fold(xs.view(len(x), -1, xs.shape[1]).transpose(1, 2), (H, Wd), P, stride=P)  # (B, C, H, W)
    out = out.to(x.dtype)
    info |= blend_measures(model, x, out, t, measure, Q, batch_size)
    return (out[0] if single else out), info


# %% [markdown]
# `info` holds, per image (tensors of length B): `null_share` = ‖QQᵀ(t − x)‖² / ‖t − x‖², the fraction of the squared
# distance to the target that lies in the nullspace (the most any move can remove); `share` = the fraction of that
# removed, (‖t − x‖² − ‖t − x′‖²) / ‖QQᵀ(t − x)‖² (1 for the unclamped closed form, less in the box);
# `dist_source_target`, `dist_target`, `dist_source` (L2 in pixels); `corr`, Pearson's r of x′ − x with t − x;
# `embed_change`, the largest token change |W_pix(x′_p − x_p)| (0 on the constraint set); with `measure=True` also
# `dlogit` (max |Δlogit| per image), `pred`, `pred_match` (prediction of x′ = the source's), `dconf`
# (|p_c(x′) − p_c(x)| for the source's class c) and the same with an `8bit_` prefix for `quantize8(x′)`. Scalars:
# `max_abs_dlogit`, `8bit_max_abs_dlogit`, `max_abs_logit`, `box_min`, `box_max`, `box_violation`, and for `box=True`
# the solver's `iters`, `patches`, `dykstra_unconverged`/`dykstra_residual` (before the finish), `polished` (patches
# certified by it), `fallback` (patches neither converged nor certified; with `exact=True` their move is shortened to
# s + λ(P_A(x) − s), the longest step towards Dykstra's point that stays in the box, exact but not nearest;
# `fallback_lambda` is the mean λ), and `unconverged`/`residual` (patches still off A by ≥ `tol` — none with
# `exact=True` — and the largest distance in pixels).
#
# Tiny random-init ViTs, one with a class token and one average-pooled like the default. The blended images have the
# source's patch embeddings to float precision and its logits; `box=True` stays in [0, 1]; the result is closer to
# the target than the source was; a target equal to the source moves nothing; a batch gives the per-image results;
# `box=False` is the closed form.

# %%
_tiny = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
_models = dict(cls=create_vit('vit_tiny_patch16_224', **_tiny).eval(),
               avg=create_vit('vit_tiny_patch16_224', global_pool='avg', class_token=False, mean=(0.49, 0.48, 0.45),
                              std=(0.25, 0.24, 0.26), **_tiny).eval())
g = torch.Generator().manual_seed(0)
_x = torch.rand(4, 3, 32, 32, generator=g)
_t = torch.rand(4, 3, 32, 32, generator=g)
for name, m in _models.items():
    tok = lambda a: m.vit.patch_embed(m.normalize(a.double() if a.dtype == torch.float64 else a))
    b, info = nullspace_blend(m, _x, _t)
    assert 0 <= b.min() and b.max() <= 1 and info['box_violation'] == 0
    test_close(tok(b), tok(_x), eps=1e-4)  # same tokens (float32 model)
    assert info['max_abs_dlogit'] <= 1e-4 * info['max_abs_logit'] and bool(info['pred_match'].all())
    assert ((b - _t).flatten(1).norm(dim=1) < (_x - _t).flatten(1).norm(dim=1)).all()
    assert (info['share'] > 0).all() and (info['share'] <= 1 + 1e-6).all() and info['unconverged'] == 0
    for i in range(2): test_close(nullspace_blend(m, _x[i], _t[i])[0], b[i], eps=1e-6)  # batch = per image
    b0, i0 = nullspace_blend(m, _x, _x)
    test_eq(b0, _x); test_eq(i0['iters'], 1)
    _xs = (_x * 1.6 - 0.3).clamp(0, 1)  # saturated pixels; few iterations and no finish: the exact fallback
    be, ie = nullspace_blend(m, _xs, _t * 3 - 1, iters=3, polish=False)
    assert ie['fallback'] > 0 and ie['unconverged'] == 0 and ie['residual'] < 1e-12 and 0 <= be.min() and be.max() <= 1
    test_close(tok(be), tok(_xs), eps=1e-4)
    bn, inn = nullspace_blend(m, _xs, _t * 3 - 1, iters=3, polish=False, exact=False)
    assert inn['unconverged'] > 0 and inn['residual'] > 1e-6  # without it, patches stay off A
    bu, iu = nullspace_blend(m, _x, _t, box=False)
    test_close(bu, _x + project_to_nullspace(m, _t - _x), eps=1e-6)
    test_close(iu['share'], torch.ones(4, dtype=torch.float64), eps=1e-5)
    assert iu['box_violation'] > 0  # the unconstrained move leaves [0, 1] on random targets
    print(f"{name}: Dykstra {info['iters']} iterations, residual {info['residual']:.1e}; share of the free move "
          f"{info['share'].mean():.3f}; max|Δlogit| {info['max_abs_dlogit']:.1e}")

_b1, _ = nullspace_blend(_models['avg'], _x, _t[0], measure=False)  # one target for all images broadcasts
test_close(_b1[1], nullspace_blend(_models['avg'], _x[1], _t[0], measure=False)[0], eps=1e-6)
test_fail(lambda: nullspace_blend(_models['avg'], _x, _t[:2]), contains='does not broadcast')
test_fail(lambda: nullspace_blend(_models['avg'], _x * 2, _t), contains='needs a source image in [0, 1]')
test_fail(lambda: nullspace_blend(_models['avg'], _x[:, :, :30], _t[:, :, :30]), contains='multiple of the patch size')

# %% [markdown]
# Clamping the closed form to [0, 1] breaks the invariance, and 8-bit rounding (≤ 1/510 per pixel) leaks a little into
# the row space: `info` reports both. The box-constrained result moves less than the free one (`share` < 1) but keeps
# the logits:

# %%
_m = _models['avg']
_bc, _ic = nullspace_blend(_m, _x, _t, box=False, clamp=True)
_bb, _ib = nullspace_blend(_m, _x, _t)
print(f"clamped: max|Δlogit| {_ic['max_abs_dlogit']:.2e}  box: {_ib['max_abs_dlogit']:.2e}  "
      f"box+8 bit: {_ib['8bit_max_abs_dlogit']:.2e}  (max |logit| {_ib['max_abs_logit']:.2f})")
assert _ic['max_abs_dlogit'] > 100 * max(_ib['max_abs_dlogit'], 1e-7) and _ic['box_violation'] == 0


# %% [markdown]
# **No gradient through the network.** With `measure=False` the forward pass is never called — here the network's
# forward raises — and no tensor requires grad: the solve reads the patch-embedding weights, nothing else.

# %%
class _NoForward(Exception): pass
def _raise(*a): raise _NoForward('forward called')
_h = _m.vit.register_forward_pre_hook(_raise)
try:
    test_fail(lambda: _m(_x), contains='forward called')  # the network cannot run
    _b, _i = nullspace_blend(_m, _x.requires_grad_(), _t, measure=False)
    assert not _b.requires_grad and _i['unconverged'] == 0
finally: _h.remove(); _x.requires_grad_(False)


# %% [markdown]
# ## Watermarks
# Appendix E: `watermark` blends a mark into images with `nullspace_blend`, the target being
# x + strength · (mark − x) (strength 1: the mark itself). `text_mark` renders a text logo with PIL: light text with a
# dark outline on mid grey, so it has edges of both signs.

# %%
#| export
def text_mark(text: str = 'NS\nViT',  # the text; \n for lines
              size: int | tuple[int, int] = 32,  # (H, W) of the mark
              font_size: int | None = None,  # default: fits the height
              fg: float = 1.0, bg: float = 0.5, stroke: float = 0.0,  # text, background, outline grey levels
              stroke_width: int = 1) -> Tensor:
    "A (3, H, W) grey text logo in [0, 1], rendered with PIL's default font."
    H, W = (size, size) if isinstance(size, int) else size
    lines = text.split('\n')
    font = ImageFont.load_default(size=font_size or max(6, int(0.8 * H / len(lines))))
    img = Image.new('L', (W, H), int(round(255 * bg)))
    ImageDraw.Draw(img).multiline_text((W / 2, H / 2), text, fill=int(round(255 * fg)), font=font, anchor='mm',
                                       align='center', stroke_width=stroke_width, stroke_fill=int(round(255 * stroke)))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).expand(3, H, W).contiguous()

def watermark(model: nn.Module,
              image: Tensor,  # images (B, C, H, W) or (C, H, W) in [0, 1]
              mark: Tensor,  # the mark, broadcastable to `image`, in [0, 1]
              strength: float = 1.0,  # target = image + strength · (mark − image)
              box: bool = True,  # stay in [0, 1] exactly
              **kwargs) -> tuple[Tensor, dict]:  # passed on to `nullspace_blend`
    "Emboss `mark` into `image` along the patch embedding's nullspace: the model's output does not change."
    return nullspace_blend(model, image, image + strength * (mark.to(image) - image), box=box, **kwargs)


# %%
_mk = text_mark()
test_eq(_mk.shape, (3, 32, 32)); test_close(_mk[:, 0, 0], torch.full((3,), 128 / 255)); assert (_mk == 1).any()
_w, _iw = watermark(_m, _x, _mk)
assert _iw['max_abs_dlogit'] <= 1e-4 * _iw['max_abs_logit'] and 0 <= _w.min() and _w.max() <= 1
_w0, _ = watermark(_m, _x, _mk, strength=0.0)
test_eq(_w0, _x)
_wu, _ = watermark(_m, _x, _mk, strength=0.5, box=False, measure=False)
test_close(_wu, _x + 0.5 * project_to_nullspace(_m, _mk - _x), eps=1e-6)
import matplotlib.pyplot as plt
fig, axs = plt.subplots(1, 3, figsize=(6, 2))
for a, im, tt in zip(axs, (_x[0], _mk, _w[0]), ('source', 'mark', 'watermarked (random-init tiny ViT)')):
    a.imshow(im.permute(1, 2, 0).numpy()); a.set_title(tt, fontsize=7); a.axis('off')


# %% [markdown]
# **8-bit PNG.** A PNG is lossless, so saving an image in [0, 1] as 8 bits is exactly `quantize8`; `info` measures the
# logits on that version (`8bit_*`):

# %%
#| export
def png_roundtrip(x: Tensor) -> Tensor:
    "Save one image (C, H, W) in [0, 1] as an 8-bit PNG in memory and read it back."
    buf = io.BytesIO()
    Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(buf, format='PNG')
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255).permute(2, 0, 1)


# %%
test_eq(png_roundtrip(_w[0]), quantize8(_w[0]))

# %% [markdown]
# ## Experiment
# **Figure 6** (App. E): a text mark embossed into CIFAR-10 test images on the default model, in three variants —
# the closed form clamped to [0, 1], the box-constrained projection, and that projection saved as an 8-bit PNG — with
# the paper's metrics (class-match rate, mean |Δ confidence| of the source's class) and PSNR/SSIM to the source and
# to the mark. **Figure 7** (App. F): each test image moved towards another test image, with pixel distances and the
# logit change; first a measurement of *which* pixel patterns the default model's nullspace contains, and the same
# transformation on a random-init ViT-S/32 at 224 px for comparison. `papermill nbs/10_blend.ipynb /dev/null` writes
# `reports/fig6_watermark/` and `reports/fig7_lookalike/`; `-p smoke True` (and `nbdev_test`) a small version under
# `runs/smoke/`.

# %% tags=["parameters"]
n_images: int = 1000  # CIFAR-10 test images watermarked (Figure 6 statistics)
n_pairs: int = 500  # (source, target) test-image pairs (Figure 7 statistics)
n_show: int = 4  # rows shown in each figure
mark_text: str = 'NS|ViT'  # text of the mark ('|' breaks lines)
strength: float = 1.0  # the target is x + strength·(mark − x)
iters: int = 1000  # Dykstra iterations per round (3 rounds with the certified finish)
big_model: str = 'vit_small_patch32_224'  # random-init timm ViT with a large nullspace, for comparison
big_size: int = 224  # its image size (CIFAR-10 images are upsampled bilinearly)
n_big: int = 4  # pairs shown on it
model: str = 'default'  # 'default' (embedded CIFAR-10 ViT) or a timm ViT name
checkpoint: str = ''  # weights: '' (default model's), a local file, or 'hub'
seed: int = 0  # seed of the image samples and of the random-init model
device: str = 'cpu'  # 'cpu', 'cuda', ...
threads: int = 2  # CPU threads for torch
smoke: bool = False  # tiny run for tests (written under runs/smoke/)
report: str = ''  # folder under reports/ for this run; '' → fig6_watermark and fig7_lookalike (a named folder holds both as subfolders). A named folder is written whatever the parameters (unnamed, a non-default run goes to runs/reports/<artifact>-<digest>)
commit_report: bool = False  # write into the committed reports/ folder even when the parameters differ from its meta.json (make reports and make study do)


# %%
import time
import pandas as pd, matplotlib.pyplot as plt
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from ns_vit.data import load_images, repo_root, CIFAR10_CLASSES
from ns_vit.models import get_model, DEFAULT_CHECKPOINT, experiment_model
from ns_vit.report import report_dir, write_meta, save_table, save_figure, in_test
from ns_vit.training import atomic_save
from ns_vit.nullspace import null_spectrum
from pathlib import Path
from ns_vit.stats import accuracy_ci, mean_ci, fmt_ci
smoke = smoke or in_test()
if smoke: n_images, n_pairs, n_show, iters, big_size, n_big, threads = 32, 16, 2, 200, 64, 2, 1
torch.set_num_threads(threads)
params = dict(n_images=n_images, n_pairs=n_pairs, n_show=n_show, mark_text=mark_text, strength=strength, iters=iters,
              big_model=big_model, big_size=big_size, n_big=n_big, model=model, checkpoint=checkpoint, seed=seed,
              device=device, threads=threads, smoke=smoke)
rep6, rep7 = (report_dir(f'{report}/{a}' if report else a, smoke, params=params, commit=commit_report or bool(report)) for a in ('fig6_watermark', 'fig7_lookalike'))
t0 = time.time()
net = experiment_model(model, checkpoint, device, smoke=smoke)  # smoke runs on a clone without the weights: a stand-in
Q = patch_embed_nullspace(net)  # (k, n), pixel space
print(null_dims(net))

# %% [markdown]
# ### Which pixel patterns can move
# The nullspace holds a share of a patch's dimensions (`null_dims`, printed above), but *which* directions matters for
# what a target can do. `null_spectrum` (notebook 03) puts each P×P DCT pattern into colour as luminance or as one of two
# opponent chroma directions and measures the share of its energy that lies in the nullspace, ‖Q v‖². A random subspace
# of the same dimension gives every pattern the same share on average (k / 3P²); the random-init default architecture
# shows that baseline. What a *real* difference between two images can move is measured directly below (`null_share`: the
# fraction of ‖t − x‖² that lies in the nullspace).

# %%
torch.manual_seed(seed)
spec = {'trained default': null_spectrum(Q, 8), 'random-init default': null_spectrum(patch_embed_nullspace(default_vit()), 8)}
big = create_vit(big_model, img_size=big_size).eval()  # random init, seeded above
Q_big = patch_embed_nullspace(big)
spec[f'random-init {big_model}'] = null_spectrum(Q_big, patch_size(big)[0])
low = lambda m, f=2: m[:f, :f].mean().item()  # the 2×2 lowest frequencies (DC included)
spectrum = pd.DataFrame([dict(model=k, colour=c, dc=v[0, 0].item(), lowest_2x2=low(v), highest_row_col=v[-1].mean().item() / 2 + v[:, -1].mean().item() / 2,
                              mean=v.mean().item()) for k, s in spec.items() for c, v in s.items()])
spectrum

# %%
fig, axs = plt.subplots(1, 3, figsize=(11, 3.4))
for a, (k, s) in zip(axs, spec.items()):
    im = a.imshow(s['luminance'].numpy(), vmin=0, vmax=1, cmap='magma')
    a.set(title=f'{k}\n(luminance, DCT frequency u, v)', xlabel='v', ylabel='u'); a.title.set_fontsize(8)
fig.colorbar(im, ax=axs, shrink=0.8, label='share of the pattern in the nullspace')
save_figure(fig, rep7, 'nullspace_spectrum'); plt.close(fig)
save_table(spectrum, rep7, 'nullspace_spectrum');

# %% [markdown]
# ### Figure 6: watermark
# The mark is a text logo; the target is x + strength·(mark − x). Four versions of each watermarked image: the closed
# form x + QQᵀ(t − x) **unclipped** (not a valid image: shown only for reference), the same **clamped** to [0, 1],
# the **box**-constrained projection (Dykstra + certified finish), and that **8-bit** (what a PNG stores). The paper's
# metrics are on the source's assigned class c: class match (prediction unchanged) and |p_c(x′) − p_c(x)|.

# %%
x, y = load_images('cifar10', 'test', n_images, seed)  # (n, 3, 32, 32)
mark = text_mark(mark_text.replace('|', '\n'), size=x.shape[-2:])
t1 = time.time()
w_free, i_free = watermark(net, x, mark, strength, box=False, basis=Q)
w_clamp, i_clamp = watermark(net, x, mark, strength, box=False, clamp=True, basis=Q)
w_box, i_box = watermark(net, x, mark, strength, box=True, iters=iters, basis=Q)
solve_s = time.time() - t1
print(f"box: {i_box['patches']} patches, Dykstra {i_box['iters']} iterations left {i_box['dykstra_unconverged']} off A "
      f"(max {i_box['dykstra_residual']:.1e}); certified finish {i_box['polished']}; shortened (exact fallback) "
      f"{i_box['fallback']} with mean λ {i_box['fallback_lambda']:.2f}; still off A {i_box['unconverged']} "
      f"(max {i_box['residual']:.1e} pixels); {solve_s:.0f} s for all variants")


# %%
def image_scores(a: Tensor, ref: Tensor) -> tuple[np.ndarray, np.ndarray]:
    "Per-image PSNR (dB, capped at 100) and SSIM of images `a` against `ref` (N, C, H, W), data range 1."
    A, B = (v.permute(0, 2, 3, 1).double().numpy() for v in (a, torch.broadcast_to(ref, a.shape)))  # unclipped as given
    psnr = np.array([min(peak_signal_noise_ratio(r, i, data_range=1.0), 100.0) for i, r in zip(A, B)])
    ssim = np.array([structural_similarity(r, i, data_range=1.0, channel_axis=-1) for i, r in zip(A, B)])
    return psnr, ssim

def variant_row(name: str, imgs: Tensor, info: dict, k: str = '') -> dict:
    "Figure 6's metrics for one variant: match rate (Wilson), |Δconf| and image scores (t intervals), with n."
    m, dc = accuracy_ci(info[f'{k}pred_match']), mean_ci(info[f'{k}dconf'].numpy())
    ps, ss = image_scores(imgs, x)
    pm, sm = image_scores(imgs, mark)
    row = dict(variant=name, n=m['n'], class_match=m['value'], match_lo=m['ci_low'], match_hi=m['ci_high'],
               dconf=dc['value'], dconf_lo=dc['ci_low'], dconf_hi=dc['ci_high'], max_abs_dlogit=info[f'{k}max_abs_dlogit'])
    for tag, v in (('psnr_source', ps), ('psnr_mark', pm), ('ssim_source', ss), ('ssim_mark', sm)):
        c = mean_ci(v)
        row |= {tag: c['value'], f'{tag}_ci': (c['ci_high'] - c['ci_low']) / 2}
    return row | dict(out_of_box=float(((imgs < 0) | (imgs > 1)).float().mean()), max_token_change=info['embed_change'].max().item(),
                      share=info['share'].mean().item(), corr=info['corr'].mean().item())

i_box8 = blend_measures(net, x, quantize8(w_box), torch.broadcast_to(x + strength * (mark - x), x.shape), basis=Q) | \
    {k: i_box[f'8bit_{k}'] for k in ('pred_match', 'dconf', 'max_abs_dlogit')}
_ps, _ss = image_scores(x, mark)
reference = dict(variant='source itself (reference)', n=len(x), psnr_mark=_ps.mean(), ssim_mark=_ss.mean(), psnr_source=float('inf'), ssim_source=1.0)
rows6 = [variant_row('unclipped (not an image)', w_free, i_free), variant_row('unclipped + clamp', w_clamp, i_clamp),
         variant_row('box (Dykstra)', w_box, i_box), variant_row('box + 8-bit PNG', quantize8(w_box), i_box8)]
fig6 = pd.DataFrame([reference] + rows6, columns=list(rows6[0]))
fig6

# %%
pname = lambda c, p: f'{CIFAR10_CLASSES[c]} {p:.2f}'
@torch.no_grad()
def pred_conf(imgs: Tensor) -> tuple[Tensor, Tensor]:
    "Predicted class and its probability."
    p = net(imgs.to(device)).softmax(1).cpu()
    return p.argmax(1), p.max(1).values

cols = [('source', x), ('unclipped + clamp', w_clamp), ('box', w_box), ('box, 8-bit PNG', quantize8(w_box))]
fig, axs = plt.subplots(n_show, len(cols) + 2, figsize=(2 * (len(cols) + 2), 2.1 * n_show), squeeze=False)
for r in range(n_show):
    for c, (name, imgs) in enumerate(cols):
        pc, cf = pred_conf(imgs[r:r + 1])
        axs[r, c].imshow(imgs[r].clamp(0, 1).permute(1, 2, 0).numpy())
        axs[r, c].set_title(f'{name}\n{pname(pc.item(), cf.item())}', fontsize=7)
    axs[r, len(cols)].imshow(mark.permute(1, 2, 0).numpy()); axs[r, len(cols)].set_title('mark', fontsize=7)
    dv = (w_box[r] - x[r]).mean(0)
    axs[r, len(cols) + 1].imshow(dv.numpy(), cmap='RdBu_r', vmin=-dv.abs().max(), vmax=dv.abs().max())
    axs[r, len(cols) + 1].set_title(f'box − source (grey)\nmax |Δ| {(w_box[r] - x[r]).abs().max():.2f}', fontsize=7)
for a in axs.flat: a.axis('off')
fig.suptitle(f'Figure 6: nullspace watermark on the {model} model (strength {strength:g})', fontsize=9)
fig.tight_layout()
save_figure(fig, rep6, 'fig6'); plt.close(fig)
save_table(fig6, rep6, 'fig6_watermark')
write_meta(rep6, params, t0, device, solve_s=round(solve_s, 1), null_dims=null_dims(net),
           dykstra={k: i_box[k] for k in ('iters', 'patches', 'dykstra_unconverged', 'dykstra_residual', 'polished',
                                          'fallback', 'fallback_lambda', 'unconverged', 'residual')});

# %% [markdown]
# ### Figure 7: look-alike images
# Each source is moved towards a different test image (box-constrained). `null_share` is the fraction of ‖t − x‖²
# in the nullspace — the most a move can remove; `share` is the fraction of that removed within the box. To see
# *what* moves, the distance to the target is split into a low-pass part (4×4 average pooling: 8×8 blocks of 4×4
# pixels) and the high-pass rest.

# %%
xs, ys = x[:n_pairs], y[:n_pairs]
tg, tl = load_images('cifar10', 'test', n_pairs, seed + 1)  # targets: another sample
t1 = time.time()
lk, i_lk = nullspace_blend(net, xs, tg, iters=iters, basis=Q)
lk_s = time.time() - t1
lowpass = lambda a: F.avg_pool2d(a.double(), 4)  # (N, C, 8, 8)
split = lambda a, b: ((lowpass(a) - lowpass(b)).flatten(1).norm(dim=1) * 4,  # low-pass L2 (in pixel units)
                      ((a.double() - F.interpolate(lowpass(a), scale_factor=4)) - (b.double() - F.interpolate(lowpass(b), scale_factor=4))).flatten(1).norm(dim=1))
lo0, hi0 = split(xs, tg); lo1, hi1 = split(lk, tg)
ssim_t0, ssim_t1 = image_scores(xs, tg)[1], image_scores(lk, tg)[1]
p_tg = pred_conf(tg)[0]
pairs = pd.DataFrame(dict(dist_source_target=i_lk['dist_source_target'], dist_target=i_lk['dist_target'],
                          dist_source=i_lk['dist_source'], null_share=i_lk['null_share'], share=i_lk['share'],
                          lowpass_reduction=(1 - lo1 / lo0.clamp_min(1e-12)), highpass_reduction=(1 - hi1 / hi0.clamp_min(1e-12)),
                          ssim_target_before=ssim_t0, ssim_target_after=ssim_t1, max_abs_dlogit=i_lk['dlogit'],
                          max_abs_dlogit_8bit=i_lk['8bit_dlogit'], match=i_lk['pred_match'], match_8bit=i_lk['8bit_pred_match'],
                          pred_is_target_pred=(i_lk['pred'] == p_tg) & (i_lk['pred_source'] != p_tg)))
summary7 = []
for col in ('dist_source_target', 'dist_target', 'dist_source', 'null_share', 'share', 'lowpass_reduction',
            'highpass_reduction', 'ssim_target_before', 'ssim_target_after', 'max_abs_dlogit', 'max_abs_dlogit_8bit'):
    c = mean_ci(pairs[col].to_numpy(float))
    summary7.append(dict(model=model, metric=col, n=c['n'], mean=c['value'], ci_lo=c['ci_low'], ci_hi=c['ci_high'], max=pairs[col].max()))
for col in ('match', 'match_8bit', 'pred_is_target_pred'):
    c = accuracy_ci(pairs[col].to_numpy())
    summary7.append(dict(model=model, metric=col, n=c['n'], mean=c['value'], ci_lo=c['ci_low'], ci_hi=c['ci_high'], max=float('nan')))
summary7 = pd.DataFrame(summary7)
summary7

# %% [markdown]
# The same transformation on the random-init ViT-S/32 at 224 px (CIFAR-10 images upsampled): 2688 of 3072 dimensions
# per patch are null there. Random weights are fine for this: the constraint and its solution depend only on the
# patch-embedding matrix, and the invariance holds for any weights (the logits of a random-init model mean nothing as
# classes, so only the logit change is reported). A trained ImageNet ViT-S/32 has the same dimensions; how isotropic
# its nullspace is, is not measured here.

# %%
up = lambda a: F.interpolate(a, size=big_size, mode='bilinear', align_corners=False).clamp(0, 1)
xb, tb = up(xs[:n_big]), up(tg[:n_big])
big_lk, i_big = nullspace_blend(big, xb, tb, iters=iters, basis=Q_big)
lo0b, hi0b = split(F.interpolate(xb, size=32, mode='area'), F.interpolate(tb, size=32, mode='area'))
for key, i_, nm in (('default', {k: v[:n_big] if torch.is_tensor(v) and v.ndim else v for k, v in i_lk.items()}, model), ('big', i_big, big_model)):
    summary7 = pd.concat([summary7, pd.DataFrame([dict(model=f'{nm} (first {n_big} pairs)', metric=k, n=n_big, mean=i_[k].mean().item(),
                                                     ci_lo=float('nan'), ci_hi=float('nan'), max=i_[k].max().item())
                                                for k in ('null_share', 'share', 'dist_source_target', 'dist_target')])])
big_rel = i_big['max_abs_dlogit'] / i_big['max_abs_logit']
print(f"{big_model}: null_share {i_big['null_share'].mean():.3f}, share {i_big['share'].mean():.3f}, max|Δlogit| "
      f"{i_big['max_abs_dlogit']:.1e} ({big_rel:.1e} of max |logit|), Dykstra {i_big['iters']} iterations, off A {i_big['unconverged']}")

# %%
fig, axs = plt.subplots(n_show, 6, figsize=(12.5, 2.6 * n_show), squeeze=False)
for r in range(n_show):
    ps, cs = pred_conf(xs[r:r + 1]); pt, ct = pred_conf(tg[r:r + 1]); pl, cl = pred_conf(lk[r:r + 1])
    panels = [(xs[r], f'source\n{pname(ps.item(), cs.item())}'), (tg[r], f'target\n{pname(pt.item(), ct.item())}'),
              (lk[r], f'transformed ({model})\n{pname(pl.item(), cl.item())}')]
    if r < n_big: panels += [(xb[r], f'source, {big_size} px'), (tb[r], f'target, {big_size} px'),
                             (big_lk[r], f'transformed (random {big_model})\nmax|Δlogit| {i_big["dlogit"][r]:.0e}')]
    for c, (im, tt) in enumerate(panels):
        axs[r, c].imshow(im.clamp(0, 1).permute(1, 2, 0).numpy()); axs[r, c].set_title(tt, fontsize=7)
for a in axs.flat: a.axis('off')
fig.suptitle('Figure 7: look-alike images (same patch embeddings as the source, nearest to the target in [0, 1])', fontsize=9)
fig.tight_layout()
save_figure(fig, rep7, 'fig7'); plt.close(fig)
save_table(summary7, rep7, 'fig7_lookalike')
save_table(pairs.describe().T.reset_index(), rep7, 'fig7_pairs_describe')
write_meta(rep7, params, t0, device, solve_s=round(lk_s, 1),
           dykstra={k: i_lk[k] for k in ('iters', 'patches', 'dykstra_unconverged', 'dykstra_residual', 'polished', 'fallback', 'fallback_lambda', 'unconverged', 'residual')},
           big_model=dict(name=big_model, weights='random init', img_size=big_size, **null_dims(big), max_abs_dlogit=i_big['max_abs_dlogit'],
                          rel=big_rel, null_share=i_big['null_share'].mean().item(), share=i_big['share'].mean().item()));

# %% [markdown]
# ## What the numbers say

# %%
print(f"source vs mark: PSNR {reference['psnr_mark']:.1f} dB, SSIM {reference['ssim_mark']:.3f} (n = {len(x)})")
for _, r in fig6.iloc[1:].iterrows():
    print(f"{r.variant:>26}: class match {fmt_ci(r.class_match, r.match_lo, r.match_hi)} % (n = {r.n}), mean |Δconf| "
          f"{r.dconf:.4f} [{r.dconf_lo:.4f}, {r.dconf_hi:.4f}], max |Δlogit| {r.max_abs_dlogit:.1e}; PSNR to source "
          f"{r.psnr_source:.1f} ± {r.psnr_source_ci:.1f} dB, to mark {r.psnr_mark:.1f} ± {r.psnr_mark_ci:.1f}; SSIM to "
          f"source {r.ssim_source:.3f}, to mark {r.ssim_mark:.3f}")
s7 = summary7[summary7.model == model].set_index('metric')
print(f"look-alikes (n = {n_pairs}): ‖t − x‖ {s7.loc['dist_source_target', 'mean']:.2f} → ‖t − x′‖ {s7.loc['dist_target', 'mean']:.2f} "
      f"(‖x′ − x‖ {s7.loc['dist_source', 'mean']:.2f}); nullspace share of ‖t − x‖² {s7.loc['null_share', 'mean']:.3f}, "
      f"achieved {s7.loc['share', 'mean']:.3f} of it; low-pass distance reduced by {s7.loc['lowpass_reduction', 'mean']:.1%}, "
      f"high-pass by {s7.loc['highpass_reduction', 'mean']:.1%}; SSIM to target {s7.loc['ssim_target_before', 'mean']:.3f} → "
      f"{s7.loc['ssim_target_after', 'mean']:.3f}; max |Δlogit| {s7.loc['max_abs_dlogit', 'max']:.1e}, 8-bit {s7.loc['max_abs_dlogit_8bit', 'max']:.1e}")

# %%
assert (w_box.min() >= 0) and (w_box.max() <= 1) and (lk.min() >= 0) and (lk.max() <= 1)
assert fig6.set_index('variant').loc['box (Dykstra)', 'class_match'] == 1.0 and i_box['unconverged'] == 0 and i_lk['unconverged'] == 0
assert i_free['max_abs_dlogit'] <= 1e-3 * i_free['max_abs_logit'] + 1e-5  # the closed form is invariant (float32)
assert (i_lk['dist_target'] <= i_lk['dist_source_target'] + 1e-9).all() and (i_lk['share'] <= 1 + 1e-6).all()
assert big_rel < 1e-3 and (i_big['null_share'] > i_lk['null_share'][:n_big]).all()

# %% [markdown]
# **Reading the results.** The closed form is invariant only as long as nobody clamps it: it leaves [0, 1] on a few
# percent of pixels, and clamping those back moves tokens and flips predictions (the `unclipped + clamp` row). The
# box-constrained projection keeps the prediction of every image and the confidence to float round-off, at the price of
# a somewhat smaller move (`share` < 1); patches where Dykstra's tail did not reach `tol` and the active-set finish
# could not certify the result take the shorter, exactly feasible step (counted in `meta.json`). Saving as an 8-bit PNG rounds
# every pixel by up to 1/510, and the part of that rounding outside the nullspace changes the logits by up to a few
# hundredths: a watermarked PNG is *not* exactly the same input to the model, though predictions rarely change.
#
# **What "looks like the target" means here.** How much of a target a look-alike can take is bounded by the share of
# ‖t − x‖² that lies in the nullspace, and which part it takes follows the spectrum above: the patterns the trained
# patch embedding keeps for itself cannot move. The numbers of the trained default model — the null share, the spectrum
# against the random-init baseline, and in which frequency band the distance to the target shrinks or grows — are
# generated below from `fig7_lookalike.md` and `nullspace_spectrum.md`; on this model a look-alike keeps the source's
# coarse layout and does not look like the target to a person (Figure 7, third column), and a mark is "embossed"
# rather than visible as a logo. With a large, isotropic nullspace — the random-init ViT-S/32 — the same algorithm
# turns the source into a recognisable, noisy copy of the target while the logits stay fixed (Figure 7, right
# columns): the paper's Figure 7 depends on such a model. A trained ImageNet ViT-S/32 was not available offline and is
# not measured.

# %%
sp = spectrum.set_index(['model', 'colour'])
lum, chroma_dc = sp.loc[('trained default', 'luminance')], sp.loc['trained default'].loc[['red_green', 'blue_yellow'], 'dc'].mean()
random_mean = sp.loc['random-init default', 'mean'].mean()
band = lambda v: f'shrinks by {v:.1%}' if v > 0 else f'grows by {-v:.1%}'
nd_big = null_dims(big)
s7b = summary7.set_index(['model', 'metric'])
big_share = s7b.loc[(f'{big_model} (first {n_big} pairs)', 'null_share'), 'mean'] if n_big else float('nan')
reading = (f"On the trained default model a mean {s7.loc['null_share', 'mean']:.3f} of ‖t − x‖² lies in the nullspace "
           f"(n = {n_pairs} pairs). The trained patch embedding leaves {lum.dc:.2f} of the luminance DC pattern null "
           f"(chroma DC {chroma_dc:.2f}; lowest 2×2 luminance frequencies {lum.lowest_2x2:.2f}, highest row and column "
           f"{lum.highest_row_col:.2f}), where its random-init architecture leaves {random_mean:.2f} of a pattern null on "
           f"average. The look-alike's distance to the target {band(s7.loc['lowpass_reduction', 'mean'])} in the low-pass "
           f"band and {band(s7.loc['highpass_reduction', 'mean'])} in the high-pass band; SSIM to the target "
           f"{s7.loc['ssim_target_before', 'mean']:.3f} → {s7.loc['ssim_target_after', 'mean']:.3f}. The random-init "
           f"{big_model} has {nd_big['null_dim_numerical']} of {nd_big['input_dim']} dimensions of a patch null, and "
           f"{big_share:.3f} of ‖t − x‖² of its first {n_big} pairs lies in its nullspace.")
atomic_save(reading + '\n', rep7 / 'reading.md', lambda o, q: Path(q).write_text(o))
print(reading)
