# %% [markdown]
# # Table 3: NS finetuning against adversarial training
# > Clean against robust accuracy for NS finetuning, PGD adversarial training (Madry) and TRADES, all from the same
# > loop, steps, data and schedule and scored on the same images, with paired tests of NS against each of them.

# %% [markdown]
# Paper §5 (Table 3) sets NS finetuning beside adversarial training: PGD adversarial training (Madry et al.) and
# TRADES buy robustness to the attack they train on with clean accuracy, while NS finetuning, which never sees an
# attack, is reported to keep clean accuracy and to gain robustness across attacks and shifts. This notebook runs that
# comparison on the embedded CIFAR-10 model: every method finetunes the same base with the same loop, steps, data and
# schedule (`FinetuneConfig`, changed for all runs at once with `overrides`; the runs are shared with notebooks 05, 08
# and 09), and every model is scored on the same images of the evaluation suite (`ns_vit.evaluate`, the columns of
# Table 2).
#
# Two readings:
#
# 1. **The trade-off.** Clean accuracy against robust accuracy, one point per method with its 95% intervals on both
#    axes, one panel per robustness column. The base model, plain finetuning (`none`) and norm-matched random noise
#    (`gaussian`) are drawn as reference points; which of them NS beats is Table 2's question (notebook 09).
# 2. **NS against each adversarial-training method, paired.** On the same images, NS − Madry and NS − TRADES per
#    column: the exact McNemar test for accuracies, a paired t-test for per-image shares (CIFAR-10-C), and Holm's
#    correction over the columns of each comparison. The sentences under the table are generated from it.

# %%
import time
from dataclasses import asdict
from pathlib import Path
import torch, pandas as pd, matplotlib.pyplot as plt
from ns_vit.finetune import FinetuneConfig
from ns_vit.experiments import compare_methods
from ns_vit.evaluate import values_table, paired_tests
from ns_vit.stats import paired_table, significance_sentence, with_holm
from ns_vit.report import report_dir, write_meta, save_table, save_figure, in_test, param
from ns_vit.training import atomic_save

# %% [markdown]
# ## Experiment

# %% tags=["parameters"]
eps: float = 0.03  # ε of the approximate nullspace for the NS and random runs
methods: list = ['none', 'gaussian', 'ns', 'madry', 'trades']  # finetuning methods compared
overrides: dict = {}  # FinetuneConfig fields changed for every run, e.g. {"steps": 800}; {} → the defaults (runs shared with 05, 08, 09)
model: str = 'default'  # 'default' (embedded CIFAR-10 ViT) or a timm ViT name
checkpoint: str = ''  # weights: '' (default model's), a local file, or 'hub'
dataset: str = 'cifar10'  # 'cifar10' or an ImageFolder root with train/ and val/
train_fraction: float = 1.0  # share of the training set to finetune on
suite: str = 'cifar10'  # evaluation suite (ns_vit.evaluate; the same as Table 2, so results are shared through the cache)
seed: int = 0  # seed of everything random
device: str = 'cpu'  # 'cpu', 'cuda', ...
threads: int = 2  # CPU threads for torch
smoke: bool = False  # tiny run for tests (written under runs/smoke/)


# %%
#| notest
smoke = smoke or in_test()
methods, overrides = param(methods), param(overrides)
if 'ns' not in methods or not {'madry', 'trades'} & set(methods):
    raise ValueError(f"Table 3 compares 'ns' with 'madry' and/or 'trades': methods must include them, got {methods}")
runs_root, metrics, n = '', param(suite), None  # run folders: runs/finetune/ (shared by Tables 2–4 and notebook 05)
if smoke:
    import shutil; from ns_vit.data import repo_root
    runs_root = str(repo_root() / 'runs/smoke/finetune/table3'); shutil.rmtree(runs_root, ignore_errors=True)
    overrides = dict(steps=2, batch_size=16, refresh_every=2, noise_batch=16, noise_max_steps=20, adv_steps=1) | overrides
    train_fraction = 0.002
    metrics, n = ['clean', 'fgsm', 'pgd_small'], dict(clean=64, fgsm=24, pgd_small=24)
torch.set_num_threads(threads)
common = dict(eps=eps, seed=seed) | overrides
configs = {m: FinetuneConfig(method=m, **common).validate() for m in methods}
params = dict(asdict(configs[methods[0]]), overrides=overrides, methods=methods, model=model, checkpoint=checkpoint, dataset=dataset,
              train_fraction=train_fraction, suite=suite, metrics=metrics, n=n, device=device, smoke=smoke)
rep = report_dir('table3_robustness', smoke)
t0 = time.time()


# %%
#| notest
table, runs, results, _ = compare_methods(configs, model=model, checkpoint=checkpoint, dataset=dataset, train_fraction=train_fraction,
                                         suite=metrics, n=n, seed=seed, device=device, quiet=smoke, runs_root=runs_root)
table

# %% [markdown]
# Each cell is the accuracy in percent with its 95% interval (Wilson for accuracies; for CIFAR-10-C the mean over its
# cells with a t-interval over images), on the sample sizes and budgets of the suite (`settings` of each result).
#
# ## The trade-off: clean against robust accuracy
# One panel per robustness column; each point is a model, with its 95% intervals on both axes.

# %%
#| notest
tidy = pd.concat([df[df.n > 0].assign(model=k) for k, df in results.items()], ignore_index=True)
tidy = tidy[['model', 'metric', 'label', 'n', 'value', 'ci_low', 'ci_high']]
clean = tidy[tidy.metric == 'clean'].set_index('model')
robust = tidy[tidy.metric != 'clean']
tradeoff = robust.merge(clean[['value', 'ci_low', 'ci_high', 'n']], left_on='model', right_index=True, suffixes=('', '_clean'))
cols, colour = list(dict.fromkeys(robust.label)), {k: f'C{i}' for i, k in enumerate(results)}  # table order; one colour per model
ncol = min(4, len(cols)); nrow = -(-len(cols) // ncol)
fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 3.2 * nrow), squeeze=False)
for ax, col in zip(axes.flat, cols):
    for name, r in tradeoff[tradeoff.label == col].set_index('model').iterrows():
        ax.errorbar(100 * r.value_clean, 100 * r.value, fmt='o', color=colour[name], capsize=2, label=name,
                    xerr=[[100 * (r.value_clean - r.ci_low_clean)], [100 * (r.ci_high_clean - r.value_clean)]],
                    yerr=[[100 * max(r.value - r.ci_low, 0)], [100 * max(r.ci_high - r.value, 0)]])
    ax.set_title(col if len(col) < 45 else col[:43] + '…', fontsize=7)
    ax.set_xlabel('clean accuracy (%)', fontsize=8); ax.set_ylabel('robust accuracy (%)', fontsize=8)
for ax in axes.flat[len(cols):]: ax.set_visible(False)
axes.flat[0].legend(fontsize=7)
fig.suptitle(f'Table 3 on {dataset}: clean against robust accuracy per method (95% intervals; NS ε = {eps:g})', fontsize=9)
fig.tight_layout()
save_figure(fig, rep, 'table3'); plt.close(fig)

# %% [markdown]
# ## NS against adversarial training, on the same images
# Per column, NS − Madry and NS − TRADES on the same images (percentage points, 95% intervals); `*` marks the
# differences that stay significant after Holm's correction over the columns of each comparison.

# %%
#| notest
refs = {'madry': 'Madry PGD-AT', 'trades': 'TRADES'}
refs = {k: v for k, v in refs.items() if k in results}
vs = pd.concat([paired_tests(results, ref).query("model == 'ns'") for ref in refs], ignore_index=True)
vs = with_holm(vs).assign(label=lambda d: d.metric.map(dict(zip(tidy.metric, tidy.label))))
shown = paired_table(vs)
shown.attrs['note']

# %%
#| notest
shown

# %% [markdown]
# ## What the numbers say
# Generated from the tables above: clean accuracy per method, then the verdict of each paired comparison.

# %%
#| notest
c = clean.loc[[k for k in ('base', 'ns', *refs) if k in clean.index]]
names = {'base': 'the base model', 'ns': 'NS', **refs}
sentences = [f"Clean accuracy (n = {int(c.n.iloc[0])} test images, 95% intervals): " +
             '; '.join(f'{names[k]} {100 * r.value:.1f}% [{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]' for k, r in c.iterrows()) + '.']
sentences += [significance_sentence(vs, a='ns', b=ref, labels=('NS', name)) for ref, name in refs.items()]
conclusion = ' '.join(sentences)
print(conclusion)

# %%
#| notest
save_table(table, rep, 'table3'); save_table(values_table(results), rep, 'table3_values')
save_table(tradeoff, rep, 'tradeoff'); save_table(shown, rep, 'paired_tests')
atomic_save(conclusion + '\n', rep / 'conclusion.md', lambda o, q: Path(q).write_text(o))
write_meta(rep, params, t0, device, runs={k: r['run_dir'] for k, r in runs.items()}, conclusion=conclusion)

# %%
#| notest
assert set(table.model) == {'base', *methods} and all(df[df.n > 0].value.between(0, 1).all() for df in results.values())
test_metrics = set(results['ns'].metric[results['ns'].n > 0])
assert len(vs) == len(refs) * len(test_metrics) and set(vs.reference) == set(refs) and set(vs.model) == {'ns'}
assert (vs.p_holm >= vs.p_value - 1e-12).all() and "Holm" in shown.attrs['note']
assert all(f"{names[k]} " in conclusion for k in refs)
