# %% [markdown]
# # Input checks
# > What every public entry point checks before it computes: images as float B×C×H×W in [0, 1], and an ns_vit `PixelViT` with the data's number of classes.
#
# ns_vit works in pixel space: models take images in [0, 1] and normalise them themselves (`PixelViT`), so attacks, noise
# and corruptions all act on pixels. A function that trusts its input turns a wrong input into a wrong number, with no
# error: 0–255 images make `eps_noise` report a noise inside ε after 0 steps, and a bare timm ViT scores 28.4% where its
# `PixelViT` scores 72.2% (issue 28). The two checks below are called where inputs enter (`evaluate`, `eps_noise`,
# `noise_influence`, `accuracy`); each error says what to pass instead. This module imports only torch at its top, so
# that `ns_vit.models` can import `check_images` from it.

# %%
#| default_exp checks

# %%
#| export
from __future__ import annotations
import torch
from torch import nn, Tensor

# %%
from fastcore.test import test_eq, test_fail
from ns_vit.models import create_vit, load_default_model, CIFAR10_MEAN, CIFAR10_STD


# %% [markdown]
# ## Images
#
# The order of the checks matters for the message: shape before values (a channels-last batch is not "out of range"),
# negative values before large ones (normalised images run from about −2 to 2: "already normalised" is the useful
# word, not "above 1"). A small tolerance lets resampling overshoot and float error pass.

# %%
#| export
def _shape(x: Tensor) -> str: return '×'.join(map(str, x.shape))

def check_images(x: Tensor,  # images: float (B, C, H, W) in [0, 1]
                 name: str = 'images',  # what the caller calls them, for the message
                 tol: float = 1e-3,  # how far outside [0, 1] values may lie (resampling overshoot, float error)
                 ) -> Tensor:
    "Return `x` if it is a non-empty, finite float batch B×C×H×W in [0, 1]; otherwise raise an error that says what to pass."
    if not isinstance(x, Tensor): raise TypeError(f'{name} must be a torch.Tensor B×C×H×W in [0, 1], got {type(x).__name__}')
    if x.ndim != 4:
        hint = ': one image? pass x[None]' if x.ndim == 3 else ''
        raise ValueError(f'{name} must be a batch B×C×H×W, got shape {_shape(x)}{hint}')
    if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        raise ValueError(f'{name} of shape {_shape(x)} look channels-last (B×H×W×C): pass x.permute(0, 3, 1, 2)')
    if x.numel() == 0: raise ValueError(f'{name} are empty (shape {_shape(x)}): pass at least one image')
    if not x.is_floating_point():
        big = x.dtype != torch.bool and x.max().item() > 1
        raise TypeError(f'{name} are {x.dtype}' + (' with values up to 255: divide by 255, x.float() / 255' if big else
                        ': pass float images in [0, 1], x.float()'))
    bad = ~torch.isfinite(x)
    if bad.any():
        imgs = bad.flatten(1).any(1).nonzero()[:, 0]  # (k,) indices of images with a NaN or inf
        raise ValueError(f'{name}: {int(bad.sum())} values in {len(imgs)} of {len(x)} images are NaN or infinite '
                         f'(first: image {imgs[0].item()}): fix or drop those images')
    lo, hi = x.min().item(), x.max().item()
    if lo < -tol:
        raise ValueError(f'{name} have values down to {lo:.3g} and look already normalised (values < 0): pass images in '
                         '[0, 1]; normalisation lives inside PixelViT (its mean and std)')
    if hi > 1 + tol:
        fix = 'look like 0–255 pixel values: divide by 255' if hi > 2 else 'lie above 1: pass images in [0, 1] (x.clamp(0, 1))'
        raise ValueError(f'{name} have values up to {hi:.4g} and {fix}')
    return x


# %% [markdown]
# The cases as a user meets them: an image batch read as bytes, the same batch as floats but not scaled, a batch
# already normalised for a timm model, a channels-last array from PIL or NumPy, one image without its batch dimension,
# an empty selection, a NaN pixel. A correct batch passes through unchanged, at the edges of [0, 1] too.

# %%
torch.manual_seed(0)
x = torch.rand(4, 3, 32, 32)  # (B, C, H, W) in [0, 1]
assert check_images(x) is x
check_images(torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)]))  # the edges of [0, 1]
check_images(x.clamp(0, 1) * (1 + 1e-5))  # float error within the tolerance
check_images(x.half()); check_images(x[:, :1])  # half precision; one channel

u8 = (x * 255).round().to(torch.uint8)
test_fail(lambda: check_images(u8), contains='divide by 255')
test_fail(lambda: check_images(u8.float()), contains='divide by 255')  # 0–255 as floats
test_fail(lambda: check_images(u8 > 128), contains='x.float()')
mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
test_fail(lambda: check_images((x - mean) / std), contains='normalisation lives inside PixelViT')
test_fail(lambda: check_images(x * 1.5), contains='x.clamp(0, 1)')
test_fail(lambda: check_images(x.permute(0, 2, 3, 1)), contains='x.permute(0, 3, 1, 2)')
test_fail(lambda: check_images(x[0]), contains='pass x[None]')
test_fail(lambda: check_images(x[:0]), contains='empty')
test_fail(lambda: check_images(x.numpy()), contains='torch.Tensor')
nan = x.clone(); nan[2, 1, 5, 5] = float('nan')
test_fail(lambda: check_images(nan, 'batches'), contains='batches: 1 values in 1 of 4 images are NaN or infinite (first: image 2)')


# %% [markdown]
# ## Models
#
# `PixelViT(vit, mean, std)` is the one wrapper ns_vit scores: it holds the normalisation the weights were trained with.
# A bare timm ViT runs on [0, 1] images without error and gives a wrong number; any other module is not a ViT at all.
# Both get an error that names the way to build the wrapper. When the caller knows its data's number of classes, a
# model with another head is refused too (a 100-class checkpoint scored on CIFAR-10 would otherwise give a number).

# %%
#| export
def model_classes(model: nn.Module) -> int | None:
    "The number of classes `model` predicts (`models.num_classes` of the ViT inside), or None for a model that is not a ViT."
    from ns_vit.models import num_classes  # here, not at the top: `models` imports `check_images` from this module
    try: return num_classes(model)
    except TypeError: return None

def check_model(model: nn.Module,  # an ns_vit model
                num_classes: int | None = None,  # the classes of the data it will be scored on; None: not checked
                data: str = 'the data',  # the data set's name, for the message
                ) -> nn.Module:
    "Return `model` if it is an ns_vit `PixelViT` (with `num_classes` outputs); otherwise raise an error that names the fix."
    from ns_vit.models import PixelViT, check_vit  # here, not at the top: `models` may import `check_images` from this module
    if not isinstance(model, PixelViT):
        try: bare = isinstance(model, nn.Module) and check_vit(model) is model
        except TypeError: bare = False
        if bare: raise TypeError(
            f'model is a bare {type(model).__name__}: ns_vit models take images in [0, 1] and normalise them inside. Wrap '
            "it as PixelViT(vit, mean, std) with the mean and std it was trained with (timm weights: vit.pretrained_cfg['mean'], "
            "['std']), or build it with create_vit(name, pretrained=...); load_checkpoint(path) returns ns_vit checkpoints wrapped")
        raise TypeError(f'model is a {type(model).__name__}, not an ns_vit PixelViT: build one with create_vit(name, '
                        'pretrained=...) or load_checkpoint(path), or wrap a timm ViT as PixelViT(vit, mean, std)')
    k = model_classes(model)
    if num_classes is not None and k is not None and k != num_classes:
        raise ValueError(f'the model predicts {k} classes but {data} has {num_classes}: pass a model with a '
                         f'{num_classes}-class head trained on {data}')
    return model


# %% [markdown]
# The embedded default model passes; its bare ViT (`.vit`, the call that scored 28.4% instead of 72.2%) and a module that
# is no ViT are refused with the wrapper to use; a 100-class ViT is refused for 10-class data.

# %%
m = load_default_model()
assert check_model(m, 10, 'CIFAR-10') is m
test_eq(model_classes(m), 10)
test_fail(lambda: check_model(m.vit), contains='Wrap it as PixelViT(vit, mean, std)')
test_fail(lambda: check_model(m.vit), contains='create_vit(name, pretrained=...)')
test_fail(lambda: check_model(nn.Conv2d(3, 8, 3)), contains='Conv2d, not an ns_vit PixelViT')
test_fail(lambda: check_model('default'), contains='not an ns_vit PixelViT')
m100 = create_vit('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=100)
check_model(m100)  # the data's classes unknown: not checked
test_fail(lambda: check_model(m100, 10, 'CIFAR-10'), contains='the model predicts 100 classes but CIFAR-10 has 10')
