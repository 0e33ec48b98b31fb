"""Issue 28, the cases of branch issue-28, as a user hits them: a clear error naming the fix, the right number, or a
message and a time limit instead of a hang.

Cases and where each is tested:
- `evaluate(load_default_model().vit, 'clean', n=500)`: a bare timm ViT scored 28.4% instead of 72.2% -> TypeError
  naming `PixelViT(vit, mean, std)` and `create_vit` (here; the checks themselves: nbs/01d_checks.ipynb).
- a 100-class checkpoint scored on CIFAR-10 without a word -> ValueError naming both class counts (here).
- uint8 / 0-255 / already-normalised / channels-last / empty / NaN images -> `check_images` errors naming the fix
  (nbs/01d_checks.ipynb); at the entry of `eps_noise` (0-255 images reported a noise inside eps after 0 steps; one NaN
  pixel gave an all-NaN delta; an empty batch a zero delta), `noise_influence` and `accuracy` (here).
- ImageFolder labels were sorted folder positions: cat/ + dog/ scored 1.5%, two extra class folders 55.8% -> labels by
  CIFAR-10 name / ImageNet wnid, unknown class folders refused by name (nbs/00_data.ipynb).
- a partial CIFAR-10 (5 empty test-class folders, an archive repacked from them) and a 1-bit flip in the archive ->
  errors naming the file and the fix (nbs/00_data.ipynb).
- a second evaluation waited forever, silently, behind a suspended one holding a cache lock -> it says what it waits for
  and for which pid (stopped, resume with kill -CONT), and gives up after NS_VIT_LOCK_TIMEOUT (nbs/01b_training.ipynb).
- a read-only cache could not even be read (the lock file came first) -> entries are read without a lock; a value whose
  entry cannot be written (read-only, full disk) is returned with a warning naming the path (nbs/01c_cache.ipynb).
- `damagenet.train_surrogate` failed with NameError (hashlib) when called without a state path, as the "surrogate
  weights not found" error tells users to -> runs (nbs/06d_damagenet.ipynb); pyflakes runs in .ci/run (`make lint`).
- `ns-vit-finetune --dataset <ImageFolder>` loaded 224-px images, so the 32-px default model failed ("Input height (224)
  doesn't match model (32)"), and a `val` folder was scored through ImageNet's 0.875 centre crop (75% instead of 100% on
  the fixture) -> a folder is loaded at the model's input size (`loader_size`), whole below 224 px; in the finetune CLI,
  the evaluate CLI and notebooks 04a, 04b, 05, 07, 09, 11 (tests/test_issue28_cli.py case 1; nbs/01_models.ipynb,
  nbs/05a_experiments.ipynb, nbs/06_evaluate.ipynb).
- `--checkpoint <run folder>` "does not exist" -> the run's model.safetensors; an unfinished run is an error that prints
  the command that finishes it, and that command does (tests/test_issue28_cli.py case 2; nbs/05a_experiments.ipynb).
- a plain state dict (.pth/.pt, safetensors without a card) could not be loaded from the command line -> it loads into
  the architecture `--model` names (the PixelViT's, its ViT's, DDP's `module.`) and scores as the default model does;
  another architecture's is an error listing a few keys, naming `--model` and the embedded model it matches; a missing
  file names the accepted forms (tests/test_issue28_cli.py case 3; nbs/01_models.ipynb).
- `evaluate` left a model in eval mode, and Patch-Fool did not restore the mode when an error ended it -> every
  temporary eval mode is `models.eval_mode`, restored in `finally` (here; the context manager: nbs/01_models.ipynb).
"""
import pytest
import torch

ARCH = 'vit_tiny_patch16_224'
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def test_evaluate_refuses_bare_vit():
    "The embedded default's bare ViT is refused before any image is loaded, naming the wrapper."
    from ns_vit.evaluate import evaluate
    from ns_vit.models import load_default_model
    with pytest.raises(TypeError, match=r'Wrap it as PixelViT\(vit, mean, std\)'):
        evaluate(load_default_model().vit, 'clean', n=500, quiet=True)


def test_evaluate_refuses_other_class_count():
    "A 100-class model is refused on the CIFAR-10 suite, and a 10-class one on the ImageNet suite."
    from ns_vit.evaluate import evaluate
    from ns_vit.models import create_vit
    torch.manual_seed(0)
    with pytest.raises(ValueError, match='the model predicts 100 classes but CIFAR-10 has 10'):
        evaluate(create_vit(ARCH, num_classes=100, **TINY), 'clean', n=5, quiet=True)
    with pytest.raises(ValueError, match='the model predicts 10 classes but ImageNet has 1000'):
        evaluate(create_vit(ARCH, num_classes=10, **TINY), 'imagenet', quiet=True)


def test_evaluate_and_attacks_restore_the_callers_mode(tmp_path, monkeypatch):
    "A model in train mode comes back in train mode from `evaluate` and the attacks, also when an error ends them (issue 28)."
    from ns_vit.attacks import patch_fool, run_attack
    from ns_vit.evaluate import evaluate
    from ns_vit.models import create_vit
    monkeypatch.setenv('NS_VIT_CACHE', str(tmp_path))
    torch.manual_seed(0)
    m = create_vit(ARCH, num_classes=10, **TINY).train()
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    assert evaluate(m, 'clean', n=8, cache=False, quiet=True).n.tolist() == [8] and m.training
    assert run_attack(m, x, y, 'pgd', eps=1 / 255, steps=2)['label'] and m.training
    def boom(*_): raise RuntimeError('raised inside the forward')
    hook = m.vit.head.register_forward_hook(boom)
    try:
        for call in (lambda: evaluate(m, 'clean', n=8, cache=False, quiet=True),
                     lambda: run_attack(m, x, y, 'pgd', eps=1 / 255, steps=2),
                     lambda: patch_fool(m, x, y, steps=2)):
            with pytest.raises(RuntimeError, match='raised inside the forward'): call()
            assert all(k.training for k in m.modules())
    finally: hook.remove()


@pytest.mark.parametrize('bad, message', [
    (lambda x: x * 255, 'divide by 255'),                         # 0-255 pixel values as floats
    (lambda x: (x * 255).to(torch.uint8), 'divide by 255'),       # uint8 images
    (lambda x: (x - 0.5) / 0.25, 'already normalised'),           # normalised twice
    (lambda x: x.permute(0, 2, 3, 1), 'channels-last'),           # B x H x W x C
    (lambda x: x[:0], 'empty'),                                   # no images
    (lambda x: x.index_put_((torch.tensor([1]),), torch.tensor(float('nan'))), 'NaN'),  # one NaN image
])
def test_entry_points_refuse_bad_images(bad, message):
    "eps_noise, noise_influence and accuracy refuse each bad batch at once, naming the fix, as a user calling them from Python."
    from ns_vit.models import create_vit, accuracy
    from ns_vit.noise import eps_noise, noise_influence
    torch.manual_seed(0)
    model = create_vit(ARCH, num_classes=10, **TINY)
    x = bad(torch.rand(4, 3, 32, 32))
    with pytest.raises((TypeError, ValueError), match=message): eps_noise(model, x, eps=0.03, max_steps=3)
    with pytest.raises((TypeError, ValueError), match=message): noise_influence(model, x, None)
    with pytest.raises((TypeError, ValueError), match=message): accuracy(model, x, torch.zeros(len(x), dtype=torch.long))
