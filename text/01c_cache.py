# %% [markdown]
# # Caches
# > One cache mechanism for everything ns_vit computes once and reuses: keys from content, entries that check themselves.

# %%
#| default_exp cache

# %%
#| export
from __future__ import annotations
import hashlib, io, json, os, warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Callable
import numpy as np
import torch
from torch import Tensor
from ns_vit.training import atomic_save, clean_tmp, file_lock

# %%
from fastcore.test import test_eq, test_ne, test_fail
import tempfile


# %% [markdown]
# ns_vit caches evaluation results, corrupted image sets, the DamageNet-style transfer set and decoded datasets. A
# cache that serves a wrong number is worse than none, so every cache here follows four rules:
#
# 1. **The key is the content** of everything that determines the result (the images and labels, a generated set's
#    files, the model's weights) and a version of the code that computed it, never a file *path*: repair a data file
#    and the old result is no longer found; bump a generator's version and every entry made by the old one is stale.
# 2. **Every entry checks itself**: it stores the sha256 of its payload, verified on every read. A truncated, edited or
#    bit-flipped entry is reported (a `CacheWarning` naming the file) and recomputed, never served.
# 3. **Writes are atomic** (`training.atomic_save`: a temp file, then a rename) and one process computes an entry while
#    others wait for it (`training.file_lock`, one lock file per entry).
# 4. **Orphans are cleaned**: temp files left by a killed writer are removed (`training.clean_tmp`) whenever the folder
#    is used.
#
# The API is small: `content_digest` / `file_digest` / `folder_digest` make keys, `save_entry` / `load_entry` write and
# verify one entry, `cached` is the get-or-compute that callers use, `verify_file` checks a large file against the
# sha256 a manifest holds (the corruption arrays, which are memory-mapped and too large for one entry).

# %% [markdown]
# ## Keys from content

# %%
#| export
class CacheWarning(UserWarning):
    "A cache entry was unusable (corrupt, truncated or stale: it is regenerated) or could not be written (the value is returned uncached)."

def _feed(h, x) -> None:
    "Feed `x` into hash `h` with a type tag, so different values never give the same byte stream."
    if isinstance(x, Tensor):
        x = x.detach().cpu().contiguous()
        h.update(f'T{x.dtype}{tuple(x.shape)}'.encode()); h.update(x.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x); h.update(f'A{x.dtype.str}{x.shape}'.encode()); h.update(x.reshape(-1).view(np.uint8).data)
    elif isinstance(x, bytes): h.update(f'B{len(x)}:'.encode()); h.update(x)
    elif isinstance(x, str): b = x.encode(); h.update(f'S{len(b)}:'.encode()); h.update(b)
    elif x is None or isinstance(x, (bool, int, float, np.integer, np.floating)): h.update(f'N{x!r};'.encode())
    elif isinstance(x, dict):
        h.update(f'D{len(x)}:'.encode())
        for k in sorted(x, key=str): _feed(h, str(k)); _feed(h, x[k])
    elif isinstance(x, (list, tuple)):
        h.update(f'L{len(x)}:'.encode())
        for v in x: _feed(h, v)
    elif isinstance(x, Path): raise TypeError(f'content_digest got the path {x}: key on its content (file_digest or folder_digest)')
    else: raise TypeError(f'content_digest cannot hash a {type(x).__name__}')

def content_digest(*parts, length: int = 20) -> str:
    "Hex sha256 of `parts` (tensors, arrays, bytes, strings, numbers, dicts and lists of them), cut to `length`."
    h = hashlib.sha256()
    _feed(h, list(parts))
    return h.hexdigest()[:length]


# %%
x = torch.arange(6).view(2, 3)
test_eq(content_digest(x, 'clean', {'n': 2}), content_digest(x.clone(), 'clean', {'n': 2}))
test_ne(content_digest(x), content_digest(x.float()))          # same values, another dtype
test_ne(content_digest(x), content_digest(x.view(3, 2)))       # same bytes, another shape
test_ne(content_digest('ab', 'c'), content_digest('a', 'bc'))  # parts never run together
test_eq(content_digest({'a': 1, 'b': 2}), content_digest({'b': 2, 'a': 1}))
test_eq(content_digest(torch.ones(2, dtype=torch.bfloat16)) != content_digest(torch.ones(2, dtype=torch.float16)), True)
test_fail(lambda: content_digest(Path('data/cifar10')), contains='key on its content')  # a path is not content

# %% [markdown]
# Files are keyed on their bytes. `file_digest` streams the file and remembers the digest for the process while its
# size, modification time and inode stay the same, so a released CIFAR-10-C file (150 MB) is read once per process.
# Image *folders* (ImageNet's validation set, ImageNet-C's 3.75 million files) are keyed on a fingerprint of every file's
# relative path, size and modification time: hashing 60 GB on every lookup would cost more than the evaluation it
# saves. A file replaced or edited in place changes its size or time, so the fingerprint changes with it.

# %%
#| export
_FILE_DIGESTS: dict[tuple, str] = {}

def file_digest(path: str | Path) -> str:
    "Hex sha256 of a file's bytes (streamed; remembered while its size, mtime and inode are unchanged)."
    path = Path(path).expanduser().resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, 'rb') as f:
            while chunk := f.read(1 << 22): h.update(chunk)
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]

def folder_digest(root: str | Path, length: int = 20) -> str:
    "A fingerprint of every file under `root`: relative path, size and mtime (a file's digest if `root` is a file)."
    root = Path(root).expanduser()
    if root.is_file(): return file_digest(root)[:length]
    if not root.is_dir(): raise FileNotFoundError(f'{root} does not exist')
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            p = Path(dirpath) / f; st = p.stat()
            h.update(f'{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    return h.hexdigest()[:length]


# %%
with tempfile.TemporaryDirectory() as d:
    f = Path(d) / 'a' / 'x.bin'; f.parent.mkdir(); f.write_bytes(b'abc')
    test_eq(file_digest(f), hashlib.sha256(b'abc').hexdigest())
    before = folder_digest(d)
    f.write_bytes(b'abd'); os.utime(f, ns=(1, 1))
    test_eq(file_digest(f), hashlib.sha256(b'abd').hexdigest())  # edited: read again
    test_ne(folder_digest(d), before)
    test_fail(lambda: folder_digest(Path(d) / 'missing'), contains='does not exist')

# %% [markdown]
# ## Entries that check themselves
# An entry is one file: a magic line, a JSON header line (format, payload size, payload sha256, and `meta`: the readable
# inputs the key was made from) and the payload, a `torch.save` of tensors, numbers, strings, lists and dicts, read back
# with `weights_only=True` (nothing is unpickled). `load_entry` returns `None` for a missing entry, and also, with a
# `CacheWarning` that names the file and what is wrong, for a corrupt, truncated or stale one (stale: its stored `meta`
# differs from the one expected, e.g. made by another generator version).

# %%
#| export
ENTRY_FORMAT = 1  # layout of an entry file; entries of another format are stale
_MAGIC = b'NS_VIT-CACHE\n'

def jsonable(meta: dict | None) -> dict:
    "`meta` as it reads back from JSON (tuples become lists), so stored and expected compare equal."
    return json.loads(json.dumps(meta or {}, sort_keys=True, default=str))

def save_entry(obj, path: str | Path, *, meta: dict | None = None) -> Path:
    "Write `obj` (tensors, numbers, strings, lists, dicts) to the cache entry `path` atomically, with its sha256 and `meta`."
    buf = io.BytesIO(); torch.save(obj, buf); payload = buf.getvalue()
    head = json.dumps(dict(format=ENTRY_FORMAT, size=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
                           meta=jsonable(meta)), sort_keys=True).encode() + b'\n'
    def write(_, p):
        with open(p, 'wb') as f: f.write(_MAGIC); f.write(head); f.write(payload)
    return atomic_save(None, path, write)

def _problem(raw: bytes, meta: dict | None) -> tuple[str | None, bytes]:
    "(what is wrong with the entry bytes `raw`, or None; the payload)."
    if not raw.startswith(_MAGIC): return 'is not an ns_vit cache entry (or is corrupt)', b''
    line, _, payload = raw[len(_MAGIC):].partition(b'\n')
    try: head = json.loads(line)
    except ValueError: return 'has an unreadable header (corrupt)', b''
    if head.get('format') != ENTRY_FORMAT: return f"has format {head.get('format')}, not {ENTRY_FORMAT} (stale)", b''
    if len(payload) != head.get('size'): return f"is truncated ({len(payload)} of {head.get('size')} bytes)", b''
    if hashlib.sha256(payload).hexdigest() != head.get('sha256'): return 'does not match its sha256 (corrupt)', b''
    if meta is not None and head.get('meta') != jsonable(meta):
        stored, want = head.get('meta') or {}, jsonable(meta)
        diff = sorted(k for k in set(stored) | set(want) if stored.get(k) != want.get(k))
        return f'is stale (made with other {diff})', b''
    return None, payload

def load_entry(path: str | Path, *, meta: dict | None = None, quiet: bool = False):
    "The object in cache entry `path`; None if missing, or (with a `CacheWarning` naming it unless `quiet`) corrupt, truncated or stale."
    path = Path(path)
    try: raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError): return None
    why, payload = _problem(raw, meta)
    if why is None:
        try: return torch.load(io.BytesIO(payload), weights_only=True)
        except Exception as e: why = f'cannot be loaded ({type(e).__name__})'
    if not quiet: warnings.warn(f'cache entry {path} {why}: regenerating it', CacheWarning, stacklevel=2)
    return None


# %%
def flip(path: Path, at: int = -20):  # one bit of one byte, the header left intact
    b = bytearray(path.read_bytes()); b[at] ^= 1; path.write_bytes(bytes(b))

with tempfile.TemporaryDirectory() as d:
    p = save_entry({'correct': torch.tensor([True, False, True]), 'n': 3}, Path(d) / 'e.pt', meta={'v': 1})
    test_eq(load_entry(p, meta={'v': 1})['correct'], torch.tensor([True, False, True]))
    test_eq(load_entry(Path(d) / 'missing.pt'), None)  # missing: silently None
    for name, spoil in [('corrupt', flip), ('truncated', lambda f: f.write_bytes(f.read_bytes()[:-7])),
                        ('not an ns_vit', lambda f: f.write_bytes(b'PK\x03\x04 a torch zip'))]:
        save_entry({'x': torch.ones(3)}, p); spoil(p)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always'); test_eq(load_entry(p), None)
        assert str(p) in str(w[0].message) and name in str(w[0].message) and w[0].category is CacheWarning, w[0].message
    save_entry(1, p, meta={'generator_version': 1, 'n': 3})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); test_eq(load_entry(p, meta={'generator_version': 2, 'n': 3}), None)
    assert "stale (made with other ['generator_version'])" in str(w[0].message), w[0].message


# %% [markdown]
# ## Get or compute
# `cached(path, compute, meta=...)` is what callers use: under the entry's lock it cleans orphaned temp files in the
# folder, serves a good entry, or computes, saves and returns a fresh one. It returns `(value, served_from_cache)`.
#
# Faults keep work. A good entry is served before any lock is taken (entries are replaced by rename, so a reader
# never sees half of one): a read-only cache can be read. A value that cannot be stored (read-only or full disk, a
# cache folder that is a file) is returned all the same, with a `CacheWarning` naming the path and what to change.

# %%
#| export
def _unstored(path: Path, e: OSError) -> None:
    "Warn that the entry `path` could not be written: its value is returned but not kept."
    why = e.strerror or str(e)  # atomic_save's message already names the path and the fix
    if not why.startswith('cannot write'):
        why = f'cannot write {path} ({why}): free space or make its folder writable, or set NS_VIT_CACHE to another folder'
    warnings.warn(f'{why}; the result is returned but not cached', CacheWarning, stacklevel=3)

def cached(path: str | Path, compute: Callable[[], object], *, meta: dict | None = None) -> tuple[object, bool]:
    "(value, True) from the verified cache entry `path`, else (compute(), False) after saving it; one writer at a time."
    path = Path(path)
    value = load_entry(path, meta=meta, quiet=True)  # no lock to read: entries are replaced atomically
    if value is not None: return value, True
    with ExitStack() as stack:
        try: stack.enter_context(file_lock(path.parent, f'.{path.name}.lock', what=f'the cache entry {path.name} (being computed)'))
        except TimeoutError: raise
        except OSError as e:  # the folder cannot hold a lock file (read-only, full, not a folder): compute alone
            value = compute(); _unstored(path, e); return value, False
        clean_tmp(path.parent)
        value = load_entry(path, meta=meta)
        if value is not None: return value, True
        value = compute()
        try: save_entry(value, path, meta=meta)
        except OSError as e: _unstored(path, e)
        return value, False

def verify_file(path: str | Path, sha256: str | None) -> str | None:
    "Why the file `path` cannot be used as the one a manifest recorded with `sha256` (None if it can)."
    path = Path(path)
    if not path.is_file(): return f'{path.name} is missing'
    if sha256 is None or file_digest(path) != sha256: return f'{path.name} does not match its sha256 (edited or corrupt)'
    return None


# %%
calls = []
def compute(): calls.append(1); return {'value': torch.tensor(0.5)}
with tempfile.TemporaryDirectory() as d:
    p = Path(d) / 'k.pt'
    test_eq(cached(p, compute, meta={'v': 1})[1], False); test_eq(cached(p, compute, meta={'v': 1})[1], True)
    test_eq(len(calls), 1)
    flip(p)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); value, hit = cached(p, compute, meta={'v': 1})
    test_eq((hit, len(calls), float(value['value'])), (False, 2, 0.5)); assert 'corrupt' in str(w[0].message)
    test_eq(cached(p, compute, meta={'v': 1})[1], True)  # repaired on disk
    test_eq(verify_file(p, file_digest(p)), None); assert 'sha256' in verify_file(p, '0' * 64)

# %%
# a read-only cache is read: serving an entry creates no lock file and writes nothing in its folder
with tempfile.TemporaryDirectory() as d:
    p = Path(d) / 'k.pt'
    cached(p, compute, meta={'v': 1})
    for f in Path(d).glob('.*.lock'): f.unlink()
    before = sorted(Path(d).iterdir())
    if os.geteuid() != 0: os.chmod(d, 0o555)  # as root, a read-only mode stops nothing: the listing below is the test
    try: test_eq(cached(p, lambda: 1 / 0, meta={'v': 1})[1], True)
    finally: os.chmod(d, 0o755)
    test_eq(sorted(Path(d).iterdir()), before)

# a metric whose entry cannot be written is still returned, with a warning naming the path and the fix:
# a cache "folder" that is a file (no lock file possible), and a disk that fills up during the write
import errno
with tempfile.TemporaryDirectory() as d:
    (Path(d) / 'file').write_text('not a folder')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); value, hit = cached(Path(d) / 'file' / 'k.pt', compute, meta={'v': 1})
    test_eq((float(value['value']), hit), (0.5, False))
    assert str(w[0].message).startswith(f"cannot write {Path(d) / 'file' / 'k.pt'} (") and 'NS_VIT_CACHE' in str(w[0].message), w[0].message
    assert str(w[0].message).endswith('the result is returned but not cached')
    def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')
    keep, save_entry = save_entry, full  # the disk fills up
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always'); value, hit = cached(Path(d) / 'k.pt', compute, meta={'v': 1})
    finally: save_entry = keep
    test_eq((float(value['value']), hit), (0.5, False))
    assert str(w[0].message).startswith(f"cannot write {Path(d) / 'k.pt'} (No space left on device): free space"), w[0].message
    assert not (Path(d) / 'k.pt').exists()

