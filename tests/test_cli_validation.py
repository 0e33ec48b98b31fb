"""Issue 17, case by case, as a user hits it: wrong input gives a clear error naming the fix, or the right number.

Everything runs on a tiny CIFAR-10-shaped image folder (50 train and 50 test images) and a tiny random ViT, with
`NS_VIT_DATA` and `NS_VIT_CACHE` pointing into a temporary folder, so the tests neither read nor touch real caches."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ARCH = 'vit_tiny_patch16_224'
ARCH_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "A CIFAR-10-shaped folder (5 images per class and split), a private cache and a tiny ns_vit checkpoint."
    from ns_vit.data import CIFAR10_CLASSES
    from ns_vit.models import create_vit, model_card, save_checkpoint
    d = tmp_path_factory.mktemp('issue17')
    rng = np.random.default_rng(0)
    for split in ('train', 'test'):
        for c in CIFAR10_CLASSES:
            (d / 'data' / 'cifar10' / split / c).mkdir(parents=True)
            for i in range(5):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / 'data' / 'cifar10' / split / c / f'{i}.png')
    old = {k: os.environ.get(k) for k in ('NS_VIT_DATA', 'NS_VIT_CACHE')}
    os.environ.update(NS_VIT_DATA=str(d / 'data'), NS_VIT_CACHE=str(d / 'cache'))
    torch.manual_seed(0)
    m = create_vit(ARCH, **ARCH_KW)
    ckpt = save_checkpoint(m, d / 'tiny.safetensors', model_card(m, ARCH, ARCH_KW))
    yield dict(root=d, ckpt=ckpt)
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


def cli_error(main, argv: list[str], capsys) -> str:
    "The message a console entry point exits with (status 2) on `argv`."
    with pytest.raises(SystemExit) as e: main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_case1_out_names_keep_their_dots(world):
    from ns_vit.evaluate import main
    out = world['root'] / 'eval'
    for eps in ('0.03', '0.01'):
        main(['--checkpoint', str(world['ckpt']), '--suite', 'clean', '--n', '20', '--out', str(out / f'ns-eps{eps}'), '--device', 'cpu'])
    assert sorted(f.name for f in out.iterdir()) == ['ns-eps0.01.csv', 'ns-eps0.01.md', 'ns-eps0.03.csv', 'ns-eps0.03.md']


def _hand_accuracy(model, split='test'):
    "Accuracy counted here from the image files themselves."
    from ns_vit.data import CIFAR10_CLASSES
    xs, ys = [], []
    for c, name in enumerate(CIFAR10_CLASSES):
        for f in sorted((Path(os.environ['NS_VIT_DATA']) / 'cifar10' / split / name).glob('*.png')):
            xs.append(torch.from_numpy(np.array(Image.open(f).convert('RGB'))).permute(2, 0, 1).float() / 255); ys.append(c)
    with torch.no_grad(): return (model(torch.stack(xs)).argmax(1) == torch.tensor(ys)).float().mean().item()


def test_case2_cache_keys_follow_content(world):
    "Changed test images, or a changed corruption generator: the evaluation cache recomputes and serves the right number."
    from ns_vit import corruptions
    from ns_vit.evaluate import evaluate
    from ns_vit.models import load_checkpoint
    model = load_checkpoint(world['ckpt'])[0]
    r1 = evaluate(model, 'clean', quiet=True).iloc[0]
    assert r1.value == pytest.approx(_hand_accuracy(model)) and not r1.cached
    assert evaluate(model, 'clean', quiet=True).iloc[0].cached  # same content: served
    f = Path(os.environ['NS_VIT_DATA']) / 'cifar10' / 'test' / 'cat' / '0.png'  # the data changes (repaired, replaced)
    Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(f)
    r2 = evaluate(model, 'clean', quiet=True).iloc[0]
    assert not r2.cached and r2.value == pytest.approx(_hand_accuracy(model))
    c1 = evaluate(model, 'cifar10_c', n=8, quiet=True).iloc[0]
    table = dict(corruptions.TABLES['cifar10'])
    try:  # the generator changes one corruption's parameters: that corruption is regenerated, the result recomputed
        corruptions.TABLES['cifar10']['contrast'] = (.05, .04, .03, .02, .01)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            c2 = evaluate(model, 'cifar10_c', n=8, quiet=True).iloc[0]
            cs = corruptions.cifar10_c(8, 0)
        per = corruptions.corruption_accuracy(model, cs, per_image=True)[1]
        assert not c2.cached and c2.value == pytest.approx(corruptions.mean_corruption_accuracy(per)['accuracy'])
        assert c1.cached is not None
    finally: corruptions.TABLES['cifar10'].update(table)


def test_case3_integrity(world, capsys):
    "A bit flipped inside an evaluation-cache entry is recomputed; one flipped inside the weights is refused, naming the file."
    from ns_vit.cache import CacheWarning
    from ns_vit.evaluate import evaluate, main
    from ns_vit.models import load_checkpoint
    model = load_checkpoint(world['ckpt'])[0]
    right = evaluate(model, 'clean', n=30, quiet=True).iloc[0].value
    for entry in (world['root'] / 'cache' / 'eval').glob('*.pt'):
        b = bytearray(entry.read_bytes()); b[-40] ^= 0x10; entry.write_bytes(bytes(b))
    with pytest.warns(CacheWarning, match='sha256'):
        r = evaluate(model, 'clean', n=30, quiet=True).iloc[0]
    assert not r.cached and r.value == right
    bad = world['root'] / 'flipped.safetensors'
    b = bytearray(world['ckpt'].read_bytes()); b[-3] ^= 0x40; bad.write_bytes(bytes(b))  # the header stays intact
    with pytest.raises(ValueError, match=f'checkpoint {bad} is corrupt: its weights do not match'):
        main(['--checkpoint', str(bad), '--suite', 'clean', '--n', '5', '--out', str(world['root'] / 'x'), '--device', 'cpu'])


def finetune_args(world, out: Path, **extra) -> list[str]:
    a = ['--checkpoint', str(world['ckpt']), '--out', str(out), '--steps', '3', '--batch-size', '16', '--refresh-every', '5',
         '--train-fraction', '1.0', '--noise-max-steps', '3', '--noise-batch', '16', '--eval-size', '0', '--heldout-size', '16',
         '--lr', '1e-3', '--warmup-steps', '1', '--device', 'cpu']
    for k, v in extra.items(): a += [f'--{k.replace("_", "-")}', str(v)]
    return a


def test_case4_and_8_resume_checks_configuration(world):
    "--stop-after claims the folder (run.json, lock); another --lr is refused; a run shorter than refresh_every saves its state."
    from ns_vit.experiments import main
    out = world['root'] / 'run'
    main(finetune_args(world, out, stop_after=2))
    assert json.loads((out / 'run.json').read_text())['config']['lr'] == 1e-3 and (out / '.lock').exists()
    assert torch.load(out / 'state.pt', weights_only=True)['step'] == 2  # 2 < refresh_every: saved anyway
    with pytest.raises(ValueError, match=r'other parameters \(config.lr: 0.001 → 0.002'):
        main(finetune_args(world, out, lr='2e-3'))
    orphan = out / f'.state.pt.{__import__("ns_vit.training").training._HOST}-999999999.abcd1234.tmp'
    orphan.write_bytes(b'half')
    umask = os.umask(0o022)
    try: main(finetune_args(world, out))  # resume to the end
    finally: os.umask(umask)
    assert not orphan.exists() and (out / 'model.safetensors').exists()
    assert not (out / 'state.pt').exists()  # finished: the resume state is removed, the run is reused from its model
    assert oct((out / 'model.safetensors').stat().st_mode & 0o777) == '0o644'
    card = json.loads((out / 'model.json').read_text())
    assert card['finetune']['lr'] == 1e-3 and len(card['weights_sha256']) == 64


def test_case5_silent_acceptance_is_gone(world, capsys):
    from ns_vit import evaluate, experiments
    assert 'must be >= 1, got -5' in cli_error(evaluate.main, ['--n', '-5'], capsys)
    assert 'must be >= 1, got 0' in cli_error(evaluate.main, ['--n', '0'], capsys)
    msg = cli_error(evaluate.main, ['--data', f'cifar101={world["root"]}'], capsys)
    assert "unknown data keys ['cifar101']" in msg and "'cifar10_1'" in msg
    assert "expected true, false, 1 or 0, got 'ture'" in cli_error(experiments.main, ['--augment', 'ture'], capsys)
    assert 'must be a finite number, got inf' in cli_error(experiments.main, ['--eps', 'inf'], capsys)
    assert 'eps must be > 0' in cli_error(experiments.main, ['--eps', '0'], capsys)


def test_case6_truncated_files_are_named_and_repaired(world):
    "A truncated decoded-CIFAR cache is reported and decoded again; a truncated state.pt is set aside and the run restarts."
    from ns_vit.cache import CacheWarning
    from ns_vit.data import cifar10
    from ns_vit.experiments import check_state
    from ns_vit.finetune import FinetuneConfig
    good = cifar10('test').images.clone()
    entry = max((world['root'] / 'cache').glob('cifar10-test-folder-*.pt'), key=lambda f: f.stat().st_mtime_ns)  # the current one
    entry.write_bytes(entry.read_bytes()[:1000])
    with pytest.warns(CacheWarning, match=f'{entry} is truncated'):
        assert torch.equal(cifar10('test').images, good)
    run = world['root'] / 'truncated'; run.mkdir()
    (run / 'state.pt').write_bytes(b'PK\x03\x04 half a torch zip')
    with pytest.warns(UserWarning, match='state.pt is unreadable .*starts over'):
        check_state(run, FinetuneConfig())
    assert not (run / 'state.pt').exists() and len(list(run.glob('state.pt.unreadable-*'))) == 1


def test_case7_late_or_unclear_errors(world, capsys):
    from ns_vit import evaluate, experiments
    from ns_vit.finetune import FinetuneConfig
    out = world['root'] / 'one'
    evaluate.main(['--checkpoint', str(world['ckpt']), '--suite', 'clean', '--n', '10', '--out', str(out), '--device', 'cpu'])
    assert list(__import__('pandas').read_csv(out.with_name('one.csv')).metric) == ['clean']  # one metric is a suite
    assert "unknown suite 'cleen'" in cli_error(evaluate.main, ['--suite', 'cleen'], capsys)
    assert "unknown metrics ['cleen']" in cli_error(evaluate.main, ['--suite', 'clean,cleen'], capsys)
    with pytest.raises(ValueError, match=f'checkpoint {world["ckpt"]} holds a ViT with patch 8, width 32, depth 1, 10 classes, '
                                         f'but the model {ARCH} has patch 16, width 192, depth 12, 1000 classes'):
        evaluate.main(['--model', ARCH, '--checkpoint', str(world['ckpt']), '--suite', 'clean', '--n', '5', '--device', 'cpu'])
    with pytest.raises(TypeError, match="eps must be a float, got '0.03'"):  # papermill -r eps 0.03 gives a string
        FinetuneConfig(eps='0.03').validate()
    assert 'lr must be > 0' in cli_error(experiments.main, ['--lr', '-1e-4'], capsys)  # no "expected one argument"


def test_case7_notebook09_checks_suite_before_finetuning(tmp_path):
    "Notebook 09 has `report` and `runs_root` parameters and rejects a misspelt suite before any finetuning."
    cells = json.loads((ROOT / 'nbs' / '09_table2_robustness.ipynb').read_text())['cells']
    params = ''.join(next(c for c in cells if 'parameters' in c.get('metadata', {}).get('tags', []))['source'])
    assert 'report: str = ' in params and 'runs_root: str = ' in params
    r = subprocess.run([sys.executable, '-m', 'papermill', 'nbs/09_table2_robustness.ipynb', str(tmp_path / 'o.ipynb'),
                        '-p', 'suite', 'cleen', '-p', 'report', 'never_written', '--cwd', str(ROOT)],
                       cwd=ROOT, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != 'IN_TEST'})
    assert r.returncode != 0 and "unknown suite 'cleen'" in r.stderr, r.stderr[-2000:]
    assert not (ROOT / 'reports' / 'never_written').exists()


def test_issue16_imagenet_c_column_by_hand(world, tmp_path):
    "`--suite imagenet` on an ImageNet-C-layout fixture: the mean accuracy, its t-interval over images and the mCE by hand."
    from scipy import stats
    from ns_vit.corruptions import ALEXNET_ERR, CORRUPTIONS
    from ns_vit.evaluate import main
    from ns_vit.models import create_vit, load_checkpoint, model_card, save_checkpoint
    kw = {**ARCH_KW, 'num_classes': 1000}  # the ImageNet suite scores ImageNet-1k models (evaluate checks the head)
    torch.manual_seed(0)
    m = create_vit(ARCH, **kw)
    ckpt = save_checkpoint(m, tmp_path / 'tiny_in1k.safetensors', model_card(m, ARCH, kw))
    rng, wnids = np.random.default_rng(1), ('n01440764', 'n01443537')
    for c in CORRUPTIONS:
        for s in range(1, 6):
            for w in wnids:
                (tmp_path / 'inc' / c / str(s) / w).mkdir(parents=True)
                for f in ('a', 'b'): Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / 'inc' / c / str(s) / w / f'{f}.JPEG')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # "2 class folders, not 1000"
        main(['--checkpoint', str(ckpt), '--suite', 'imagenet', '--data', f'imagenet_c={tmp_path / "inc"}',
              '--num-workers', '0', '--out', str(tmp_path / 'inet'), '--device', 'cpu'])
    df = __import__('pandas').read_csv(tmp_path / 'inet.csv').set_index('metric')
    model = load_checkpoint(ckpt)[0]
    ok = np.zeros((75, 4))  # cells × images, images in ImageFolder order (class folder, then name)
    for i, (c, s) in enumerate((c, s) for c in CORRUPTIONS for s in range(1, 6)):
        x = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / 'inc' / c / str(s) / w / f'{f}.JPEG'))).permute(2, 0, 1).float() / 255
                         for w in wnids for f in ('a', 'b')])
        with torch.no_grad(): ok[i] = (model(x).argmax(1) == torch.tensor([0, 0, 1, 1])).numpy()
    share = ok.mean(0)  # per image: the share of the 75 cells it survives
    half = stats.t.ppf(0.975, 3) * share.std(ddof=1) / 2 if share.std() > 0 else 0.0
    err = 1 - ok.reshape(15, 5, 4).mean((1, 2))  # per corruption: error over severities and images
    row = df.loc['imagenet_c']
    assert row.n == 4 and row.label == 'ImageNet-C mean acc'
    assert row.value == pytest.approx(share.mean())
    assert row.ci_low == pytest.approx(max(0, share.mean() - half)) and row.ci_high == pytest.approx(min(1, share.mean() + half))
    assert row.mce == pytest.approx(np.mean([e / ALEXNET_ERR[c] for e, c in zip(err, CORRUPTIONS)]))
    assert 'mCE' in (tmp_path / 'inet.md').read_text() and df.loc['a', 'n'] == 0  # sets not passed: "no data" rows
