# %% [markdown]
# # Shifted test sets
# > Label-correct loaders for the shifted test sets of Table 2, and top-1 accuracy on them with the right logits.
#
# Table 2 of the paper scores each model on shifted ImageNet test sets (A, R, V2, Sketch, Stylized) and on DamageNet.
# This notebook provides loaders that map each set's labels into the model's label space (ImageNet-A/-R/-V2/-Sketch/
# Stylized/DamageNet for ImageNet models; CIFAR-10.1/10.2, CINIC-10 and STL-10 for CIFAR-10 models) and the accuracy
# that restricts the argmax to the set's classes. The CIFAR-10 analogue of DamageNet, generated in-project, is in
# `06d_damagenet`.

# %%
#| default_exp shifts

# %%
#| export
from __future__ import annotations
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
import numpy as np
import torch
from PIL import Image
from torch import nn, Tensor
import torch.nn.functional as F
from torch.utils.data import Dataset, DataLoader
from ns_vit.progress import tqdm
import pandas as pd
from ns_vit.data import CIFAR10_CLASSES, pixel_transform, image_folder
from ns_vit.models import model_device, PixelViT, as_vit, frozen, input_size
from ns_vit.stats import accuracy_ci, mcnemar

# %%
from fastcore.test import test_eq, test_close, test_fail
import tempfile, os


# %% [markdown]
# ## Shifted test sets
#
# None of these sets can be downloaded by ns_vit (no PyPI package ships them); users point a loader at the folder
# they have. Every loader returns a `ShiftSet`: the dataset yields ([0, 1] image (C, H, W), label **in the model's
# label space** — ImageNet-1k indices for the ImageNet sets, CIFAR-10 indices for the CIFAR sets), and `logit_index`
# says which of the model's logits take part in the argmax (the 200 classes of ImageNet-A/-R, the 9 classes STL-10
# shares with CIFAR-10), or None for all. The pitfalls each loader handles:
#
# - **ImageNet-A/-R** hold 200 wnid folders; `ImageFolder` would label them 0…199. We map each wnid to its
#   ImageNet-1k index and restrict the argmax to the 200 classes of the set (the canonical list shipped with timm).
# - **ImageNet-V2** folders are `0 … 999`, the class *indices*; `ImageFolder` sorts them as strings (`10` < `2`), so
#   the label is `int(folder)`, never the folder's sorted position (modestyachts/ImageNetV2#10).
# - **STL-10** has *monkey* instead of *frog*: its labels map to CIFAR-10 indices, monkey images are dropped, and the
#   argmax runs over the 9 shared classes (CIFAR's frog logit excluded).
#
# The 1000 ImageNet wnids in index order come from timm (`timm.data.ImageNetInfo`), or from the user's ImageNet
# train folder (its sorted wnid sub-folders) where timm lacks them.

# %%
#| export
def imagenet_wnids(train_root: str | Path | None = None, use_timm: bool = True) -> list[str]:
    "The 1000 ImageNet-1k wnids in class-index order: from timm, else the sorted folders of `train_root`."
    if use_timm:
        try:
            from timm.data import ImageNetInfo
            wnids = list(ImageNetInfo('imagenet-1k').label_names())
            if len(wnids) == 1000: return wnids
        except Exception: pass
    if train_root is None:
        raise RuntimeError('timm does not carry the ImageNet class list here: pass train_root=<ImageNet train folder> '
                           '(1000 wnid sub-folders) so the wnid order can be read from it.')
    wnids = sorted(p.name for p in Path(train_root).expanduser().iterdir() if p.is_dir())
    if len(wnids) != 1000: raise ValueError(f'{train_root} holds {len(wnids)} class folders, not the 1000 ImageNet wnids')
    return wnids

def timm_subset_wnids(name: str) -> list[str] | None:
    "The canonical 200 wnids of 'imagenet_a' or 'imagenet_r' as shipped with timm (None if timm lacks the file)."
    import pkgutil
    try: data = pkgutil.get_data('timm.data', f'_info/{name}_synsets.txt')
    except (OSError, FileNotFoundError): return None
    return data.decode().split() if data else None


# %%
wn = imagenet_wnids()
test_eq(len(wn), 1000); test_eq(wn[0], 'n01440764'); test_eq(len(set(wn)), 1000)
test_eq(wn, sorted(wn))  # ImageNet-1k's index order is the sorted wnid order
a200, r200 = timm_subset_wnids('imagenet_a'), timm_subset_wnids('imagenet_r')
test_eq((len(a200), len(r200)), (200, 200)); assert set(a200) <= set(wn) and set(r200) <= set(wn)
with tempfile.TemporaryDirectory() as d:  # the fallback: a train folder with 1000 wnid folders
    for w in wn[::-1]: os.mkdir(Path(d) / w)
    test_eq(imagenet_wnids(d, use_timm=False), wn)
    os.rmdir(Path(d) / wn[5])
    test_fail(lambda: imagenet_wnids(d, use_timm=False), contains='999 class folders')
test_fail(lambda: imagenet_wnids(use_timm=False), contains='train_root')


# %%
#| export
@dataclass
class ShiftSet:
    "A shifted test set: dataset of ([0,1] image, model-space label), the logits to compare, classes, source."
    name: str
    dataset: Dataset
    logit_index: Tensor | None  # (K,) long: the model logits the argmax runs over; None = all
    classes: tuple[str, ...]  # names of the classes present (wnids or CIFAR names)
    source: str  # citation and where to get the data
    def __len__(self) -> int: return len(self.dataset)

class Relabeled(Dataset):
    "Wrap a dataset whose labels are positions 0…K−1 and map them through `labels` (a list/tensor), picklably."
    def __init__(self, ds: Dataset, labels): self.ds, self.labels = ds, torch.as_tensor(labels, dtype=torch.long)
    def __len__(self) -> int: return len(self.ds)
    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, t = self.ds[i]
        return x, int(self.labels[t])

class FileList(Dataset):
    "Images from a list of files with given labels, through `transform`."
    def __init__(self, files: list[Path], labels: list[int], transform: Callable):
        self.files, self.labels, self.transform = list(files), list(labels), transform
    def __len__(self) -> int: return len(self.files)
    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        with Image.open(self.files[i]) as im: return self.transform(im.convert('RGB')), self.labels[i]

def _need_dir(root: str | Path, what: str, get: str) -> Path:
    "`root` as a Path, or a clear error saying what the folder should hold and where to get it."
    root = Path(root).expanduser()
    if not root.is_dir(): raise FileNotFoundError(f'{what}: folder {root} does not exist. Expected {get}')
    return root

def _folders(root: Path, transform) -> Dataset:
    "torchvision ImageFolder (sorted sub-folders) with a clear error when empty."
    from torchvision.datasets import ImageFolder
    try: return ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as e: raise FileNotFoundError(f'no class folders with images under {root}: {e}') from None


# %% [markdown]
# ### ImageNet-scale sets
#
# Images go through `ns_vit.data.pixel_transform` (resize the shorter side to img_size/crop_pct, centre-crop, to
# [0, 1]); `img_size`, `crop_pct` and `interpolation` pass through. Stylized-ImageNet and DamageNet are already
# 224×224, so their default `crop_pct` is 1 (resize to 224 and crop 224: the identity at 224, as easyrobust's
# ToTensor-only transform; NS-ViT's Resize(256)+CenterCrop(224) rescaled DamageNet's adversarial pixels).

# %%
#| export
def _wnid_labels(classes: list[str], wnids: list[str], root: Path) -> list[int]:
    "ImageNet-1k index of each wnid folder, or an error naming the folders that are not wnids."
    index = {w: i for i, w in enumerate(wnids)}
    bad = [c for c in classes if c not in index]
    if bad: raise ValueError(f'{root}: {len(bad)} folders are not ImageNet-1k wnids (e.g. {bad[:3]}); '
                             'expected one folder per class named by its wnid (n01440764, ...)')
    return [index[c] for c in classes]

def _imagenet_folder_set(name: str, root, source: str, layout: str, subset: str | None = None,
                         img_size: int = 224, crop_pct: float = 0.875, interpolation: str = 'bicubic',
                         train_root=None) -> ShiftSet:
    "A wnid-folder set: labels are ImageNet-1k indices; `subset` ('imagenet_a'|'imagenet_r') adds the 200-logit mask."
    root = _need_dir(root, name, layout + f' (get it from {source})')
    ds = _folders(root, pixel_transform(img_size, crop_pct, interpolation))
    wnids = imagenet_wnids(train_root)
    labels = _wnid_labels(ds.classes, wnids, root)
    logit_index = None
    if subset is not None:
        canon = timm_subset_wnids(subset) or ds.classes  # the canonical 200, or (without timm's list) those present
        extra = sorted(set(ds.classes) - set(canon))
        if extra: raise ValueError(f'{root}: folders {extra[:3]} are not among the 200 classes of {subset}')
        logit_index = torch.tensor(sorted(_wnid_labels(list(canon), wnids, root)))
    return ShiftSet(name, Relabeled(ds, labels), logit_index, tuple(ds.classes), source)

SOURCES = dict(
    imagenet_a='Hendrycks et al., Natural Adversarial Examples, CVPR 2021; https://github.com/hendrycks/natural-adv-examples',
    imagenet_r='Hendrycks et al., The Many Faces of Robustness, ICCV 2021; https://github.com/hendrycks/imagenet-r',
    imagenet_v2='Recht et al., Do ImageNet Classifiers Generalize to ImageNet?, ICML 2019; '
                'https://github.com/modestyachts/ImageNetV2 (matched-frequency)',
    imagenet_sketch='Wang et al., Learning Robust Global Representations by Penalizing Local Predictive Power, '
                    'NeurIPS 2019; https://github.com/HaohanWang/ImageNet-Sketch',
    stylized_imagenet='Geirhos et al., ImageNet-trained CNNs are biased towards texture, ICLR 2019; generate the val '
                      'split with https://github.com/rgeirhos/Stylized-ImageNet',
    damagenet_imagenet='Chen et al., Universal adversarial attack on attention and the resulting dataset DAmageNet, '
                       'TPAMI 2020; http://www.pami.sjtu.edu.cn/Show/56/122 (https://github.com/Sizhe-Chen/DAmageNet)',
    cifar10_1='Recht et al., Do CIFAR-10 Classifiers Generalize to CIFAR-10?, 2018; https://github.com/modestyachts/CIFAR-10.1',
    cifar10_2='Lu et al., Harder or Different? A Closer Look at Distribution Shift in Dataset Reproduction, 2020; '
              'https://github.com/modestyachts/cifar-10.2',
    cinic10='Darlow et al., CINIC-10 is not ImageNet or CIFAR-10, 2018; https://github.com/BayesWatch/cinic-10 '
            '(data: https://doi.org/10.7488/ds/2448)',
    stl10='Coates et al., An Analysis of Single-Layer Networks in Unsupervised Feature Learning, AISTATS 2011; '
          'https://cs.stanford.edu/~acoates/stl10/ (stl10_binary.tar.gz)')


# %%
#| export
def imagenet_a(root: str | Path, img_size: int = 224, crop_pct: float = 0.875, interpolation: str = 'bicubic',
               train_root=None) -> ShiftSet:
    "ImageNet-A (200 wnid folders): ImageNet-1k labels, argmax over its 200 classes."
    return _imagenet_folder_set('imagenet_a', root, SOURCES['imagenet_a'], '<root>/<wnid>/*.jpg, 200 wnids, 7,500 images',
                                'imagenet_a', img_size, crop_pct, interpolation, train_root)

def imagenet_r(root: str | Path, img_size: int = 224, crop_pct: float = 0.875, interpolation: str = 'bicubic',
               train_root=None) -> ShiftSet:
    "ImageNet-R (200 wnid folders): ImageNet-1k labels, argmax over its 200 classes."
    return _imagenet_folder_set('imagenet_r', root, SOURCES['imagenet_r'], '<root>/<wnid>/*.jpg, 200 wnids, 30,000 images',
                                'imagenet_r', img_size, crop_pct, interpolation, train_root)

def imagenet_sketch(root: str | Path, img_size: int = 224, crop_pct: float = 0.875, interpolation: str = 'bicubic',
                    train_root=None) -> ShiftSet:
    "ImageNet-Sketch (1000 wnid folders, 50 sketches each)."
    return _imagenet_folder_set('imagenet_sketch', root, SOURCES['imagenet_sketch'], '<root>/<wnid>/*.JPEG, 1000 wnids',
                                None, img_size, crop_pct, interpolation, train_root)

def stylized_imagenet(root: str | Path, img_size: int = 224, crop_pct: float = 1.0, interpolation: str = 'bicubic',
                      train_root=None) -> ShiftSet:
    "Stylized-ImageNet val (1000 wnid folders of 224×224 images; no crop by default)."
    return _imagenet_folder_set('stylized_imagenet', root, SOURCES['stylized_imagenet'],
                                '<root>/<wnid>/*.png (the val split), 1000 wnids', None, img_size, crop_pct, interpolation, train_root)

def imagenet_v2(root: str | Path, img_size: int = 224, crop_pct: float = 0.875, interpolation: str = 'bicubic') -> ShiftSet:
    "ImageNet-V2 (folders `0`…`999` named by class index): label = int(folder), not its sorted position."
    root = _need_dir(root, 'imagenet_v2', f'<root>/<0..999>/*.jpeg (get it from {SOURCES["imagenet_v2"]})')
    ds = _folders(root, pixel_transform(img_size, crop_pct, interpolation))
    bad = [c for c in ds.classes if not c.isdigit() or not 0 <= int(c) < 1000]
    if bad: raise ValueError(f'{root}: ImageNet-V2 folders are class indices 0…999; found {bad[:3]}')
    return ShiftSet('imagenet_v2', Relabeled(ds, [int(c) for c in ds.classes]), None, tuple(ds.classes), SOURCES['imagenet_v2'])

def damagenet_imagenet(root: str | Path, labels_file: str | Path | None = None, img_size: int = 224,
                       crop_pct: float = 1.0, interpolation: str = 'bicubic') -> ShiftSet:
    "DamageNet (flat folder of 224×224 PNGs + `val.txt` lines 'ILSVRC2012_val_00000001.JPEG 65')."
    root = _need_dir(root, 'damagenet_imagenet', f'<root>/*.png and <root>/val.txt (get it from {SOURCES["damagenet_imagenet"]})')
    lf = Path(labels_file) if labels_file else root / 'val.txt'
    if not lf.is_file(): raise FileNotFoundError(f'DamageNet labels {lf} not found: pass labels_file=<val.txt> '
                                                 '(lines "<file name> <ImageNet index>")')
    files, labels, missing = [], [], []
    for line in lf.read_text().split('\n'):
        if not line.strip(): continue
        name, lab = line.split()[:2]
        f = next((p for p in (root / name, root / (Path(name).stem + '.png')) if p.is_file()), None)
        if f is None: missing.append(name); continue
        files.append(f); labels.append(int(lab))
    if missing: warnings.warn(f'{len(missing)} files listed in {lf} are not in {root} (e.g. {missing[:2]}): skipped')
    if not files: raise FileNotFoundError(f'none of the files listed in {lf} is in {root}')
    return ShiftSet('damagenet_imagenet', FileList(files, labels, pixel_transform(img_size, crop_pct, interpolation)),
                    None, tuple(imagenet_wnids()), SOURCES['damagenet_imagenet'])


# %% [markdown]
# Tiny fixtures: two classes × two random images per set, saved the way each release lays them out (a test helper, not part of the library).

# %%
def _fixture_images(folder: Path, n: int = 2, size: tuple[int, int] = (40, 48), ext: str = 'png', seed: int | None = None, prefix: str = 'img') -> list[Path]:
    "Write `n` random RGB images into `folder` (test fixture)."
    folder.mkdir(parents=True, exist_ok=True)
    import zlib
    g = np.random.default_rng(zlib.crc32(f'{folder.parent.name}/{folder.name}'.encode()) if seed is None else seed)  # per folder
    paths = [folder / f'{prefix}{i}.{ext}' for i in range(n)]
    for p in paths: Image.fromarray(g.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
    return paths


# %%
d = Path(tempfile.mkdtemp())
wn = imagenet_wnids()
a200, r200 = timm_subset_wnids('imagenet_a'), timm_subset_wnids('imagenet_r')
a_w = [a200[0], next(w for w in a200[1:] if w not in r200)]  # the second is an A class that R lacks
for w in a_w: _fixture_images(d / 'a' / w)
s = imagenet_a(d / 'a', img_size=32)
test_eq(len(s), 4)
x, y = s.dataset[0]
test_eq(x.shape, (3, 32, 32)); assert 0 <= x.min() and x.max() <= 1
test_eq([s.dataset[i][1] for i in range(4)], [wn.index(a_w[0])] * 2 + [wn.index(a_w[1])] * 2)  # ImageNet-1k indices, not 0/1
test_eq(len(s.logit_index), 200); test_eq(s.logit_index.tolist(), sorted(wn.index(w) for w in timm_subset_wnids('imagenet_a')))
assert wn.index(a_w[1]) in s.logit_index.tolist()
test_fail(lambda: imagenet_r(d / 'a'), contains='not among the 200 classes')  # A's wnids are not all R classes
_fixture_images(d / 'bad' / 'cat')
test_fail(lambda: imagenet_sketch(d / 'bad'), contains='not ImageNet-1k wnids')
test_fail(lambda: imagenet_a(d / 'nowhere'), contains='does not exist')

# V2: folders '2' and '10'. ImageFolder sorts them as strings ('10' before '2') and would call '10' class 0.
for c in ('2', '10'): _fixture_images(d / 'v2' / c, ext='jpeg')
s = imagenet_v2(d / 'v2', img_size=32)
test_eq(s.dataset.ds.classes, ['10', '2'])
test_eq([s.dataset[i][1] for i in range(4)], [10, 10, 2, 2])
assert s.logit_index is None

# DamageNet: flat PNGs, val.txt naming the original .JPEG files
_fixture_images(d / 'dn', n=3, size=(224, 224), prefix='ILSVRC2012_val_0000000')
(d / 'dn' / 'val.txt').write_text('ILSVRC2012_val_00000000.JPEG 65\nILSVRC2012_val_00000001.JPEG 970\n'
                                  'ILSVRC2012_val_00000002.JPEG 0\n')
s = damagenet_imagenet(d / 'dn')
test_eq([s.dataset[i][1] for i in range(3)], [65, 970, 0])
test_eq(s.dataset[0][0].shape, (3, 224, 224))
raw = torch.from_numpy(np.asarray(Image.open(d / 'dn' / 'ILSVRC2012_val_00000000.png'))).permute(2, 0, 1) / 255
test_close(s.dataset[0][0], raw, eps=1e-6)  # 224×224 images pass through unchanged (crop_pct = 1)
# Sketch / Stylized: wnid folders, labels are ImageNet indices
for w in (wn[3], wn[998]): _fixture_images(d / 'st' / w)
test_eq([stylized_imagenet(d / 'st', img_size=32).dataset[i][1] for i in (0, 3)], [3, 998])
test_eq([imagenet_sketch(d / 'st', img_size=32).dataset[i][1] for i in (0, 3)], [3, 998])

# %% [markdown]
# ### CIFAR-scale sets
#
# Labels are CIFAR-10 indices. STL-10's 96×96 images and anything else not at `img_size` are resized with an
# antialiased bilinear filter (default 32, the embedded model's size).

# %%
#| export
STL10_CLASSES = ('airplane', 'bird', 'car', 'cat', 'deer', 'dog', 'horse', 'monkey', 'ship', 'truck')
STL10_TO_CIFAR10 = (0, 2, 1, 3, 4, 5, 7, -1, 8, 9)  # STL class -> CIFAR-10 index; monkey (-1) has no CIFAR class

class ArrayImages(Dataset):
    "uint8 images (N, H, W, C) with labels; items are float [0, 1] (C, size, size), resized if needed."
    def __init__(self, images: Tensor, labels: Tensor, size: int | None = None):
        if len(images) != len(labels): raise ValueError(f'{len(images)} images but {len(labels)} labels')
        self.images, self.labels, self.size = images, labels.long(), size
    def __len__(self) -> int: return len(self.images)
    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.images[i].permute(2, 0, 1).float().div(255)  # (C, H, W)
        if self.size and tuple(x.shape[1:]) != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode='bilinear', antialias=True, align_corners=False)[0].clamp(0, 1)
        return x, int(self.labels[i])

def _small_transform(img_size: int):
    "To [0, 1] tensor, resized (antialiased) to img_size when the image is another size."
    from torchvision import transforms as T
    return T.Compose([T.Resize((img_size, img_size), antialias=True), T.ToTensor()])

def _need_file(path: Path, what: str) -> Path:
    if not path.is_file(): raise FileNotFoundError(f'{what}: {path} not found (get it from {SOURCES[what]})')
    return path


# %%
#| export
def cifar10_1(root: str | Path, version: str = 'v6', img_size: int = 32) -> ShiftSet:
    "CIFAR-10.1 from `cifar10.1_<version>_data.npy` (uint8 N×32×32×3) and `_labels.npy`."
    root = Path(root).expanduser()
    x = np.load(_need_file(root / f'cifar10.1_{version}_data.npy', 'cifar10_1'), allow_pickle=False)
    y = np.load(_need_file(root / f'cifar10.1_{version}_labels.npy', 'cifar10_1'), allow_pickle=False)
    return ShiftSet(f'cifar10_1_{version}', ArrayImages(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), img_size),
                    None, CIFAR10_CLASSES, SOURCES['cifar10_1'])

def cifar10_2(root: str | Path, split: str = 'test', img_size: int = 32) -> ShiftSet:
    "CIFAR-10.2 from `cifar102_<split>.npz` (arrays `images` uint8 N×32×32×3, `labels`); no unpickling."
    root = Path(root).expanduser()
    path = next((p for p in (root / f'cifar102_{split}.npz', root / f'cifar102_{split}.npy', root) if p.is_file()),
                root / f'cifar102_{split}.npz')
    _need_file(path, 'cifar10_2')
    try:
        with np.load(path, allow_pickle=False) as d: x, y = d['images'], d['labels']
    except (ValueError, TypeError, IndexError) as e:
        raise ValueError(f'{path} is not an npz archive with `images` and `labels` arrays ({e}); a pickled .npy '
                         'dict is refused (it could run code): re-save it with np.savez(images=..., labels=...)') from None
    return ShiftSet('cifar10_2', ArrayImages(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), img_size),
                    None, CIFAR10_CLASSES, SOURCES['cifar10_2'])

def cinic10(root: str | Path, split: str = 'test', img_size: int = 32) -> ShiftSet:
    "CINIC-10 `<root>/<split>/<cifar class>/*.png` (ImageFolder); labels are CIFAR-10 indices."
    root = Path(root).expanduser()
    sub = root / split if (root / split).is_dir() else root
    _need_dir(sub, 'cinic10', f'<root>/{split}/<airplane|automobile|...>/*.png (get it from {SOURCES["cinic10"]})')
    ds = _folders(sub, _small_transform(img_size))
    bad = [c for c in ds.classes if c not in CIFAR10_CLASSES]
    if bad: raise ValueError(f'{sub}: folders {bad[:3]} are not CIFAR-10 class names {CIFAR10_CLASSES}')
    return ShiftSet('cinic10', Relabeled(ds, [CIFAR10_CLASSES.index(c) for c in ds.classes]), None, tuple(ds.classes),
                    SOURCES['cinic10'])

def _read_stl_bin(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    "STL-10 binary `<split>_X.bin` (uint8, N×3×96×96 column-major) and `<split>_y.bin` (1-based labels)."
    d = next((p for p in (root / 'stl10_binary', root) if (p / f'{split}_X.bin').is_file()), root / 'stl10_binary')
    x = np.fromfile(_need_file(d / f'{split}_X.bin', 'stl10'), dtype=np.uint8).reshape(-1, 3, 96, 96)
    y = np.fromfile(_need_file(d / f'{split}_y.bin', 'stl10'), dtype=np.uint8).astype(np.int64) - 1
    return np.ascontiguousarray(x.transpose(0, 3, 2, 1)), y  # (N, H, W, C): the files store columns first

def stl10(root: str | Path, split: str = 'test', img_size: int = 32) -> ShiftSet:
    "STL-10 binary release, the 9 classes shared with CIFAR-10 (monkey dropped), CIFAR labels, no 'frog' logit."
    x, y = _read_stl_bin(Path(root).expanduser(), split)
    to_cifar = np.array(STL10_TO_CIFAR10)[y]
    keep = to_cifar >= 0
    logit_index = torch.tensor(sorted(c for c in STL10_TO_CIFAR10 if c >= 0))
    return ShiftSet('stl10', ArrayImages(torch.from_numpy(x[keep]), torch.from_numpy(to_cifar[keep]), img_size),
                    logit_index, tuple(CIFAR10_CLASSES[i] for i in logit_index), SOURCES['stl10'])


# %%
g = np.random.default_rng(0)
x101, y101 = g.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.array([3, 1, 4, 1])
np.save(d / 'cifar10.1_v6_data.npy', x101); np.save(d / 'cifar10.1_v6_labels.npy', y101)
s = cifar10_1(d)
test_eq(len(s), 4); test_eq([s.dataset[i][1] for i in range(4)], [3, 1, 4, 1])
test_eq(s.dataset[2][0], torch.from_numpy(x101[2]).permute(2, 0, 1).float() / 255)
test_fail(lambda: cifar10_1(d, version='v4'), contains='cifar10.1_v4_data.npy not found')
np.savez(d / 'cifar102_test.npz', images=x101, labels=y101, label_names=np.array(CIFAR10_CLASSES, dtype=object))
s = cifar10_2(d)  # the object array `label_names` is never unpickled
test_eq([s.dataset[i][1] for i in range(4)], [3, 1, 4, 1])
np.save(d / 'pickled.npy', np.array({'images': x101, 'labels': y101}, dtype=object), allow_pickle=True)
test_fail(lambda: cifar10_2(d / 'pickled.npy'), contains='refused')

for c in ('truck', 'airplane'): _fixture_images(d / 'cinic' / 'test' / c, size=(32, 32))
s = cinic10(d / 'cinic')
test_eq([s.dataset[i][1] for i in range(4)], [0, 0, 9, 9])  # airplane = 0, truck = 9 (not ImageFolder's 0/1)
test_eq(s.dataset[0][0].shape, (3, 32, 32))

# STL-10: write the binary layout (N, 3, 96, 96) stored column-major, labels 1..10
xs = g.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
ys = np.array([1, 7, 8, 3, 10], dtype=np.uint8)  # airplane, horse, monkey, car, truck (1-based)
(d / 'stl10_binary').mkdir()
xs.transpose(0, 3, 2, 1).tofile(d / 'stl10_binary' / 'test_X.bin'); ys.tofile(d / 'stl10_binary' / 'test_y.bin')
s = stl10(d, img_size=96)
test_eq(len(s), 4)  # the monkey is dropped
test_eq([s.dataset[i][1] for i in range(4)], [0, 7, 1, 9])  # CIFAR indices: airplane, horse, automobile, truck
test_eq(s.dataset[0][0], torch.from_numpy(xs[0]).permute(2, 0, 1).float() / 255)  # orientation: rows stay rows
test_eq(s.logit_index.tolist(), [0, 1, 2, 3, 4, 5, 7, 8, 9]); assert 'frog' not in s.classes
test_eq(stl10(d).dataset[0][0].shape, (3, 32, 32))


# %% [markdown]
# ### Registry and accuracy

# %%
#| export
@dataclass(frozen=True)
class ShiftInfo:
    "How to load a shifted set, where users get it, and the layout the loader expects."
    loader: Callable[..., ShiftSet]
    get: str
    layout: str
    scale: str  # 'imagenet' or 'cifar10': the label space of the models it is for

SHIFTS: dict[str, ShiftInfo] = {
    'imagenet_a': ShiftInfo(imagenet_a, SOURCES['imagenet_a'], '<root>/<wnid>/*.jpg (200 wnids)', 'imagenet'),
    'imagenet_r': ShiftInfo(imagenet_r, SOURCES['imagenet_r'], '<root>/<wnid>/*.jpg (200 wnids)', 'imagenet'),
    'imagenet_v2': ShiftInfo(imagenet_v2, SOURCES['imagenet_v2'], '<root>/<0..999>/*.jpeg (class index folders)', 'imagenet'),
    'imagenet_sketch': ShiftInfo(imagenet_sketch, SOURCES['imagenet_sketch'], '<root>/<wnid>/*.JPEG (1000 wnids)', 'imagenet'),
    'stylized_imagenet': ShiftInfo(stylized_imagenet, SOURCES['stylized_imagenet'], '<root>/<wnid>/*.png (val, 1000 wnids)', 'imagenet'),
    'damagenet_imagenet': ShiftInfo(damagenet_imagenet, SOURCES['damagenet_imagenet'], '<root>/*.png + <root>/val.txt', 'imagenet'),
    'cifar10_1': ShiftInfo(cifar10_1, SOURCES['cifar10_1'], '<root>/cifar10.1_v6_{data,labels}.npy', 'cifar10'),
    'cifar10_2': ShiftInfo(cifar10_2, SOURCES['cifar10_2'], '<root>/cifar102_test.npz (images, labels)', 'cifar10'),
    'cinic10': ShiftInfo(cinic10, SOURCES['cinic10'], '<root>/test/<cifar class>/*.png', 'cifar10'),
    'stl10': ShiftInfo(stl10, SOURCES['stl10'], '<root>/stl10_binary/test_{X,y}.bin', 'cifar10'),
}

def load_shift(name: str, root: str | Path, **kw) -> ShiftSet:
    "Load the shifted set `name` (a key of `SHIFTS`) from `root`."
    if name not in SHIFTS: raise ValueError(f'unknown shifted set {name!r}; known: {sorted(SHIFTS)}')
    return SHIFTS[name].loader(root, **kw)


# %%
#| export
@torch.no_grad()
def shift_accuracy(model: nn.Module, shift: ShiftSet, batch_size: int = 250, num_workers: int = 0,
                   quiet: bool = True) -> dict:
    "Top-1 accuracy of `model` on `shift`, argmax restricted to `shift.logit_index`: dict(correct, accuracy, n)."
    dev = model_device(model)
    idx = shift.logit_index.to(dev) if shift.logit_index is not None else None
    correct = []
    loader = DataLoader(shift.dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    with frozen(model):
        for x, y in tqdm(loader, desc=shift.name, disable=quiet):
            logits = model(x.to(dev))  # (B, num_classes)
            pred = idx[logits[:, idx].argmax(1)] if idx is not None else logits.argmax(1)
            correct.append((pred == y.to(dev)).cpu())
    correct = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    return dict(correct=correct, accuracy=correct.float().mean().item() if len(correct) else float('nan'), n=len(correct))


# %% [markdown]
# The logit mask matters: below, a "model" that always puts its largest logit on a class outside the set's classes
# (CIFAR's frog for STL-10, a non-A class for ImageNet-A) and its second largest on the true class is right only
# with the mask.

# %%
class Oracle(nn.Module):
    "Logits: `decoy` gets 10, the label (looked up by the image's exact bytes) gets 5."
    def __init__(self, ds, n_classes: int, decoy: int):
        super().__init__(); self.w = nn.Parameter(torch.zeros(1))
        self.table = {ds[i][0].numpy().tobytes(): ds[i][1] for i in range(len(ds))}
        assert len(self.table) == len(ds), 'fixture images must differ'
        self.n, self.decoy = n_classes, decoy
    def forward(self, x):
        out = torch.zeros(len(x), self.n)
        out[:, self.decoy] = 10
        for b in range(len(x)): out[b, self.table[x[b].numpy().tobytes()]] = 5
        return out

s = stl10(d, img_size=32)
r = shift_accuracy(Oracle(s.dataset, 10, decoy=6), s, batch_size=3)  # decoy: frog
test_eq(r['n'], 4); test_eq(r['accuracy'], 1.0); test_eq(r['correct'].dtype, torch.bool)
test_eq(shift_accuracy(Oracle(s.dataset, 10, decoy=6), ShiftSet('nomask', s.dataset, None, s.classes, ''))['accuracy'], 0.0)
s = imagenet_a(d / 'a', img_size=32)
non_a = next(i for i in range(1000) if i not in s.logit_index.tolist())
test_eq(shift_accuracy(Oracle(s.dataset, 1000, decoy=non_a), s)['accuracy'], 1.0)
test_eq(shift_accuracy(Oracle(s.dataset, 1000, decoy=s.logit_index[2].item()), s)['accuracy'], 0.0)  # a decoy inside the mask wins
test_eq(sorted(SHIFTS), sorted(SOURCES))
test_eq(load_shift('imagenet_v2', d / 'v2', img_size=32).dataset[0][1], 10)
test_fail(lambda: load_shift('imagenet_b', d), contains='unknown shifted set')

# %% [markdown]
# ### Which preprocessing a score assumes
# The paper's vanilla ImageNet rows sit well below timm's published accuracy of the same weights, which is what scoring a
# model under another pipeline than its own gives. `preprocessing_scores` scores a model on the same validation images
# three ways: timm's own `pretrained_cfg` (crop_pct, interpolation, the model's mean/std), the paper's released transform
# (Resize 256 bicubic + CenterCrop 224, i.e. crop 0.875) with the model's own normalisation, and that transform with
# ImageNet's mean/std forced on the model (the suspected mismatch for 0.5/0.5 models), each with a Wilson interval and
# a paired McNemar test against timm's pipeline. The third variant wraps the same ViT in a second `PixelViT` with other
# normalisation buffers: the model passed in is never modified.

# %%
#| export
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

def preprocessing_scores(model: PixelViT, root: str | Path, n_images: int | None = None, *, seed: int = 0,
                         batch_size: int = 250, num_workers: int = 0, quiet: bool = True) -> pd.DataFrame:
    "Clean accuracy of `model` on the same images of the ImageFolder `root` under timm's, the paper's and a mismatched pipeline."
    vit = as_vit(model)
    cfg, size = getattr(vit, 'pretrained_cfg', {}) or {}, input_size(model)[0]
    forced = PixelViT(vit, IMAGENET_MEAN, IMAGENET_STD).to(model_device(model))  # shares the weights, not the buffers
    variants = [('timm pretrained_cfg', cfg.get('crop_pct', 0.875), cfg.get('interpolation', 'bicubic'), model),
                ("paper's transform (crop 0.875), model's own mean/std", 224 / 256, 'bicubic', model),
                ("paper's transform, ImageNet mean/std", 224 / 256, 'bicubic', forced)]
    rows = []
    for name, crop, interp, m in variants:
        ds = image_folder(root, size, crop)
        ds.transform = pixel_transform(size, crop, interp)
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n_images or len(ds)].tolist()
        r = shift_accuracy(m, ShiftSet(name, torch.utils.data.Subset(ds, idx), None, (), str(root)), batch_size, num_workers, quiet)
        a = accuracy_ci(r['correct'])
        rows.append(dict(preprocessing=name, crop_pct=round(crop, 4), interpolation=interp, accuracy=a['value'],
                         ci_low=a['ci_low'], ci_high=a['ci_high'], n=a['n'], correct=r['correct']))
    t = pd.DataFrame(rows)
    for i in (1, 2):  # paired against timm's own pipeline, same images
        p = mcnemar(t.correct[i], t.correct[0]); t.loc[i, 'diff_vs_timm'] = p['diff']; t.loc[i, 'p_vs_timm'] = p['p_value']
    return t.drop(columns='correct')


# %%
from ns_vit.models import create_vit
d = Path(tempfile.mkdtemp())
for w in ('n01440764', 'n01443537'):  # ImageNet classes 0 and 1
    _fixture_images(d / w, n=3, size=(48, 40))
torch.manual_seed(0)
m = create_vit('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
with torch.no_grad(): as_vit(m).head.bias.fill_(-30); as_vit(m).head.bias[:2] = 0; as_vit(m).head.weight[:2] *= 100
own = (m.mean.clone(), m.std.clone())
t = preprocessing_scores(m, d)
test_eq(list(t.n), [6, 6, 6]); test_eq(t.crop_pct.iloc[1], 0.875)
test_eq((m.mean, m.std), own)  # the model passed in is untouched
x = torch.stack([pixel_transform(32, 0.875)(Image.open(f).convert('RGB')) for w in ('n01440764', 'n01443537') for f in sorted((d / w).iterdir())])
with torch.no_grad(): hand = (PixelViT(as_vit(m), IMAGENET_MEAN, IMAGENET_STD)(x).argmax(1) == torch.tensor([0, 0, 0, 1, 1, 1])).float().mean()
test_close(t.accuracy.iloc[2], hand.item())  # the ImageNet-normalised variant, by hand
test_eq(preprocessing_scores(m, d, 4).n.tolist(), [4, 4, 4])
