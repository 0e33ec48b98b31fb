# %% [markdown]
# # Benchmarks
# > Where the time goes: NS finetuning against plain finetuning on identical steps, noise-synthesis steps per round,
# > the evaluation suite per column, and the ImageFolder data path that feeds a GPU. `make bench` runs this notebook.

# %% [markdown]
# Speed targets are measured here, never asserted in timed tests. The machine is whatever runs the notebook (the
# device line of `meta.json` names it); the numbers quoted in the README come from `reports/benchmarks/`.
#
# **NS vs plain.** Algorithm 1 costs, per `refresh_every` steps, one noise synthesis plus training steps on a clean and a
# noisy copy of every batch (2B images per step: NS's loss needs both passes, so about twice a plain step is the floor).
# The default synthesis is the authors' stream: every descent step draws a fresh batch of training images, measures the
# current δ on it *before* descending on it, and stops as soon as the unseen images are inside ε; each round starts from
# U(−lim, lim). The model is frozen during the descent (no parameter gradients), and each fresh batch's clean forward
# is computed once. The levers measured side by side, each on the same 80 steps (two rounds), alternating the variants
# and taking the best of `repeats` runs each, which cancels most of the noise of a shared machine:
# - `ns (stream, default)`: fresh batches of 32; when δ is inside ε on one, the same δ is confirmed on 3 more (128 unseen images);
# - `ns (stream, window stop)`: the earlier stop, on the mean of the last 4 batches of 32 (each on another δ);
# - `ns (stream, batch 128)`: the authors' batch, a whole training batch per descent step, stop on it alone;
# - `ns (stream, constant rate)`: the default without the cosine decay of the descent's rate;
# - `ns (stream, warm start)`: each round starts from 1.5 × the previous noise (an option, not the authors' loop);
# - `ns (fixed batch)`: ns_vit's earlier loop, one batch of 128 per round (with its chunking), kept as a variant.
#
# Every NS run also measures each round's noise on 512 held-out test images (Table 5's columns): its cost is reported
# apart (`heldout_s`) and is included in the wall time, as in the main job.
#

# %%
import copy, json, os, tempfile, time, warnings
from pathlib import Path
import numpy as np, pandas as pd, torch, matplotlib.pyplot as plt
from PIL import Image
from ns_vit.models import get_model, create_vit, experiment_model
from ns_vit.finetune import FinetuneConfig, NOISE_VARIANTS, noise_variant, finetune, rounds_table
from ns_vit.stats import paired_table
from ns_vit.data import load_images
from ns_vit.experiments import train_data, run_finetune, HELDOUT_SEED
from ns_vit.evaluate import evaluate, paired_tests
from ns_vit.data import image_folder
from ns_vit.training import step_batches
from ns_vit.report import report_dir, write_meta, save_table, save_figure, in_test, device_info, param

# %% [markdown]
# ## Experiment

# %% tags=["parameters"]
model: str = 'default'  # embedded model to time ('default', 'vit-ti8'); another writes reports/benchmarks/<model>
steps: int = 80  # finetuning steps per timed run (2 noise rounds at refresh_every 40)
batch_size: int = 128  # images per step
repeats: int = 2  # timed runs per variant (alternating); the best counts
semantics_check: bool = True  # finetune the default run with the authors' batch of 128 too and compare noise and metrics
suite_check: bool = True  # time the CIFAR-10 evaluation suite on the default model (cache off)
loader_images: int = 512  # JPEGs in the generated 224-px ImageFolder fixture
workers: list = [0, 2, 4]  # DataLoader workers to time
gpu_models: list = ['vit_small_patch16_224', 'vit_base_patch16_224']  # timed on cuda only (random weights, 224 px)
device: str = 'cpu'  # 'cpu' or 'cuda'
threads: int = 2  # CPU threads for torch
smoke: bool = False  # tiny run for tests (written under runs/smoke/)
report: str = ''  # folder under reports/ for this run; '' → benchmarks, benchmarks/<device> or benchmarks/<model>. A named folder is written whatever the parameters (unnamed, a non-default run goes to runs/reports/<artifact>-<digest>)
commit_report: bool = False  # write into the committed reports/ folder even when the parameters differ from its meta.json (make reports and make study do)


# %%
smoke = smoke or in_test()
workers, gpu_models = param(workers), param(gpu_models)
if smoke: steps, batch_size, repeats, semantics_check, suite_check, loader_images, workers = 4, 16, 1, False, False, 16, [0, 1]
if model != 'default': semantics_check, suite_check = False, False  # the NS/plain ratio only: the checks are the default model's
torch.set_num_threads(threads)
params = dict(model=model, steps=steps, batch_size=batch_size, repeats=repeats, semantics_check=semantics_check, suite_check=suite_check,
              loader_images=loader_images, workers=workers, device=device, threads=threads, smoke=smoke)
rep = report_dir(report or ('benchmarks' if device == 'cpu' else f'benchmarks/{device.split(":")[0]}') + ('' if model == 'default' else f'/{model}'), smoke,
                 params=params, commit=commit_report or bool(report))  # GPU runs and other models: their own folder
t0 = time.time()
base = experiment_model(model, '', device, smoke=smoke)
data = train_data('cifar10', 1.0 if not smoke else 0.01, 0)

# %% [markdown]
# ## NS / plain wall-time ratio

# %%
small = dict(refresh_every=2, noise_max_steps=10, noise_batch=16, warmup_steps=1) if smoke else {}
variants = {'none': dict(method='none'), 'ns (stream, default)': dict(method='ns'),
            'ns (stream, batch 128)': dict(method='ns', noise_batch=128, noise_stop_window=1),
            'ns (stream, window stop)': dict(NOISE_VARIANTS['window'], method='ns'),
            'ns (stream, constant rate)': dict(method='ns', noise_schedule_steps=0),
            'ns (stream, warm start)': dict(method='ns', noise_warm_start=True),
            'ns (fixed batch)': dict(NOISE_VARIANTS['fixed'], method='ns')}
heldout = load_images('cifar10', 'test', 64 if smoke else 512, HELDOUT_SEED)[0]
runs = []
for r in range(repeats):
    for name, kw in variants.items():
        cfg = FinetuneConfig(**{'steps': steps, 'batch_size': batch_size, **kw, **small})
        t = time.perf_counter(); out = finetune(copy.deepcopy(base), data, cfg, heldout=heldout if kw['method'] == 'ns' else None)
        wall, rt, sec = time.perf_counter() - t, rounds_table(out['logs']), out['logs']['seconds']
        runs.append(dict(variant=name, repeat=r, wall_s=wall, noise_s=sec['noise'], heldout_s=sec.get('heldout', 0.0), train_s=sec['train'],
                         rounds=len(rt), descent_steps_per_round=rt.steps_to_eps.mean() if len(rt) else 0.0,
                         s_per_descent_step=sec['noise'] / (rt.steps_to_eps + 1).sum() if len(rt) else float('nan'),
                         noise_norm=rt.noise_norm.mean() if len(rt) else float('nan'),
                         heldout_mse_prob=rt.heldout_mse_prob.mean() if 'heldout_mse_prob' in rt else float('nan')))
runs = pd.DataFrame(runs)
best = runs.loc[runs.groupby('variant').wall_s.idxmin()].set_index('variant').loc[list(variants)]
plain = best.loc['none', 'wall_s']
best['ratio_to_plain'] = best.wall_s / plain
best['noise_share'] = best.noise_s / best.wall_s
best['train_step_vs_plain'] = best.train_s / best.loc['none', 'train_s']
ratio = best.reset_index()[['variant', 'wall_s', 'ratio_to_plain', 'noise_s', 'noise_share', 'heldout_s', 'train_s', 'train_step_vs_plain',
                            'rounds', 'descent_steps_per_round', 's_per_descent_step', 'noise_norm', 'heldout_mse_prob']]
save_table(ratio, rep, 'ns_vs_plain'); save_table(runs, rep, 'ns_vs_plain_runs')
ratio


# %% [markdown]
# ## Semantics check: the default stream against the authors' batch on a whole run
# The full default run (400 steps, 10 rounds) with the default stream (fresh batches of 32, the stop confirmed on 128 fresh images) and with
# the authors' batch (128 per step, stop on it), from the same base, data and seeds: noise norms, descent steps and
# held-out mse_prob per round, and the two finetuned models scored on the same images with paired tests. The default run's
# folder is notebook 05's, so it is reused when 05 has run.
#

# %%
if semantics_check:
    cfgs = {'ns': FinetuneConfig(method='ns'), 'ns (batch 128)': noise_variant('reference', method='ns')}
    sem = {k: run_finetune(c, train_fraction=1.0, eval_size=500, eval_every=100, device=device) for k, c in cfgs.items()}
    per = {k: rounds_table(r['logs']).set_index('round') for k, r in sem.items()}
    metrics = ['clean', 'fgsm_small', 'pgd_small', 'fgsm']
    res = {k: evaluate(r['model'], metrics, quiet=True) for k, r in sem.items()}
    sem_paired = paired_tests(res, 'ns (batch 128)')
    sem_table = pd.DataFrame({f'{col}_{tag}': per[k][col].values for k, tag in (('ns', 'default'), ('ns (batch 128)', 'batch128'))
                              for col in ('noise_norm', 'steps_to_eps', 'heldout_mse_prob')}, index=per['ns'].index).reset_index()
    save_table(sem_table, rep, 'semantics_noise_norms'); save_table(paired_table(sem_paired), rep, 'semantics_paired_tests')
    d = per['ns'].noise_norm - per['ns (batch 128)'].noise_norm
    print(f"noise norm per round: default {per['ns'].noise_norm.mean():.1f} vs batch 128 {per['ns (batch 128)'].noise_norm.mean():.1f}; "
          f"mean difference {d.mean():+.1f} ± {1.96 * d.std(ddof=1) / np.sqrt(len(d)):.1f} (95%, {len(d)} rounds)")
    display(paired_table(sem_paired))


# %% [markdown]
# ## The evaluation suite
# The CIFAR-10 suite on the default model, every metric computed afresh (cache off; the CIFAR-10-C and transfer sets
# are built once and cached on disk — their one-off generation cost is in `reports/corruptions` and
# `reports/damagenet_cifar10`). Minutes per column, and what a full 10,000-image run of each column would cost at the
# measured rate.

# %%
if suite_check:
    ev = evaluate(base, 'cifar10', cache=False, quiet=True)
    suite_time = ev[['metric', 'label', 'n', 'seconds']].assign(minutes=lambda d: d.seconds / 60,
                                                                 minutes_at_10k=lambda d: d.seconds / d.n * 10000 / 60)
    save_table(suite_time, rep, 'suite_time')
    print(f'whole suite at its sample sizes: {suite_time.minutes.sum():.1f} min')
    display(suite_time)

# %% [markdown]
# ## ImageFolder data path
# Training and evaluation on ImageNet-style folders decode JPEGs in `DataLoader` workers (pinned memory on a GPU;
# under torchrun each rank reads its own slice of every step's batch). Images per second through the training path
# (`step_batches`) on a generated folder of 224-px-crop JPEGs, by number of workers:

# %%
with tempfile.TemporaryDirectory() as d:
    rng = np.random.default_rng(0)
    for i in range(loader_images):
        c = Path(d) / 'train' / f'c{i % 4}'; c.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(c / f'{i}.jpg', quality=90)
    ds = image_folder(Path(d) / 'train', 224)
    rows = []
    for w in workers:
        bs = min(64, loader_images)
        t = time.perf_counter(); n = 0
        with warnings.catch_warnings():  # more workers than CPUs is one of the timed settings: torch's warning against it is what the row measures
            warnings.filterwarnings('ignore', message='This DataLoader will create', category=UserWarning)
            for x, y in step_batches(ds, bs, 0, 0, loader_images // bs, num_workers=w, pin_memory=device.startswith('cuda')): n += len(x)
        rows.append(dict(workers=w, images=n, seconds=time.perf_counter() - t, images_per_s=n / (time.perf_counter() - t)))
loader = pd.DataFrame(rows)
save_table(loader, rep, 'imagefolder_loader')
loader

# %% [markdown]
# ## GPU (when `device` is cuda)
# NS vs plain step time and peak memory for ViT-S/16 and ViT-B/16 at 224 px with random weights, batch 128, with and
# without bf16 autocast; and the main job at default parameters. On a CPU this section is skipped and says so.

# %%
gpu_rows = []
if device.startswith('cuda') and torch.cuda.is_available():
    for name in gpu_models:
        m = create_vit(name, num_classes=1000).to(device)
        x, y = torch.rand(batch_size, 3, 224, 224, device=device), torch.randint(0, 1000, (batch_size,), device=device)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
        for meth in ('none', 'ns'):
            from ns_vit.finetune import method_loss
            from ns_vit.noise import embed_shape
            N, D = embed_shape(m); delta = torch.randn(1, N, D, device=device)
            cfg = FinetuneConfig(method=meth)
            for amp in (False, True):
                torch.cuda.reset_peak_memory_stats(); torch.cuda.synchronize()
                for i in range(6):
                    if i == 1: torch.cuda.synchronize(); t = time.perf_counter()
                    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
                        loss = method_loss(m, m, x, y, delta, cfg)
                    opt.zero_grad(); loss.backward(); opt.step()
                torch.cuda.synchronize()
                gpu_rows.append(dict(model=name, method=meth, bf16=amp, step_ms=(time.perf_counter() - t) / 5 * 1000,
                                     peak_gib=torch.cuda.max_memory_allocated() / 2**30, card=torch.cuda.get_device_name()))
    save_table(pd.DataFrame(gpu_rows), rep, 'gpu_steps')
else:
    print('no GPU here: the GPU section did not run (device =', device + ')')

# %%
write_meta(rep, params, t0, device, ratio_ns_to_plain=float(best.loc['ns (stream, default)', 'ratio_to_plain']),
           ratios={k: float(v) for k, v in best.ratio_to_plain.items()})
assert (ratio.wall_s > 0).all() and ratio.set_index('variant').loc['none', 'rounds'] == 0
assert (loader.images_per_s > 0).all()
print('NS / plain wall time: ' + ', '.join(f'{k} {v:.2f}×' for k, v in best.ratio_to_plain.items() if k != 'none'))

