# %% [markdown]
# # Figure 3: the approximate nullspace exists
# > Noise learned at the patch embedding (Eq. 4) for a sweep of λ keeps the model's predictions on unseen images, where
# > the same noise with its entries permuted, or Gaussian noise of the same norm, changes them.

# %% [markdown]
# Paper §3.2–3.3. The exact nullspace of the patch embedding (notebook 03) is a property of one linear layer. The paper
# asks whether the whole encoder has an *approximate* nullspace: a noise δ ∈ ℝ^{N×D}, added to the patch embeddings,
# so large that it would wreck the output in a random direction, yet leaving the output almost unchanged in its own.
# δ is learned on training images by minimising mean ‖f(x + δ) − f(x)‖ − λ·log‖δ‖ (Eq. 4, `synthesize_noise`): λ
# trades the size of the noise against the change it causes. Figure 3 then measures the learned noise on *test*
# images, which it never saw, against two controls of exactly the same norm: the learned noise with its entries
# permuted (same values, new direction) and Gaussian noise. If the model had no preferred directions, all three
# would do the same damage. Three numbers per noise: the share of unchanged top-1 predictions (`match`), the mean
# squared change of the clean top-class probability (`mse_conf`), and of the whole probability vector (`mse_prob`).
#
# **A nullspace the paper does not discuss.** A pre-LN ViT reads its residual stream only through LayerNorms (each
# block's `norm1` and `norm2`, and the final norm), and LayerNorm subtracts the mean over the D channels. A noise that
# adds the same constant to all D channels of a token therefore changes *nothing*, at any norm: an exact N-dimensional
# nullspace of the encoder (16 dimensions for the default model), invisible to the patch embedding analysis. A noise
# learned by gradient descent may grow along it for free. We check it below, report the share of each learned noise's
# energy that lies there (`ln_share`), and add two more noises: the learned one with that part removed (`centred`,
# which predicts exactly like the learned noise), and the centred noise permuted (`centred_permuted`), the fair control
# for the part of the learned noise that is *not* trivially null.

# %%
import time
import numpy as np, pandas as pd, torch, matplotlib.pyplot as plt
from ns_vit.progress import tqdm
from ns_vit.data import load_images, repo_root
from ns_vit.models import get_model, default_vit, as_vit, DEFAULT_CHECKPOINT, experiment_model, loader_size
from ns_vit.noise import embed_shape, noise_influence, synthesize_noise, permute_noise, gaussian_like
from ns_vit.report import report_dir, write_meta, save_table, save_figure, in_test

# %% [markdown]
# ## Experiment

# %% tags=["parameters"]
lams: list = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]  # λ of Eq. 4: weight of the −log‖δ‖ term that makes the noise large
model: str = 'default'  # an embedded CIFAR-10 ViT ('default', 'vit-ti8') or a timm ViT name
report: str = ''  # folder under reports/; '' → fig3_approx_nullspace (default model) or fig3_approx_nullspace/<model>
checkpoint: str = ''  # weights: '' (default model's), a local file, or 'hub'
dataset: str = 'cifar10'  # 'cifar10' or an ImageFolder root with train/ and val/
n_train: int = 256  # training images the noise is learned on (one batch, every step)
n_test: int = 2000  # test images the noise is measured on
steps: int = 200  # AdamW steps of the noise descent
lim: float = 1.0  # initial noise U(−lim, lim), RMS entry lim/√3; the default model's tokens: RMS entry ≈ 1.3, ≈ 59 per image
lr: float = 0.05  # learning rate of the noise descent
seed: int = 0  # seed of the image samples, noise starts and controls
device: str = 'cpu'  # 'cpu', 'cuda', ...
threads: int = 2  # CPU threads for torch
smoke: bool = False  # tiny run for tests (written under runs/smoke/)
commit_report: bool = False  # write into the committed reports/ folder even when the parameters differ from its meta.json (make reports and make study do)


# %%
smoke = smoke or in_test()
if smoke: n_train, n_test, steps, lams = 32, 100, 10, [lams[0], lams[-1]]
if smoke: threads = 1  # tiny tensors: a second thread only adds overhead (and stalls on a busy machine)
torch.set_num_threads(threads)
params = dict(lams=lams, model=model, report=report, checkpoint=checkpoint, dataset=dataset, n_train=n_train, n_test=n_test, steps=steps,
              lim=lim, lr=lr, seed=seed, device=device, smoke=smoke)
rep = report_dir(report or ('fig3_approx_nullspace' if model == 'default' else f'fig3_approx_nullspace/{model}'), smoke, params=params, commit=commit_report or bool(report))
t0 = time.time()
net = experiment_model(model, checkpoint, device, smoke=smoke)  # smoke runs on a clone without the weights: a stand-in
N, D = embed_shape(net)

# %% [markdown]
# The scale of the noise only means something next to the scale of the tokens it is added to: the patch embeddings of
# real images (before position embeddings).

# %%
x_train, _ = load_images(dataset, 'train', n_train, seed, **loader_size(net))  # an image folder at the model's input size
x_test, _ = load_images(dataset, 'test', n_test, seed, **loader_size(net))
with torch.no_grad(): tokens = as_vit(net).patch_embed(net.normalize(x_train[:256].to(device)))  # (B, N, D)
tok_rms = tokens.pow(2).mean().sqrt().item()
img_norm = tokens.flatten(1).norm(dim=1).mean().item()
print(f'{N} tokens × D = {D}: token norm {tokens.norm(dim=-1).mean():.2f}, per image {img_norm:.1f}, RMS entry {tok_rms:.3f}')
print(f'initial noise U(−{lim:g}, {lim:g}): RMS entry {lim / 3 ** 0.5:.3f}, norm ≈ {lim * (N * D / 3) ** 0.5:.1f}')

# %% [markdown]
# The LayerNorm nullspace: a per-token constant, here with a norm many times that of the image's own tokens, leaves the
# predictions exactly as they were.

# %%
ln_noise = torch.randn(1, N, 1, generator=torch.Generator().manual_seed(seed)).to(device).expand(1, N, D) * 10 * img_norm / N ** 0.5
ln_check = noise_influence(net, x_test, ln_noise)
print(f"per-token constant of norm {ln_check['norm']:.0f}: match {ln_check['match']:.4f}, mse_prob {ln_check['mse_prob']:.1e}")


# %% [markdown]
# The sweep: one learned noise per λ, and its controls, all measured on the test images. Each noise starts from the
# same kind of U(−lim, lim) start, smaller than the clean tokens (scales printed above), and takes
# `steps` AdamW steps. For small λ the descent settles: the noise shrinks until the two terms of Eq. 4 balance. For
# large λ it need not: the noise can keep growing along directions the encoder ignores (the LayerNorm-null subspace
# above, and the overall scale of tokens the noise dominates, which LayerNorm divides out), so the distance term levels
# off while −λ·log‖δ‖ keeps falling, and the norm reached grows with the step budget. The norms in panel (b) are
# those of a fixed budget, not of a minimum.

# %%
def ln_share(delta: torch.Tensor) -> float:
    "Share of ‖δ‖² in the per-token-constant (LayerNorm-null) subspace."
    return (delta.mean(-1).pow(2).sum() * delta.shape[-1] / delta.pow(2).sum()).item()

g = torch.Generator().manual_seed(seed)
rows = []
for lam in tqdm(lams, desc='λ sweep', disable=smoke):
    delta = synthesize_noise(net, x_train, lam=lam, steps=steps, lim=lim, lr=lr, generator=g, quiet=True)  # (1, N, D)
    fit = noise_influence(net, x_train, delta)
    centred = delta - delta.mean(-1, keepdim=True)  # the LayerNorm-null part removed
    noises = dict(learned=delta, permuted=permute_noise(delta, g), gaussian=gaussian_like(delta, g), centred=centred,
                  centred_permuted=permute_noise(centred, g))
    for kind, d in noises.items():
        rows.append(dict(**{'lambda': lam, 'kind': kind}, **noise_influence(net, x_test, d), ln_share=ln_share(d),
                         train_match=fit['match'] if kind == 'learned' else np.nan))
res = pd.DataFrame(rows)[['lambda', 'kind', 'norm', 'match', 'mse_prob', 'mse_conf', 'ln_share', 'train_match']]
res

# %%
kinds = {'learned': dict(fmt='o-', color='C0', lw=2.5, ms=7), 'permuted': dict(fmt='s--', color='C3', lw=1.5, ms=5),
         'gaussian': dict(fmt='x:', color='C1', lw=1.5, ms=6), 'centred': dict(fmt='^--', color='C2', lw=1.2, ms=4),
         'centred_permuted': dict(fmt='v:', color='C4', lw=1.2, ms=4)}
fig, axs = plt.subplots(1, 3, figsize=(13, 3.6))
for kind, kw in kinds.items():
    r, kw = res[res.kind == kind], dict(kw)
    fmt = kw.pop('fmt')
    if kind != 'centred':  # predicts exactly like `learned`
        axs[0].plot(r['lambda'], r['match'], fmt, label=kind, **kw)
        axs[1].plot(r['lambda'], r['mse_conf'], fmt, label=kind, **kw)
    if kind in ('learned', 'centred'): axs[2].plot(r['lambda'], r['norm'], fmt, label=f'{kind} noise', **kw)
axs[2].axhline(img_norm, color='k', lw=0.8, ls='--', label='clean tokens (per image)')
axs[0].set(ylabel='match rate (top-1 unchanged)', ylim=(-0.02, 1.02), title='(a) predictions kept on test images')
axs[1].set(ylabel='MSE of confidence', title='(a) change of top-class probability')
if (res.mse_conf > 0).all(): axs[1].set_yscale('log')
axs[2].set(ylabel='‖δ‖', yscale='log', title='(b) noise norm')
for ax in axs: ax.set(xscale='log', xlabel='λ'); ax.legend(fontsize=8)
fig.suptitle(f'Approximate nullspace noise, {dataset} test images ({n_test}), noise learned on {n_train} train images', y=1.03)
fig.tight_layout()
save_figure(fig, rep, 'fig3'); plt.close(fig)
save_table(res, rep, 'fig3')
write_meta(rep, params, t0, device, token_norm_per_image=img_norm, token_rms=tok_rms, ln_nullspace_check=ln_check);

# %% [markdown]
# ## What the numbers say
# The learned noise is compared with its controls at every λ, and most sharply at the λ where it is largest: there the
# permuted and Gaussian noises have the same, large norm.

# %%
piv = res.pivot(index='lambda', columns='kind', values='match')
top = res[res.kind == 'learned'].set_index('lambda')
lam_big = top['norm'].idxmax()
kept = top.index[top['match'] >= 0.95]
print(f"largest learned noise: λ = {lam_big:g}, ‖δ‖ = {top.loc[lam_big, 'norm']:.1f} "
      f"({top.loc[lam_big, 'norm'] / img_norm:.2f}× the clean tokens' norm per image)")
print(f"  match on test images: learned {piv.loc[lam_big, 'learned']:.3f}, permuted {piv.loc[lam_big, 'permuted']:.3f}, "
      f"gaussian {piv.loc[lam_big, 'gaussian']:.3f}")
print(f"  share of ‖δ‖² in the LayerNorm-null subspace: {top.loc[lam_big, 'ln_share']:.3f}; the rest (norm "
      f"{res.set_index(['lambda', 'kind']).loc[(lam_big, 'centred'), 'norm']:.1f}) matches {piv.loc[lam_big, 'centred']:.3f}, "
      f"permuted {piv.loc[lam_big, 'centred_permuted']:.3f}")
lam_ln = top['ln_share'].idxmax()
print(f"largest LayerNorm-null share: {top.loc[lam_ln, 'ln_share']:.3f} at λ = {lam_ln:g}")
print(f"learned noise keeps ≥ 95% of test predictions at λ ∈ {{{', '.join(f'{l:g}' for l in kept)}}} (norm up to "
      f"{top.loc[kept, 'norm'].max():.1f}, {top.loc[kept, 'norm'].max() / img_norm:.2f}× the clean tokens' norm)"
      if len(kept) else 'learned noise keeps < 95% of test predictions at every λ')
print(f"learned beats permuted (higher match) at {int((piv.learned > piv.permuted).sum())} of {len(piv)} λ values, "
      f"its centred part beats its own permutation at {int((piv.centred > piv.centred_permuted).sum())}")

# %%
assert ln_check['mse_prob'] < 1e-6 or model != 'default'  # LayerNorm erases per-token constants in the default ViT
assert (res['norm'] > 0).all() and res[['mse_prob', 'mse_conf']].stack().between(0, 2).all()
assert res['match'].between(0, 1).all() and len(res) == 5 * len(lams)
lt = res.set_index(['lambda', 'kind'])['norm'].unstack()
assert np.allclose(lt.permuted, lt.learned, rtol=1e-4) and np.allclose(lt.gaussian, lt.learned, rtol=1e-4)
assert np.allclose(lt.centred_permuted, lt.centred, rtol=1e-4) and (lt.centred <= lt.learned * (1 + 1e-6)).all()
