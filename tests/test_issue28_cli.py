"""Issue 28, the command-line cases, as a user hits them: `ns-vit-finetune` and `ns-vit-evaluate` (their `main` with
argv) with the embedded default model on a 32-pixel image folder of CIFAR-10 classes.

1. `ns-vit-finetune --dataset <folder>` loaded the folder at 224 px, and the 32-px default model refused it ("Input
   height (224) doesn't match model (32)"); `ns-vit-evaluate --data val=<folder>` loaded it at 32 px but through the
   0.875 centre crop of ImageNet models, a 14% zoom. Now a folder is loaded at the model's input size, whole for a
   CIFAR-scale model: the finetune runs, and each `val` image is scored as the model scores its pixels.
2. `--checkpoint <run folder>` said "does not exist": now it is the run's model.safetensors; an unfinished run says
   so and prints the command that finishes it, and that command finishes it.
3. A plain state dict (`torch.save(model.state_dict())`, `.pth`/`.pt`, or safetensors without a card) could not be
   loaded: now it loads into the architecture `--model` names and scores as the model it was saved from; another
   architecture's is an error that lists a few keys and names `--model` (and the embedded model it matches).

The fixture's `val/` images are smooth random images filed under the class the default model predicts for their
exact pixels, so the right number is 100%, and the fixture checks that the old 0.875 crop would not give it."""
import os
import shlex

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

N_VAL = 40


def _image(rng) -> Image.Image:
    "A smooth random 32×32 RGB image (8×8 noise, upsampled): the default model predicts varied classes on these."
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((32, 32), Image.BICUBIC)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "An image folder (train/: 4 images per class; val/: N_VAL images under the default model's predictions), a private cache."
    from torchvision.transforms.functional import to_tensor
    from ns_vit.data import CIFAR10_CLASSES, image_folder
    from ns_vit.models import get_model, predict
    d, rng = tmp_path_factory.mktemp('issue28_cli'), np.random.default_rng(28)
    old = os.environ.get('NS_VIT_CACHE')
    os.environ['NS_VIT_CACHE'] = str(d / 'cache')
    for c in CIFAR10_CLASSES:
        (d / 'folder' / 'train' / c).mkdir(parents=True)
        for i in range(4): _image(rng).save(d / 'folder' / 'train' / c / f'{i}.png')
    base = get_model()
    images = [_image(rng) for _ in range(N_VAL)]
    preds = predict(base, torch.stack([to_tensor(im) for im in images])).argmax(1)
    for i, (im, p) in enumerate(zip(images, preds)):
        f = d / 'folder' / 'val' / CIFAR10_CLASSES[p] / f'{i:02d}.png'
        f.parent.mkdir(parents=True, exist_ok=True); im.save(f)
    assert len(set(preds.tolist())) >= 3, 'the fixture should span several classes'
    zoomed = image_folder(d / 'folder' / 'val', 32, 0.875)  # the old loading of a val folder for a 32-px model
    x, y = map(torch.stack, zip(*[(xi, torch.tensor(yi)) for xi, yi in zoomed]))
    assert (predict(base, x).argmax(1) == y).float().mean() < 1, 'the 0.875 crop must change some predictions'
    yield dict(root=d, folder=d / 'folder', val=d / 'folder' / 'val', base=base)
    if old is None: os.environ.pop('NS_VIT_CACHE', None)
    else: os.environ['NS_VIT_CACHE'] = old


def evaluate_cli(world, out: str, *argv: str) -> pd.Series:
    "`ns-vit-evaluate --suite clean --data val=<fixture>` with `argv`: its one row (value, n, …)."
    from ns_vit.evaluate import main
    main(['--suite', 'clean', '--data', f'val={world["val"]}', '--num-workers', '0', '--device', 'cpu',
          '--out', str(world['root'] / 'eval' / out), *argv])
    return pd.read_csv(world['root'] / 'eval' / f'{out}.csv').iloc[0]


def finetune_cli(*argv: str) -> None:
    from ns_vit.experiments import main
    main([*argv, '--device', 'cpu'])


def cli_error(main, argv: list[str], capsys) -> str:
    "The message a console entry point exits with (status 2) on `argv`, before any work."
    with pytest.raises(SystemExit) as e: main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


SMALL = ['--method', 'none', '--steps', '2', '--batch-size', '8', '--noise-batch', '8', '--warmup-steps', '1', '--train-fraction', '1']


def test_case1_folder_loads_at_the_models_size(world):
    "The default 32-px model scores every image of the folder as it scores its pixels (100%), and finetunes on it."
    row = evaluate_cli(world, 'default')
    assert (row.value, row.n) == (1.0, N_VAL)
    out = world['root'] / 'runs' / 'folder'
    finetune_cli('--dataset', str(world['folder']), *SMALL, '--eval-size', '8', '--num-workers', '0', '--out', str(out))
    assert (out / 'model.safetensors').is_file()


def test_case2_run_folder_is_a_checkpoint(world, capsys):
    "A finished run folder scores as its model.safetensors; an unfinished one names the command that finishes it, which does."
    from ns_vit.evaluate import main as evaluate_main
    from ns_vit.models import load_checkpoint, predict
    out = world['root'] / 'runs' / 'two-steps'
    finetune_cli('--dataset', str(world['folder']), *SMALL, '--eval-size', '0', '--num-workers', '0', '--out', str(out), '--stop-after', '1')
    assert not (out / 'model.safetensors').exists()
    err = ' '.join(cli_error(evaluate_main, ['--checkpoint', str(out), '--suite', 'clean'], capsys).split())
    assert f'run folder {out} holds an unfinished run: it has no model.safetensors yet (its resume state state.pt is there)' in err
    cmd = err.split('which resumes it: `')[1].split('`')[0]
    assert cmd.startswith(f'ns-vit-finetune --out {out} --dataset {world["folder"]} --train-fraction 1.0')
    finetune_cli(*shlex.split(cmd)[1:])  # the printed command, as the user runs it
    row = evaluate_cli(world, 'run-folder', '--checkpoint', str(out))
    model = load_checkpoint(out / 'model.safetensors')[0]
    x, y = _val_tensors(world)
    assert row.n == N_VAL and row.value == pytest.approx((predict(model, x).argmax(1) == y).float().mean().item())
    assert row.value == evaluate_cli(world, 'run-file', '--checkpoint', str(out / 'model.safetensors')).value


def _val_tensors(world):
    "The fixture's val images as the model sees them (their own pixels) and labels."
    from torchvision.transforms.functional import to_tensor
    from ns_vit.data import CIFAR10_CLASSES
    files = sorted(world['val'].glob('*/*.png'))
    return torch.stack([to_tensor(Image.open(f).convert('RGB')) for f in files]), torch.tensor([CIFAR10_CLASSES.index(f.parent.name) for f in files])


def test_case3_plain_state_dicts_score_as_the_default_model(world):
    "The default model's state dict, saved three ways, scores 100% on the fixture as the default model does."
    base = world['base']
    d = world['root'] / 'plain'; d.mkdir()
    torch.save(base.state_dict(), d / 'model.pth')  # the PixelViT's: mean, std, vit.*
    torch.save({f'module.{k}': v for k, v in base.vit.state_dict().items()}, d / 'ddp.pt')  # a DDP-wrapped ViT's
    save_file({k: v.contiguous() for k, v in base.vit.state_dict().items()}, str(d / 'vit.safetensors'))  # no card
    for f in ('model.pth', 'ddp.pt', 'vit.safetensors'):
        row = evaluate_cli(world, f, '--checkpoint', str(d / f))
        assert (row.value, row.n) == (1.0, N_VAL), f


def test_case3_other_architecture_is_refused(world, capsys):
    "A vit-ti8 state dict under --model default: the error lists keys and names --model vit-ti8; a missing file names the forms."
    from ns_vit.evaluate import main as evaluate_main
    from ns_vit.experiments import main as finetune_main
    from ns_vit.models import embedded_vit
    d = world['root'] / 'other'; d.mkdir()
    torch.manual_seed(0)
    torch.save(embedded_vit('vit-ti8').state_dict(), d / 'ti8.pth')
    for main, argv in ((evaluate_main, ['--suite', 'clean']), (finetune_main, ['--dataset', str(world['folder'])])):
        with pytest.raises(ValueError) as e: main(['--checkpoint', str(d / 'ti8.pth'), *argv, '--device', 'cpu'])
        msg = str(e.value)
        assert f"checkpoint {d / 'ti8.pth'} holds a ViT with patch 8, width 192, depth 12, 10 classes, but the model 'default' " \
               '(--model default) has patch 8, width 128, depth 6, 10 classes' in msg
        assert '72 unexpected keys: blocks.10.attn.proj.bias, blocks.10.attn.proj.weight, blocks.10.attn.qkv.bias and 69 more' in msg
        assert "it is a state dict of the embedded model 'vit-ti8': pass --model vit-ti8" in msg
    row = evaluate_cli(world, 'ti8', '--model', 'vit-ti8', '--checkpoint', str(d / 'ti8.pth'))  # as the message says
    assert row.n == N_VAL and 0 <= row.value <= 1
    err = ' '.join(cli_error(evaluate_main, ['--checkpoint', str(d / 'missing.pth')], capsys).split())
    assert f'checkpoint {d / "missing.pth"} does not exist: pass a finetune run folder (its model.safetensors), a .safetensors' in err
