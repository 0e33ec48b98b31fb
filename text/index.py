# %% [markdown]
# # ns_vit
# > Approximate nullspace augmented finetuning for robust vision transformers: the method re-implemented, the claim tested.
#
# Liu et al. (*Approximate Nullspace Augmented Finetuning for Robust Vision Transformers*) claim that finetuning a
# vision transformer on noise from the approximate nullspace of its patch embeddings (noise that barely changes its
# output) makes it more robust to adversarial attacks and distribution shift. ns_vit re-implements their method notebook
# by notebook and tests the claim against controls, over seeds, with 95% intervals and paired tests.

# %%
#| echo: false
from pathlib import Path
from IPython.display import Markdown
from ns_vit.data import repo_root
from ns_vit.report import HEADLINE
headline = repo_root() / HEADLINE
Markdown('## What we found\n\n' + (
    'The reproduction study finetunes the embedded CIFAR-10 ViT with NS, with plain finetuning and with norm-matched '
    'Gaussian noise (same base, data and schedule; several seeds) and scores every model on the same test images. '
    f'Its headline (`{HEADLINE}`, generated):\n\n' + '\n'.join('> ' + l for l in headline.read_text().strip().splitlines())
    if headline.exists() else f'*Not generated yet:* `{HEADLINE}` is written by `make study` (hours on 2 CPU cores).') +
    '\n\nThe verdict, the paired tests and the mechanism: [the study](reports/reproduction/) (`verdict.md`, `paired.md`; '
    'its site page is `reports/reproduction/index.html` in `_site/` after `make docs`).')

# %% [markdown]
# ## Set up and test (two commands)
#
# ```sh
# make install   # .venv/ with the pinned dependencies (constraints.txt) and ns_vit in editable mode
# make test      # the unit tests inside the notebooks + every experiment notebook through papermill (smoke size)
# ```
#
# Then `source .venv/bin/activate` in each new shell. Without internet, set `NS_VIT_DATA` to the folder holding
# `cifar10-jpeg.tar.gz`. Conda instead of `make install`: `conda env create -f environment.yml`. `make help` lists every
# other command.
#
# ## The main job: NS finetuning beside its control
#
# ```sh
# papermill nbs/05_finetune.ipynb -p eps 0.03   # NS (ε = 0.03) and plain finetuning of the default ViT, in minutes on a CPU
# ```
#
# It finetunes the embedded CIFAR-10 ViT with Algorithm 1 and, with the same steps, data and schedule, without the noise
# (the control); scores base, NS and control on the same test images (clean, FGSM, PGD); and writes
# `reports/finetune/ns-eps0.03/`: `summary.md` (accuracy with 95% intervals), `paired_tests.md` (which differences are
# real), `conclusion.md`, Figure 4 and Table 5. One model from the shell: `ns-vit-finetune --method ns --eps 0.03`
# prints the path of the finetuned model, `ns-vit-evaluate --checkpoint <that path> --suite quick` scores it, and
# `--help` explains every option of both.

# %%
#| echo: false
import pandas as pd
rep = repo_root() / 'reports/finetune/ns-eps0.03'
Markdown(f'What it wrote at the committed default (one seed; `reports/finetune/ns-eps0.03/`):\n\n'
         + pd.read_csv(rep / 'summary.csv').drop(columns='average (robustness)', errors='ignore').to_markdown(index=False)
         + '\n\n' + (rep / 'conclusion.md').read_text().strip()
         if (rep / 'summary.csv').exists() else '*Not generated yet:* run the command above.')

# %%
#| echo: false
from ns_vit.evaluate import suite_metrics
from ns_vit.report import arms_table, artifacts_table
def short_label(name: str, settings: dict) -> str:
    "'FGSM 1/255' from a metric's settings; the shifted and transfer sets by name."
    if 'eps' in settings: return f"{settings['attack'].upper()} {settings['eps'] * 255:g}/255"
    return {'damagenet': 'DamageNet-style', 'cifar10_c': 'CIFAR-10-C'}.get(name, name)
metrics = {k: short_label(k, m.settings) for k, m in suite_metrics('cifar10').items()
           if k in ('clean', 'fgsm_small', 'pgd_small', 'damagenet', 'cifar10_c')}
arms = {'none': 'plain finetuning', 'gaussian': 'Gaussian noise, norm-matched', 'ns': 'NS (Algorithm 1)', 'ns-fixed': 'NS, fixed-batch noise'}
csv = repo_root() / 'reports/reproduction/arms.csv'
Markdown('## Results\n\nAccuracy (%) per arm, the default cell of the reproduction study (`reports/reproduction/arms.csv`), '
         "with 95% t-intervals over the seeds (training randomness: each seed's accuracy on the same test images; the "
         "comparisons above also count the images):\n\n" + (arms_table(csv, arms, metrics, cell='default') if csv.exists() else
         '*Not generated yet:* `make study`.') + '\n\nThe full tables: [the study](reports/reproduction/), '
         '[Table 2](reports/table2_robustness/) (also Patch-Fool, CW, FGSM and PGD at 8/255), [Table 3](reports/table3_robustness/) (PGD-AT and TRADES beside NS; the sentence under it says at which training budget), and every '
         "artifact of the paper below; `make docs` builds them into a site (`_site/index.html`), one page each.\n\n"
         + artifacts_table('reports/'))

# %% [markdown]
# ## Layout
#
# | path | what |
# |---|---|
# | `nbs/` | the source of truth: numbered notebooks, each a library module plus its tests and an experiment |
# | `ns_vit/` | the package, generated from `nbs/` by `nbdev_export` (never edited by hand) |
# | `data/` | the embedded default model (`default_vit.safetensors` + its card `default_vit.json`); data caches |
# | `reports/` | figures and tables, each regenerated by the make target of its notebook (`make reports`, `adv-sweep`, `study`, `bench`, `pretrain`); the index `reports/README.md` says which |
# | `runs/` | run folders (finetuned weights, logs, resumable states); not committed |
# | `tests/` | papermill smoke runs of every experiment notebook; kill-and-resume, torchrun, streamed-noise DDP, command-line validation and help, README and `make help` checks |
# | `text/` | jupytext text pairs of the notebooks for reviews and diffs (`make pairs`; `make check-pairs` in CI) |
# | `docs/`, `tools/` | the static site (`make docs`, `make docs-check`) |
#
# | notebook | module / artifact |
# |---|---|
# | `00_data` | `ns_vit.data`: CIFAR-10 offline, ImageFolder in pixel space, batch augmentation |
# | `00a_report` | `ns_vit.report`: artifact folders, `meta.json`, tables and figures |
# | `01_models` | `ns_vit.models`: timm ViTs taking [0, 1] pixels, safe checkpoint loading, the default model |
# | `02_pretrain` | `ns_vit.pretrain`: trains the embedded default model |
# | `03_nullspace` | `ns_vit.nullspace`: exact nullspace of the patch embedding; Table 1, Figure 2 |
# | `04_noise` | `ns_vit.noise`: approximate and ε-approximate nullspace noise |
# | `04a_fig3_approx_nullspace`, `04b_fig5_closure` | Figure 3; Figure 5 (closure, App. D) |
# | `05_finetune` | `ns_vit.finetune`: Algorithm 1 (the authors' streamed noise; the fixed-batch variant) and baselines; Figure 4, Table 5 with every round's held-out noise influence |
# | `05a_experiments` | `ns_vit.experiments`: run folders, `run_finetune`, `compare_methods`, `ns-vit-finetune` |
# | `00b_stats` | `ns_vit.stats`: Wilson intervals, McNemar's paired test, arms over seeds × images, Holm's correction, paired tables and sentences |
# | `00c_progress` | `ns_vit.progress`: tqdm bars for a person at a terminal or in Jupyter, off under tests and papermill |
# | `01a_attention`, `01b_training`, `01c_cache`, `01d_checks` | `ns_vit.attention` (attention maps by hooks), `ns_vit.training` (atomic writes, schedule, seeds, run folders, step batches), `ns_vit.cache` (content-keyed, self-checking cache entries), `ns_vit.checks` (images and models checked where they enter, with the fix in the message) |
# | `06_evaluate` | `ns_vit.evaluate`: `evaluate(model, suite)` — the §5 suite with intervals, paired tests; `ns-vit-evaluate` |
# | `06a_attacks`, `06b_corruptions`, `06c_shifts`, `06d_damagenet` | FGSM/PGD/CW/CW∞/AutoAttack and Patch-Fool; CIFAR-10-C with CIFAR's parameters, ImageNet-C, mCE; the shifted-set loaders; the DamageNet-style transfer set (surrogate, attack, cached set) |
# | `07_table3_robustness`, `08_table4_eps_ablation`, `09_table2_robustness` | Tables 3, 4 and 2 |
# | `10_blend`, `10a_explain`, `10b_fingerprint` | `ns_vit.applications` (watermark, look-alike images; Figs 6–7), `ns_vit.explain` (saliency; Figs 8–10), `ns_vit.fingerprint` (§6) |
# | `11_reproduction` | the reproduction study: `none` / `gaussian` / `ns` / `ns-fixed` over seeds, intervals over seeds × images, Holm, the mechanism, the verdict in plain words (`make study`: 5 seeds, the dose cells and the authors' settings) |
# | `12_benchmarks` | `make bench`: NS/plain time ratio, suite minutes, data-loader throughput |

# %% [markdown]
# ## Public API
# The functions a user calls, module by module (the notebook of each module documents and tests them; the table is
# generated from the modules, so every name in it exists):

# %%
#| echo: false
from IPython.display import Markdown
from ns_vit.report import api_table
Markdown(api_table({
    'data': [('cifar10', 'CIFAR-10 offline as a dataset of [0, 1] images'), ('load_images', 'a seeded sample of test images and labels'),
             ('image_folder', 'an ImageFolder (ImageNet layout) in pixel space; wnid folders keep ImageNet-1k labels')],
    'models': [('create_vit', 'a timm ViT that takes [0, 1] images, from timm or a local checkpoint'),
               ('load_default_model', 'the embedded CIFAR-10 ViT'), ('get_model', 'either, by name, on a device')],
    'noise': [('embedding_noise', 'context manager: add noise δ to the patch embeddings'),
              ('eps_noise', 'noise on the boundary of the ε-approximate nullspace (§3.3)'),
              ('noise_influence', "how much a noise changes the model's predictions")],
    'nullspace': [('patch_embed_nullspace', "basis of the patch embedding's exact nullspace (§3.1)"),
                  ('null_dims', 'its dimension (Table 1)'), ('nullspace_noise', 'images in the nullspace: invisible to the model'),
                  ('null_spectrum', 'which coloured DCT patterns of a patch the nullspace holds (Fig. 7)')],
    'finetune': [('FinetuneConfig', 'the typed, validated settings of one finetuning run'), ('noise_variant', "the 'stream' or 'fixed' noise loop"),
                 ('finetune', 'Algorithm 1 (and the baselines) on a model and data'), ('synthesize_round', "one round's ε-noise")],
    'experiments': [('run_finetune', 'finetune into a resumable run folder, reused when finished'),
                    ('compare_methods', 'finetune several configs and score them on the same images'),
                    ('ns-vit-finetune', 'the same from the shell, alone or under torchrun')],
    'evaluate': [('evaluate', 'a model on a robustness suite: value, n and 95% interval per metric'),
                 ('evaluate_models', 'several models on the same images, with paired tests'), ('paired_tests', 'model − reference per metric, image by image'),
                 ('ns-vit-evaluate', 'score one model from the shell')],
    'attacks': [('run_attack', 'one attack on a batch: per-image outcome, accuracy, settings'),
                ('ATTACK_PRESETS', "the paper's budgets (and discriminative ones) by dataset and column")],
    'shifts': [('load_shift', 'a shifted test set (ImageNet-A/R/V2/Sketch/Stylized, DamageNet, CIFAR-10.1, …) by name'),
               ('shift_accuracy', 'top-1 accuracy on it, over its own label space'),
               ('preprocessing_scores', "clean accuracy under timm's, the paper's and a mismatched preprocessing")],
    'stats': [('seeds_images_diff', 'difference of two arms over seeds and images, with its interval'),
              ('paired_table', 'paired differences for display, Holm-marked'), ('significance_sentence', 'the sentence a report needs, from that table'),
              ('holm', "Holm's adjusted p-values"), ('forest_plot', 'paired differences as a figure')],
    'applications': [('nullspace_blend', 'the image nearest a target with the same model output (Fig. 7)'),
                     ('watermark', "emboss a mark that does not change the model's output (Fig. 6)")],
    'explain': [('saliency', 'saliency maps by method (Figs. 8–10)')],
    'fingerprint': [('fingerprint', "a model's patch-embedding nullspace as its fingerprint (§6)"), ('compare', 'distance and match of two fingerprints'),
                    ('blackbox_check', 'test a suspect model with the owner\'s nullspace noise')],
    'report': [('report_dir', "an artifact's folder under reports/"), ('write_meta', 'the meta.json that says how it was made')],
}))

# %% [markdown]
# ## From Python
#
# ```python
# from ns_vit.models import create_vit
# from ns_vit.noise import eps_noise
# model = create_vit('vit_small_patch16_224', pretrained='vit_s16.safetensors')  # takes [0, 1] images
# delta, info = eps_noise(model, images, eps=0.03)                              # (1, N, D) noise, info['norm']
# ```

# %% [markdown]
# ## More experiments
#
# Every experiment notebook has a papermill `parameters` cell whose defaults are the embedded default run (the small
# CIFAR-10 ViT on CPU). Run from the repo root; the notebook writes its own artifacts under `reports/<artifact>/`:
#
# ```sh
# source .venv/bin/activate
# papermill nbs/09_table2_robustness.ipynb out.ipynb      # Table 2: base, none, gaussian, ns (07: Table 3, madry and trades)
# ns-vit-evaluate --suite quick --out runs/eval/base      # score the default model (clean, FGSM, PGD at 1/255)
# ns-vit-evaluate --checkpoint runs/finetune/<run>/model.safetensors --suite cifar10 --out runs/eval/ns
# make reports                                            # every figure and table at default parameters (not Table 3 or the study)
# make adv-sweep                                          # Table 3: Madry and TRADES at a swept budget beside NS (under an hour on 2 cores)
# make study                                              # the reproduction study, 5 seeds per arm (hours on 2 CPU cores) -> reports/reproduction
# git add reports/ledger                                  # run records of the study and of Table 3's sweep: a new machine rebuilds both from them
# make docs                                               # the site in _site/, from the executed notebooks in reports/notebooks/
# make bench                                              # timings into reports/benchmarks/
# ```
#
# `evaluate(model, suite='cifar10')` returns a tidy table (metric, value, n, 95% interval, settings) and caches every
# result by the model's weights, so re-running a table only computes what changed; `evaluate_models` adds the paired
# tests that say which differences between models are real.
#
# ## ImageNet-scale settings
#
# The paper's settings are parameters of the same notebooks: a timm ViT name, its weights (`hub` for timm's
# pretrained weights, or a local `.safetensors` / `.pth` file, including easyrobust's layout) and an ImageFolder root
# with `train/` and `val/` (here `$IMAGENET`; the shifted sets beside it); run them on a GPU:
#
# ```sh
# IMAGENET=path/to/imagenet   # holds train/ and val/
# papermill nbs/05_finetune.ipynb -p model vit_small_patch16_224 -p checkpoint hub \
#     -p dataset $IMAGENET -p train_fraction 0.1 -p device cuda -p overrides '{"steps": 1000}'
# torchrun --nproc_per_node 4 -m ns_vit.experiments --model vit_base_patch16_224 --checkpoint hub \
#     --dataset $IMAGENET --train-fraction 0.1 --device cuda
# ns-vit-evaluate --model vit_small_patch16_224 --checkpoint hub --suite imagenet --device cuda \
#     --data val=$IMAGENET/val a=path/to/imagenet-a r=path/to/imagenet-r v2=path/to/imagenetv2-matched-frequency \
#            sketch=path/to/imagenet-sketch stylized=path/to/stylized-imagenet damagenet=path/to/DAmageNet imagenet_c=path/to/imagenet-c
# ```
#
# ImageFolder data is decoded by `DataLoader` workers (pinned memory on a GPU; each torchrun rank reads its slice of
# every batch). `ns_vit.shifts.SHIFTS` says where to get each shifted set and the layout its loader expects.

# %% [markdown]
# ## The embedded default model

# %%
#| echo: false
import json
card = json.loads((repo_root() / 'data' / 'default_vit.json').read_text())
Markdown(f"A timm `{card['arch']}` for 32×32 CIFAR-10 ({card['params']:,} parameters; "
         + ', '.join(f'{k}={v}' for k, v in card['arch_kwargs'].items() if k in ('patch_size', 'embed_dim', 'depth', 'num_heads'))
         + f"), trained from scratch by `nbs/02_pretrain.ipynb`: {card['metrics']['test_acc']:.2%} CIFAR-10 test accuracy on "
         f"{card['metrics']['test_images']:,} images. Its card, `data/default_vit.json`, records the command that made it and "
         "its recipe (" + ', '.join(f'{k} {v}' for k, v in card['recipe'].items()) + '); `make pretrain` retrains it (35–60 min on 2 CPU cores).')

# %% [markdown]
# ## Every command: `make help`
#
# `make help` lists every target of the Makefile with what it does: the tests (`make test`, `nbtest`, `pytest`), the
# reports (`make reports`, `make adv-sweep`, `make study`, `make bench`), the site (`make docs`), this README (`make readme`) and the
# checks CI runs (`make check-sync`, `make check-pairs`).
