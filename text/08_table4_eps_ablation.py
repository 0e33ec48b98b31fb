# %% [markdown]
# # Table 4: the ε ablation, NS noise against random noise
# > NS finetuning and norm-matched random-noise finetuning at ε ∈ {0.01, 0.03, 0.1}, with plain finetuning as control.

# %% [markdown]
# Paper Table 4 varies ε, the bound on the mean squared change of probabilities that defines the approximate
# nullspace: a larger ε admits larger, more disruptive noise. The "Random" rows add Gaussian noise at the patch
# embedding with the *same norm* as the NS noise found at that round, so the comparison isolates the noise's
# direction. Plain finetuning (`none`) with the same steps, data and schedule is the control.
#
# The table's two averages use Table 2's definitions and labels (`stats.averages`): ours over the robustness columns,
# the paper's over every column with clean included. Table 4 has fewer columns than Table 2 (no Patch-Fool or CW), so
# its labels count them and its note names them: its averages are not Table 2's numbers and are not to be compared
# with them. Paired differences carry McNemar's exact p with the exact interval that agrees with it (notebook 00b).

# %%
import time
from dataclasses import asdict
from ns_vit.stats import with_holm, paired_table, significance_sentence, with_averages
import torch, pandas as pd, matplotlib.pyplot as plt
from ns_vit.finetune import FinetuneConfig
from ns_vit.experiments import compare_methods
from ns_vit.evaluate import values_table, paired_tests, ROBUSTNESS
from ns_vit.report import report_dir, write_meta, save_table, save_figure, in_test, param

# %% [markdown]
# ## Experiment

# %% tags=["parameters"]
eps_values: list = [0.01, 0.03, 0.1]  # ε values compared
overrides: dict = {}  # FinetuneConfig fields changed for every run, e.g. {"steps": 800}; {} → the defaults (runs shared with 05, 07, 09)
model: str = 'default'  # 'default' (embedded CIFAR-10 ViT) or a timm ViT name
checkpoint: str = ''  # weights: '' (default model's), a local file, or 'hub'
dataset: str = 'cifar10'  # 'cifar10' or an ImageFolder root with train/ and val/
train_fraction: float = 1.0  # share of the training set to finetune on
metrics: list = ['clean', 'fgsm', 'fgsm_small', 'pgd_small', 'damagenet', 'cifar10_c']  # suite columns (Patch-Fool and CW: Table 2)
seed: int = 0  # seed of everything random
device: str = 'cpu'  # 'cpu', 'cuda', ...
threads: int = 2  # CPU threads for torch
smoke: bool = False  # tiny run for tests (written under runs/smoke/)
report: str = ''  # folder under reports/ for this run; '' → table4_eps_ablation. A named folder is written whatever the parameters (unnamed, a non-default run goes to runs/reports/<artifact>-<digest>)
commit_report: bool = False  # write into the committed reports/ folder even when the parameters differ from its meta.json (make reports and make study do)


# %%
#| notest
smoke = smoke or in_test()
eps_values, metrics, overrides = param(eps_values), param(metrics), param(overrides)
runs_root, n = '', None  # run folders: runs/finetune/ (shared by Tables 2–4 and notebook 05)
if smoke:
    import shutil; from ns_vit.data import repo_root
    runs_root = str(repo_root() / 'runs/smoke/finetune/table4'); shutil.rmtree(runs_root, ignore_errors=True)
    overrides = dict(steps=2, batch_size=16, refresh_every=2, noise_batch=16, noise_max_steps=20) | overrides
    train_fraction, eps_values = 0.002, eps_values[:2]
    metrics, n = ['clean', 'fgsm_small'], dict(clean=64, fgsm_small=24)
torch.set_num_threads(threads)
common = dict(seed=seed) | overrides
configs = {'none': FinetuneConfig(method='none', **common).validate()}
for e in eps_values:
    configs[f'ns ε={e:g}'] = FinetuneConfig(method='ns', eps=e, **common).validate()
    configs[f'random ε={e:g}'] = FinetuneConfig(method='gaussian', eps=e, **common).validate()
params = dict(asdict(configs['none']), overrides=overrides, eps_values=eps_values, model=model, checkpoint=checkpoint, dataset=dataset,
              train_fraction=train_fraction, metrics=metrics, n=n, seed=seed, device=device, smoke=smoke)
rep = report_dir(report or 'table4_eps_ablation', smoke, params=params, commit=commit_report or bool(report))
t0 = time.time()


# %%
#| notest
table, runs, results, paired = compare_methods(configs, model=model, checkpoint=checkpoint, dataset=dataset, train_fraction=train_fraction,
                                              suite=metrics, n=n, seed=seed, device=device, quiet=smoke, runs_root=runs_root,
                                              reference='none')
for e in eps_values:  # NS against random noise of the same norm, image by image
    pt = paired_tests({k: results[k] for k in (f'ns ε={e:g}', f'random ε={e:g}')}, f'random ε={e:g}')
    paired = pd.concat([paired, pt], ignore_index=True)
norms = {k: sum(r['noise_norm'] for r in rs) / len(rs) if (rs := run['logs']['rounds']) else float('nan') for k, run in runs.items()}
table = with_averages(table, results, robustness=ROBUSTNESS)  # Table 2's definitions and labels; the labels count the columns
table['mean_noise_norm'] = table.model.map(norms)
table

# %%
#| notest
vals = values_table(results).set_index('model')
cols = [c for c in vals.columns]
fig, axs = plt.subplots(1, len(cols), figsize=(3 * len(cols), 3), sharex=True)
for ax, metric in zip(axs, cols):
    for kind, style in (('ns', 'o-'), ('random', 's--')):
        ax.plot(eps_values, [vals.loc[f'{kind} ε={e:g}', metric] for e in eps_values], style, label=kind)
    ax.axhline(vals.loc['none', metric], color='gray', ls=':', label='none')
    ax.axhline(vals.loc['base', metric], color='k', ls='-', lw=0.8, label='base')
    ax.set(xscale='log', xlabel='ε', title=metric[:28])
axs[0].legend(fontsize=8); fig.tight_layout()
save_figure(fig, rep, 'table4'); plt.close(fig)
paired = with_holm(paired)  # Holm over the metrics of each (model, reference) comparison
show = paired_table(paired, digits=2)
sentences = [significance_sentence(paired, a=f'{kind} ε={e:g}', b=ref) for e in eps_values
             for kind, ref in (('ns', 'none'), ('random', 'none'), ('ns', f'random ε={e:g}'))]
(rep / 'verdict.md').write_text('\n'.join(f'- {s}' for s in sentences) + '\n'); print('\n'.join(sentences))
save_table(table, rep, 'table4'); save_table(vals.reset_index(), rep, 'table4_values')
save_table(show, rep, 'paired_tests')
write_meta(rep, params, t0, device, runs={k: str(r['run_dir']) for k, r in runs.items()})
assert all(df[df.n > 0].value.between(0, 1).all() for df in results.values()) and len(table) == 2 + 2 * len(eps_values)
agree = ((paired.ci_low > 0) | (paired.ci_high < 0)) == (paired.p_value < 0.05)
assert agree.all(), paired[~agree]  # no interval contradicts its p-value
assert (paired.ci_high > paired.ci_low)[paired.metric != 'cifar10_c'].all()  # 0/1 metrics: never zero width
assert any(c.startswith("Average (paper's") for c in table.columns) and 'note' in table.attrs
