# %% [markdown]
# # Data
# > CIFAR-10 offline (archive, ImageFolder or torchvision batches) and ImageFolder datasets in pixel space.

# %%
#| default_exp data

# %%
#| export
from __future__ import annotations
import os, io, tarfile
from pathlib import Path
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from PIL import Image
from ns_vit.training import atomic_save  # re-exported here (`_all_`): models imports it from data
from ns_vit.cache import cached, file_digest, folder_digest, content_digest
_all_ = ['atomic_save']

# %%
#| hide
import tempfile
from fastcore.test import test_eq, test_fail, test_close

# %% [markdown]
# ## Where things live
#
# ns_vit never uses absolute paths. The repo root is found from the package (editable install) or the current
# directory; data are looked up in the `root` argument, then `$NS_VIT_DATA`, then `data/` in the repo.
# Decoded tensors are cached under `$NS_VIT_CACHE` (default `data/cache/` in the repo).

# %%
#| export
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
ARCHIVE_NAME = 'cifar10-jpeg.tar.gz'

def repo_root() -> Path:
    "The ns_vit repository root (the folder holding `settings.ini`), from the package or the working directory."
    import ns_vit
    for start in (Path(ns_vit.__file__).resolve().parent, Path.cwd().resolve()):
        for p in (start, *start.parents):
            if (p / 'settings.ini').exists() and (p / 'ns_vit').is_dir(): return p
    return Path.cwd().resolve()

def data_dirs(root: str | Path | None = None) -> list[Path]:
    "Folders searched for data, in order: `root`, `$NS_VIT_DATA`, `<repo>/data`."
    dirs = [Path(root)] if root is not None else []
    if os.environ.get('NS_VIT_DATA'): dirs.append(Path(os.environ['NS_VIT_DATA']))
    dirs.append(repo_root() / 'data')
    return [d.expanduser() for d in dirs]

def cache_dir() -> Path:
    "Where decoded tensors are cached (`$NS_VIT_CACHE`, default `<repo>/data/cache`)."
    d = Path(os.environ.get('NS_VIT_CACHE', repo_root() / 'data' / 'cache')).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


# %%
test_eq((repo_root() / 'settings.ini').exists(), True)
test_eq(data_dirs('/x')[0], Path('/x'))
test_eq(data_dirs()[-1], repo_root() / 'data')


# %% [markdown]
# ## Atomic writes
# A crash must never leave half a file: write to a temp file in the same folder, then rename.

# %% [markdown]
# Every file ns_vit writes goes through `atomic_save` (now in `ns_vit.training`, with its tests): written to a
# temporary file and renamed, so a crash never leaves half a file.

# %% [markdown]
# ## Tensor datasets in pixel space
# Every dataset ns_vit hands out yields `(image float32 in [0, 1] of shape (3, H, W), label)`; normalisation lives
# inside the model.

# %%
#| export
class UInt8Images(Dataset):
    "Images held as a uint8 tensor (N, H, W, C) with int labels; items are float [0, 1] (C, H, W)."
    def __init__(self, images: Tensor, labels: Tensor, classes: tuple[str, ...] = CIFAR10_CLASSES):
        if len(images) != len(labels): raise ValueError(f'{len(images)} images but {len(labels)} labels')
        self.images, self.labels, self.classes = images, labels.long(), classes
    def __len__(self) -> int: return len(self.images)
    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i].permute(2, 0, 1).float().div(255), int(self.labels[i])
    def tensors(self, idx=None) -> tuple[Tensor, Tensor]:
        "All (or `idx`) images as float (N, C, H, W) in [0, 1] with labels, in one go."
        idx = slice(None) if idx is None else idx
        return self.images[idx].permute(0, 3, 1, 2).float().div(255), self.labels[idx]
    def subset(self, n: int, seed: int = 0) -> 'UInt8Images':
        "A fixed random subset of `n` items (all if `n` is larger)."
        if n >= len(self): return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return UInt8Images(self.images[idx], self.labels[idx], self.classes)


# %%
_ds = UInt8Images(torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8), torch.arange(5))
x, y = _ds[1]
test_eq(x.shape, (3, 32, 32)); test_eq(y, 1); assert 0 <= x.min() and x.max() <= 1
test_eq(_ds.tensors()[0].shape, (5, 3, 32, 32)); test_eq(len(_ds.subset(3)), 3)
test_fail(lambda: UInt8Images(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), torch.arange(3)), contains='labels')


# %% [markdown]
# ## CIFAR-10 from any of its offline forms
# `cifar10` accepts, in each folder it searches: the JPEG archive `cifar10-jpeg.tar.gz` (decoded straight from the
# archive, no extraction needed), an ImageFolder tree `cifar10/{train,test}/<class>/*.jpg`, or torchvision's
# `cifar-10-batches-py`. With internet and none of these, it downloads with torchvision. Decoded uint8 tensors are
# cached (`ns_vit.cache`), so the second load takes well under a second. The entry is keyed on the source's content
# (the archive's or batch files' sha256, an image folder's file fingerprint) and the decoder's version, and verified
# on every read: a corrupted decoded cache is reported and decoded again, never served.
#
# A partial or damaged copy is refused, naming the file and the fix, instead of giving a number on fewer classes: the
# archive must have the known sha256, the archive and the batches the known counts (5,000 / 1,000 images per class), and
# a folder the same, non-zero number of images in every class (a balanced subset is a valid small test set).

# %%
#| export
def _decode(data: bytes | Path) -> np.ndarray:
    "Decode one image file to uint8 (H, W, 3)."
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im: return np.asarray(im.convert('RGB'))

def _from_archive(path: Path, split: str) -> tuple[Tensor, Tensor]:
    "Decode the `split` images of the CIFAR-10 JPEG archive without extracting it."
    imgs, labels = [], []
    with tarfile.open(path, 'r:gz') as tf:
        for m in tf:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 4 or parts[-3] != split or parts[-2] not in CIFAR10_CLASSES: continue
            imgs.append(_decode(tf.extractfile(m).read())); labels.append(CIFAR10_CLASSES.index(parts[-2]))
    return torch.from_numpy(np.stack(imgs)), torch.tensor(labels)

def _from_folder(path: Path) -> tuple[Tensor, Tensor]:
    "Decode an ImageFolder tree `<path>/<class>/*` with the CIFAR-10 class names."
    imgs, labels = [], []
    for c, name in enumerate(CIFAR10_CLASSES):
        for f in sorted((path / name).glob('*')):
            imgs.append(_decode(f)); labels.append(c)
    return torch.from_numpy(np.stack(imgs)), torch.tensor(labels)

def _from_batches(path: Path, split: str) -> tuple[Tensor, Tensor]:
    "Read torchvision's `cifar-10-batches-py` (pickled numpy arrays, read by torchvision)."
    from torchvision.datasets import CIFAR10
    ds = CIFAR10(str(path.parent), train=split == 'train', download=False)
    return torch.from_numpy(ds.data), torch.tensor(ds.targets)


# %%
#| export
def _locate_cifar10(split: str, root) -> tuple[str, Path] | None:
    "The first offline form of CIFAR-10 found in the searched folders, as (kind, path)."
    for d in data_dirs(root):
        for kind, p in (('archive', d / ARCHIVE_NAME), ('folder', d / 'cifar10' / split), ('folder', d / split),
                        ('batches', d / 'cifar-10-batches-py')):
            if p.exists() and (kind != 'folder' or all((p / c).is_dir() for c in CIFAR10_CLASSES)): return kind, p
    return None

def _download_cifar10(split: str) -> tuple[str, Path]:
    "Download with torchvision into `<repo>/data`, or fail with a message saying where ns_vit looked."
    dest = repo_root() / 'data'
    try:
        from torchvision.datasets import CIFAR10
        CIFAR10(str(dest), train=split == 'train', download=True)
    except Exception as e:
        looked = ', '.join(str(d) for d in data_dirs())
        raise FileNotFoundError(
            f'CIFAR-10 not found. Looked in: {looked} for {ARCHIVE_NAME}, cifar10/{split}/<class>/*.jpg or '
            f'cifar-10-batches-py, and the download failed ({type(e).__name__}). Put the data in one of these folders '
            'or set NS_VIT_DATA to the folder that holds it.') from None
    return 'batches', dest / 'cifar-10-batches-py'


# %%
#| export
CIFAR10_DECODER_VERSION = 1  # bump when decoding changes: decoded caches made by another version are stale
CIFAR10_PER_CLASS = {'train': 5000, 'test': 1000}  # images per class of the full data set
ARCHIVE_SHA256 = 'cb6c50520509605d4bd1856cb7eaba797dabcec3c19d93ce945b0ec1aee34a5f'  # of ARCHIVE_NAME (60,000 JPEGs)
_REFETCH = ('restore it from a good copy or point NS_VIT_DATA at the folder that holds one (the archive '
            f'{ARCHIVE_NAME}, an ImageFolder tree cifar10/{{train,test}}/<class>/, or cifar-10-batches-py)')

def _check_archive(path: Path) -> None:
    "Refuse a CIFAR-10 archive whose bytes are not those of the known archive (damaged, truncated or repacked)."
    if file_digest(path) != ARCHIVE_SHA256:
        raise ValueError(f'{path} is not the CIFAR-10 JPEG archive ns_vit knows: its sha256 {file_digest(path)[:12]}… is not '
                         f'{ARCHIVE_SHA256[:12]}… (damaged, truncated or repacked); {_REFETCH}')

def _check_counts(labels: Tensor, split: str, kind: str, path: Path) -> None:
    "Refuse a partial CIFAR-10: an archive or batches need 5,000/1,000 images per class, a folder the same number in every class."
    counts = torch.bincount(labels, minlength=len(CIFAR10_CLASSES)).tolist()
    want = CIFAR10_PER_CLASS[split]
    if (kind != 'folder' and counts != [want] * len(counts)) or min(counts) == 0 or len(set(counts)) > 1:
        per = ', '.join(f'{c} {k}' for c, k in zip(CIFAR10_CLASSES, counts))
        raise ValueError(f'CIFAR-10 {split} from {path} is incomplete: images per class {per} (the full set has {want:,} '
                         f'in each{"" if kind != "folder" else "; a folder needs the same number in every class"}); {_REFETCH}')

def _source_digest(kind: str, path: Path) -> str:
    "Content key of a CIFAR-10 source: the archive's sha256, the batch files' sha256s, or an image folder's fingerprint."
    if kind == 'archive': return file_digest(path)[:20]
    if kind == 'batches': return content_digest(*[(f.name, file_digest(f)) for f in sorted(path.glob('*_batch*'))])
    return folder_digest(path)

def cifar10(split: str = 'train', root: str | Path | None = None, download: bool = True) -> UInt8Images:
    "CIFAR-10 `split` ('train' | 'test') as a dataset of (float [0,1] (3,32,32), label); cached as uint8."
    if split not in ('train', 'test'): raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    found = _locate_cifar10(split, root)
    if found is None:
        if not download: raise FileNotFoundError(f'CIFAR-10 not found in {[str(d) for d in data_dirs(root)]}; '
                                                 'set NS_VIT_DATA to the folder that holds it.')
        found = _download_cifar10(split)
    kind, path = found
    if kind == 'archive': _check_archive(path)
    source = _source_digest(kind, path)
    decode = {'archive': lambda: _from_archive(path, split), 'folder': lambda: _from_folder(path),
              'batches': lambda: _from_batches(path, split)}[kind]
    d, _ = cached(cache_dir() / f'cifar10-{split}-{kind}-{source}.pt', lambda: dict(zip(('images', 'labels'), decode())),
                  meta=dict(split=split, kind=kind, source=source, decoder_version=CIFAR10_DECODER_VERSION))
    _check_counts(d['labels'], split, kind, path)
    return UInt8Images(d['images'], d['labels'])


# %% [markdown]
# Real CIFAR-10 (here from `$NS_VIT_DATA`, which the Makefile points at `../shared/data` when it exists):

# %%
import time
t0 = time.time(); test_ds = cifar10('test'); t1 = time.time(); test_ds2 = cifar10('test'); t2 = time.time()
test_eq(len(test_ds), 10_000); test_eq(test_ds[0][0].shape, (3, 32, 32))
test_eq(torch.bincount(test_ds.labels).tolist(), [1000] * 10)
test_eq(test_ds2.images, test_ds.images)
print(f'first load {t1 - t0:.1f}s, cached load {t2 - t1:.2f}s')

# %% [markdown]
# A tiny ImageFolder tree is read the same way, and a missing data path gets an error that says where ns_vit looked:

# %%
with tempfile.TemporaryDirectory() as d:
    for i, c in enumerate(CIFAR10_CLASSES):
        (Path(d) / 'cifar10' / 'test' / c).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), i * 20, np.uint8)).save(Path(d) / 'cifar10' / 'test' / c / '0.png')
    os.environ['NS_VIT_CACHE'] = str(Path(d) / 'cache')
    try:
        small = cifar10('test', root=d)
        test_eq(len(small), 10); test_eq(small.labels.tolist(), list(range(10)))
        test_eq(small.images[3, 0, 0].tolist(), [60, 60, 60])
        entry, = (Path(d) / 'cache').glob('cifar10-test-folder-*.pt')  # spoil the decoded cache: one byte of pixels
        b = bytearray(entry.read_bytes()); b[-1000] ^= 0xFF; entry.write_bytes(bytes(b))
        import warnings
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always'); again = cifar10('test', root=d)
        test_eq(again.images, small.images)  # decoded again, not served
        assert str(entry) in str(w[0].message) and 'sha256' in str(w[0].message), w[0].message
        Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(Path(d) / 'cifar10' / 'test' / 'cat' / '0.png')
        test_eq(cifar10('test', root=d).images[3, 0, 0].tolist(), [7, 7, 7])  # the source changed: a new key
        from unittest.mock import patch
        with patch.dict(os.environ, {'NS_VIT_DATA': str(Path(d) / 'nowhere')}), patch.dict(globals(), repo_root=lambda: Path(d)):
            test_fail(lambda: cifar10('test', root=Path(d) / 'nowhere', download=False), contains='NS_VIT_DATA')
        test_fail(lambda: cifar10('val'), contains="'train' or 'test'")
    finally: del os.environ['NS_VIT_CACHE']

# %%
# a partial CIFAR-10, as users have made them: 5 test classes with empty folders, classes of unequal size, and the
# archive with one bit flipped (a repacked or truncated archive fails the same way)
import shutil
with tempfile.TemporaryDirectory() as d:
    os.environ['NS_VIT_CACHE'] = str(Path(d) / 'cache')
    try:
        for i, c in enumerate(CIFAR10_CLASSES):
            (Path(d) / 'cifar10' / 'test' / c).mkdir(parents=True)
            for j in range(2 if i < 5 else 0): Image.fromarray(np.full((32, 32, 3), i, np.uint8)).save(Path(d) / 'cifar10' / 'test' / c / f'{j}.png')
        test_fail(lambda: cifar10('test', root=d), contains=f"CIFAR-10 test from {Path(d) / 'cifar10' / 'test'} is incomplete: images per class airplane 2")
        test_fail(lambda: cifar10('test', root=d), contains='dog 0')
        for c in CIFAR10_CLASSES[5:]: Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(Path(d) / 'cifar10' / 'test' / c / '0.png')
        test_fail(lambda: cifar10('test', root=d), contains='the same number in every class')  # 2 and 1 per class
        for c in CIFAR10_CLASSES[5:]: Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(Path(d) / 'cifar10' / 'test' / c / '1.png')
        test_eq(len(cifar10('test', root=d)), 20)  # a balanced subset is fine
        real = next(p for p in data_dirs() if (p / ARCHIVE_NAME).is_file()) / ARCHIVE_NAME
        (Path(d) / 'flip').mkdir(); bad = Path(d) / 'flip' / ARCHIVE_NAME
        shutil.copyfile(real, bad)
        with open(bad, 'r+b') as f: f.seek(5_000_000); b = f.read(1); f.seek(5_000_000); f.write(bytes([b[0] ^ 1]))
        test_fail(lambda: cifar10('test', root=Path(d) / 'flip'), contains=f'{bad} is not the CIFAR-10 JPEG archive ns_vit knows')
        test_fail(lambda: cifar10('test', root=Path(d) / 'flip'), contains='point NS_VIT_DATA at the folder that holds one')
        bad.write_bytes(real.read_bytes()[:1_000_000])  # a truncated download (once a bare EOFError)
        test_fail(lambda: cifar10('test', root=Path(d) / 'flip'), contains='(damaged, truncated or repacked)')
    finally: del os.environ['NS_VIT_CACHE']
test_eq(file_digest(real), ARCHIVE_SHA256)  # the real archive passes (it was loaded above)


# %% [markdown]
# ## ImageFolder data for ImageNet-scale work
# For ImageNet and its shifted sets (A, R, V2, Sketch, Stylized, C) ns_vit reads an ImageFolder tree with the
# model's own resize/crop (from timm's data config) but *without* normalisation: models take [0, 1] pixels.
# Class folders named by ImageNet wnids (`n01440764`, …) are labelled with their ImageNet-1k index, so a subset of
# ImageNet (Imagenette, a few classes of a fixture, 10% of the classes) keeps the labels of a 1000-class model and of
# the shifted sets, which are labelled the same way. Folders named by CIFAR-10 classes get their CIFAR-10 index, so a
# folder with only `cat/` and `dog/` is labelled 3 and 5, not 0 and 1. A folder that mixes known names with others is
# refused, naming the others (the model has no such class). Folders with no known names get their sorted position
# (torchvision's ImageFolder), and `labels='position'` forces that for named folders too (a model finetuned to only
# those classes).

# %%
#| export
def pixel_transform(img_size: int = 224, crop_pct: float = 0.875, interpolation: str = 'bicubic'):
    "Resize + centre crop + to-tensor in [0, 1] (timm's eval transform minus normalisation)."
    from torchvision import transforms as T
    mode = T.InterpolationMode(interpolation)
    return T.Compose([T.Resize(int(img_size / crop_pct), interpolation=mode), T.CenterCrop(img_size), T.ToTensor()])

def imagenet_class_index() -> dict[str, int]:
    "wnid → ImageNet-1k class index (timm's class list; empty where timm does not carry it)."
    global _INET_INDEX
    if _INET_INDEX is None:
        try:
            from timm.data import ImageNetInfo
            wnids = list(ImageNetInfo('imagenet-1k').label_names())
        except Exception: wnids = []
        _INET_INDEX = {w: i for i, w in enumerate(wnids)} if len(wnids) == 1000 else {}
    return _INET_INDEX
_INET_INDEX = None

class LabelMap:
    "A picklable target transform: folder position → model class (DataLoader workers can carry it)."
    def __init__(self, mapping: dict[int, int]): self.mapping = dict(mapping)
    def __call__(self, t: int) -> int: return self.mapping[t]

def folder_class_index(classes: list[str], labels: str = 'auto', where: str = 'the folder') -> dict[str, int]:
    "Model class of each class folder: by name where the names are known (CIFAR-10 classes, ImageNet wnids; 'auto'), else sorted positions."
    if labels not in ('auto', 'position'): raise ValueError(f"labels must be 'auto' or 'position', got {labels!r}")
    if labels == 'position': return {c: i for i, c in enumerate(classes)}
    for index, what in ((dict(zip(CIFAR10_CLASSES, range(10))), 'CIFAR-10 classes'), (imagenet_class_index(), 'ImageNet-1k wnids')):
        known = [c for c in classes if c in index]
        if not known: continue
        unknown = [c for c in classes if c not in index]
        if unknown: raise ValueError(f'{where} has class folders {unknown} that are not {what}, beside {len(known)} that are '
                                     f'({known[0]}, …): a model of those classes has no such class. Remove those folders, or '
                                     'map every folder to a model class yourself (class_to_idx)')
        return {c: index[c] for c in classes}
    return {c: i for i, c in enumerate(classes)}

def image_folder(root: str | Path, img_size: int = 224, crop_pct: float = 0.875, class_to_idx: dict | None = None, *,
                 labels: str = 'auto'):
    "An ImageFolder dataset of [0, 1] images; wnid folders get ImageNet-1k labels; `class_to_idx` maps folders otherwise."
    from torchvision.datasets import ImageFolder
    root = Path(root).expanduser()
    if not root.is_dir(): raise FileNotFoundError(f'ImageFolder root {root} does not exist: pass the folder that '
                                                  'holds one sub-folder per class.')
    ds = ImageFolder(str(root), transform=pixel_transform(img_size, crop_pct))
    if len(ds) == 0: raise ValueError(f'no images found under {root}')
    class_to_idx = class_to_idx if class_to_idx is not None else folder_class_index(ds.classes, labels, f'ImageFolder {root}')
    remap = {ds.class_to_idx[k]: v for k, v in class_to_idx.items() if k in ds.class_to_idx}
    if any(k != v for k, v in remap.items()): ds.target_transform = LabelMap(remap)
    return ds


# %%
with tempfile.TemporaryDirectory() as d:
    for c in ('n01', 'n02'):
        (Path(d) / c).mkdir()
        for j in range(2): Image.fromarray(np.full((40, 50, 3), 100, np.uint8)).save(Path(d) / c / f'{j}.jpg')
    ds = image_folder(d, img_size=32)
    test_eq(len(ds), 4); test_eq(ds[0][0].shape, (3, 32, 32)); assert ds[0][0].max() <= 1
    test_eq(image_folder(d, 32, class_to_idx={'n01': 7, 'n02': 9})[3][1], 9)
    test_eq([y for _, y in image_folder(d, 32)], [0, 0, 1, 1])  # folders that are not wnids: sorted positions
    test_fail(lambda: image_folder(Path(d) / 'missing'), contains='does not exist')
test_eq(len(imagenet_class_index()), 1000)  # the pinned timm carries ImageNet-1k's class list
with tempfile.TemporaryDirectory() as d:  # a subset of ImageNet (Imagenette's tench, springer, cassette player)
    for c in ('n01440764', 'n02102040', 'n02979186'):
        (Path(d) / c).mkdir(); Image.fromarray(np.full((40, 50, 3), 100, np.uint8)).save(Path(d) / c / '0.jpg')
    test_eq([y for _, y in image_folder(d, 32)], [0, 217, 482])  # ImageNet-1k labels, as the shifted sets have
    test_eq([y for _, y in image_folder(d, 32, labels='position')], [0, 1, 2])
    import pickle; test_eq(pickle.loads(pickle.dumps(image_folder(d, 32)))[2][1], 482)  # picklable for DataLoader workers

# %%
# folders named by CIFAR-10 classes keep their CIFAR-10 labels (a cat/ + dog/ folder once scored 1.5% with labels 0 and
# 1); class folders the model does not have are refused, naming them (two extra folders once gave 55.8% without a word)
with tempfile.TemporaryDirectory() as d:
    for c in ('cat', 'dog'):
        (Path(d) / c).mkdir(); Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(Path(d) / c / '0.png')
    test_eq([y for _, y in image_folder(d, 32)], [3, 5])
    test_eq([y for _, y in image_folder(d, 32, labels='position')], [0, 1])
    for c in ('giraffe', 'zebra'):
        (Path(d) / c).mkdir(); Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(Path(d) / c / '0.png')
    test_fail(lambda: image_folder(d, 32), contains=f"ImageFolder {d} has class folders ['giraffe', 'zebra'] that are not CIFAR-10 classes")
    test_eq([y for _, y in image_folder(d, 32, class_to_idx={'cat': 3, 'dog': 5, 'giraffe': 0, 'zebra': 1})], [3, 5, 0, 1])
    test_fail(lambda: folder_class_index(['n01440764', 'n99999999']), contains="['n99999999'] that are not ImageNet-1k wnids")


# %% [markdown]
# ## Batches
# Training and evaluation draw whole batches of tensors rather than going through a DataLoader (the CIFAR-10
# tensors fit in memory), with the usual CIFAR augmentation applied to the batch.

# %%
#| export
def augment(x: Tensor, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None) -> Tensor:
    "Random crop with zero padding `pad` and horizontal flip, per image, on a batch (B, C, H, W)."
    B, C, H, W = x.shape
    dev = x.device
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    i = torch.randint(0, 2 * pad + 1, (B,), generator=generator).to(dev)
    j = torch.randint(0, 2 * pad + 1, (B,), generator=generator).to(dev)
    rows = (i[:, None] + torch.arange(H, device=dev)[None])  # (B, H)
    cols = (j[:, None] + torch.arange(W, device=dev)[None])  # (B, W)
    out = xp[torch.arange(B, device=dev)[:, None, None, None], torch.arange(C, device=dev)[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)
    if flip:
        f = (torch.rand(B, generator=generator) < 0.5).to(dev)
        out = torch.where(f[:, None, None, None], out.flip(-1), out)
    return out


# %%
xb = torch.rand(6, 3, 32, 32)
test_eq(augment(xb, pad=0, flip=False), xb)
xa = augment(xb, generator=torch.Generator().manual_seed(0))
test_eq(xa.shape, xb.shape)
assert not torch.equal(xa, xb)


# %% [markdown]
# ## One entry point for experiments
# Experiment notebooks take a `dataset` parameter: `'cifar10'` (the embedded default) or the path of an
# ImageFolder root with `train/` and `val/` (or `test/`) sub-folders, e.g. ImageNet. `load_images` returns a fixed,
# seeded sample as tensors.

# %%
#| export
def load_images(dataset: str = 'cifar10', split: str = 'test', n: int | None = None, seed: int = 0,
                img_size: int = 224, crop_pct: float = 0.875) -> tuple[Tensor, Tensor]:
    "A seeded sample of `n` images (float (n, C, H, W) in [0, 1]) and labels from `dataset` ('cifar10' or a folder)."
    if dataset == 'cifar10':
        ds = cifar10(split)
        return ds.subset(n if n is not None else len(ds), seed).tensors()
    root = Path(dataset).expanduser()
    sub = next((root / s for s in ((split,) if split == 'train' else (split, 'val', 'test')) if (root / s).is_dir()), root)
    ds = image_folder(sub, img_size, crop_pct)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n or len(ds)]
    xs, ys = zip(*(ds[int(i)] for i in idx))
    return torch.stack(xs), torch.tensor(ys)


# %%
x, y = load_images('cifar10', 'test', n=20, seed=0)
test_eq(x.shape, (20, 3, 32, 32)); test_eq(load_images('cifar10', 'test', n=20, seed=0)[1], y)
with tempfile.TemporaryDirectory() as d:
    for c in ('a', 'b'):
        (Path(d) / 'val' / c).mkdir(parents=True)
        for j in range(3): Image.fromarray(np.full((40, 40, 3), 50, np.uint8)).save(Path(d) / 'val' / c / f'{j}.png')
    xf, yf = load_images(d, 'val', n=4, img_size=32)
    test_eq(xf.shape, (4, 3, 32, 32)); assert set(yf.tolist()) <= {0, 1}
