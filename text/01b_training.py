# %% [markdown]
# # Training utilities
# > The pieces every training loop shares: atomic writes, the learning-rate schedule, seeds, run folders and ranks.
#
# Also the per-step batch loader that feeds a GPU.
#

# %%
#| default_exp training

# %%
#| export
from __future__ import annotations
import errno, hashlib, json, math, os, re, socket, sys, tempfile, time, warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator
import torch
from torch import Tensor
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

# %%
from fastcore.test import test_eq, test_close, test_fail

# %% [markdown]
# ## Atomic writes
# Every file ns_vit writes (checkpoints, run states, caches, reports) goes through `atomic_save`: written to a
# temporary file in the same folder, then renamed, so a crash (or `kill -9`) never leaves half a file. The temporary
# name carries the writer's host and process id (`.<name>.<host>-<pid>.<random>.tmp`), so `clean_tmp` can tell an
# orphan (its process is gone, or it is older than a day) from a file another process is still writing. The file gets
# the usual mode (0666 minus the umask) after the saver ran: some savers (safetensors) create their file 0600.

# %%
#| export
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]  # tags temp files with their writer's host
_TMP = re.compile(r'^\.(?P<name>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)\.[^.]+\.tmp$')

def _unwritable(path: Path, e: Exception) -> OSError:
    "An OSError that names `path`, why it could not be written, and what to change."
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
    m = re.search(r'os error (\d+)', str(e))  # safetensors' wording of an OS error
    code = getattr(e, 'errno', None) or (int(m[1]) if m else errno.EIO)
    return OSError(code, f'cannot write {path} ({why}): free space on its disk or make '
                   f'{path.parent} writable, or write elsewhere (caches: NS_VIT_CACHE; runs and checkpoints: the out or path passed)')

def atomic_save(obj, path: str | Path, saver=torch.save) -> Path:
    "Write `obj` to `path` with `saver(obj, tmp_path)` then rename, so readers never see a partial file; a full or read-only disk gets an OSError naming `path`."
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.{_HOST}-{os.getpid()}.', suffix='.tmp')
    except OSError as e: raise _unwritable(path, e) from e
    os.close(fd)
    umask = os.umask(0); os.umask(umask)
    try:
        saver(obj, tmp)
        os.chmod(tmp, 0o666 & ~umask)  # after the saver: mkstemp and some savers (safetensors) make 0600 files
        os.replace(tmp, path)
    except OSError as e: raise _unwritable(path, e) from e
    except Exception as e:  # savers wrap a full disk in their own errors: torch.save's "[enforce fail at inline_container.cc:672]
        # . unexpected pos …", safetensors' "Error while serializing: I/O error: No space left on device (os error 28)"
        if any(s in str(e) for s in ('inline_container', 'PytorchStreamWriter', '(os error')): raise _unwritable(path, e) from e
        raise
    finally:
        if os.path.exists(tmp): os.remove(tmp)
    return path

def _alive(pid: int) -> bool:
    "True if process `pid` exists on this host."
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    except PermissionError: return True  # someone else's process
    return True

def clean_tmp(folder: str | Path, *, max_age_s: float = 86400, recursive: bool = False) -> list[Path]:
    "Remove orphaned `atomic_save` temp files in `folder`: their process on this host is gone, or older than `max_age_s`."
    folder, removed = Path(folder), []
    if not folder.is_dir(): return removed
    for f in (folder.rglob('.*.tmp') if recursive else folder.glob('.*.tmp')):
        m = _TMP.match(f.name)
        try: age = time.time() - f.stat().st_mtime
        except FileNotFoundError: continue  # renamed by its writer meanwhile
        dead = m is not None and m['host'] == _HOST and not _alive(int(m['pid']))
        if dead or age > max_age_s:
            f.unlink(missing_ok=True); removed.append(f)
    return removed


# %%
with tempfile.TemporaryDirectory() as d:
    p = atomic_save({'a': torch.ones(2)}, Path(d) / 'x.pt')
    test_eq(torch.load(p, weights_only=True)['a'], torch.ones(2))
    test_eq([f.name for f in Path(d).iterdir()], ['x.pt'])  # no temp file left behind
    def failing(o, p): Path(p).write_text('half'); raise RuntimeError('crash while writing')
    test_fail(lambda: atomic_save(1, Path(d) / 'x.pt', failing), contains='crash')
    test_eq(torch.load(p, weights_only=True)['a'], torch.ones(2))  # the old file survives a failed write
    test_eq([f.name for f in Path(d).iterdir()], ['x.pt'])
    def private(o, p): os.remove(p); fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o600); os.write(fd, b'x'); os.close(fd)
    umask = os.umask(0o022); atomic_save(None, Path(d) / 'y.bin', private); os.umask(umask)
    test_eq(oct(os.stat(Path(d) / 'y.bin').st_mode & 0o777), '0o644')  # a 0600 saver still gives 0644 under umask 022

# %%
# a full disk: torch.save's and safetensors' own errors (recorded on a 64 kB tmpfs) and a plain ENOSPC become an OSError naming the path
# and what to change; the old file survives and no temp file is left
with tempfile.TemporaryDirectory() as d:
    p = atomic_save({'a': torch.ones(2)}, Path(d) / 'x.pt')
    def torch_full(o, p): Path(p).write_bytes(b'half'); raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534')
    def os_full(o, p): raise OSError(errno.ENOSPC, 'No space left on device')
    from safetensors import SafetensorError
    def st_full(o, p): raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
    for saver, why in ((torch_full, '[enforce fail at inline_container.cc:672]'), (os_full, 'No space left on device'),
                       (st_full, 'Error while serializing: I/O error: No space left on device (os error 28)')):
        test_fail(lambda: atomic_save(1, p, saver), contains=f'cannot write {p} ({why}')
        test_fail(lambda: atomic_save(1, p, saver), contains='free space on its disk')
        test_eq(torch.load(p, weights_only=True)['a'], torch.ones(2)); test_eq([f.name for f in Path(d).iterdir()], ['x.pt'])
    (Path(d) / 'file').write_text('x')  # a path under a file (as under a read-only folder: nothing can be created there)
    test_fail(lambda: atomic_save(1, Path(d) / 'file' / 'y.pt'), contains=f"cannot write {Path(d) / 'file' / 'y.pt'} (")


# %% [markdown]
# A `kill -9` during a write leaves the temp file behind. `clean_tmp` removes it once its process is gone (or it is
# a day old), and leaves alone the temp file of a process that is still writing:

# %%
import subprocess, sys
with tempfile.TemporaryDirectory() as d:
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    orphan = Path(d) / f'.x.pt.{_HOST}-{int(dead.stdout)}.abcd1234.tmp'; orphan.write_bytes(b'half')
    mine = Path(d) / f'.y.pt.{_HOST}-{os.getpid()}.abcd1234.tmp'; mine.write_bytes(b'half')
    old = Path(d) / '.z.pt.q1w2e3r4.tmp'; old.write_bytes(b'half'); os.utime(old, (0, 0))  # an old-style name, 1970
    test_eq(sorted(f.name for f in clean_tmp(d)), sorted([orphan.name, old.name]))
    test_eq([f.name for f in Path(d).iterdir()], [mine.name])  # a live writer's file stays


# %% [markdown]
# ## Schedule and seeds

# %%
#| export
def cosine_lr(step: int, total: int, warmup: int) -> float:
    "Learning-rate multiplier: linear warm-up for `warmup` steps, then cosine decay to 0 at `total`."
    if step < warmup: return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

def seed_of(*parts: int) -> int:
    "A 48-bit seed derived from `parts` (run seed, step, round, ...): independent streams without collisions."
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:12], 16)


# %%
test_close(cosine_lr(0, 100, 10), 0.1); test_close(cosine_lr(10, 100, 10), 1.0); test_close(cosine_lr(100, 100, 10), 0.0)
test_eq(seed_of(0, 1), seed_of(0, 1)); assert seed_of(0, 1) != seed_of(1, 0)


# %% [markdown]
# ## Ranks and run folders
#
# Processes that share a run folder or a cache entry take turns through `file_lock`. A process that has to wait says at
# once what it waits for and which process holds the lock (its pid from `/proc/locks`, and whether it is stopped, as
# after Ctrl-Z), and gives up after `NS_VIT_LOCK_TIMEOUT` seconds (default 6 hours: a run that another worker is
# training is worth waiting for) with a `TimeoutError` naming the holder, instead of hanging silently.

# %%
#| export
def rank_world() -> tuple[int, int]:
    "(rank, world size); (0, 1) outside torch.distributed."
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)

def claim_run_dir(run_dir: str | Path, spec: dict) -> Path:
    "Create `run_dir` for `spec`, or check that the run already in it was made with the same spec."
    run_dir = Path(run_dir); run_dir.mkdir(parents=True, exist_ok=True)
    f = run_dir / 'run.json'
    old, new = (json.loads(f.read_text()) if f.exists() else None), json.loads(json.dumps(spec))
    if old is not None and old != new:
        flat = lambda d: {f'{k}.{q}': w for k, v in d.items() for q, w in (v.items() if isinstance(v, dict) else [('', v)])}
        a, b = flat(old), flat(new)
        diff = ', '.join(f"{k.rstrip('.')}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        raise ValueError(f'{run_dir} holds a run with other parameters ({diff}; see {f}): resume it with its own '
                         'parameters, pass another `out`, or delete the folder')
    if rank_world()[0] == 0: atomic_save(spec, f, lambda o, p: Path(p).write_text(json.dumps(o, indent=2)))
    return run_dir

LOCK_TIMEOUT_S = 6 * 3600.0  # how long a lock is waited for before giving up; `NS_VIT_LOCK_TIMEOUT` (seconds) overrides

def lock_holder(path: str | Path) -> str:
    "Who holds the flock on `path`: 'pid N' (from /proc/locks; Linux), and whether it is stopped; else 'another process'."
    try:
        st = os.stat(path); dev = f'{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}'
        pid = next(int(f[4]) for f in map(str.split, open('/proc/locks')) if len(f) > 5 and f[1] == 'FLOCK' and f[5] == dev)
    except (OSError, StopIteration, ValueError): return 'another process'
    try: stopped = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] in 'Tt'
    except (OSError, IndexError): stopped = False
    return f'pid {pid}' + (f' (stopped, e.g. by Ctrl-Z: resume it with `kill -CONT {pid}`, or end it)' if stopped else '')

def path_under(p: str | Path, root: str | Path) -> str | None:
    "`p` relative to `root` as a posix string, trying the paths as written and as resolved (symlinks); None if outside."
    p, root = Path(p), Path(root)
    for a, b in ((Path(os.path.abspath(p)), Path(os.path.abspath(root))), (p.resolve(), root.resolve())):
        if a.is_relative_to(b): return a.relative_to(b).as_posix()
    return None

def shown_path(p: str | Path) -> str:
    "`p` for a message that may land in an executed notebook: relative to the working folder when inside it, else under `$NS_VIT_CACHE` or `~` named so, else as given."
    rel = path_under(p, Path.cwd())
    if rel is not None: return rel
    for name, root in (('$NS_VIT_CACHE', os.environ.get('NS_VIT_CACHE')), ('~', Path.home())):  # a cache outside the repo (make reports' workers share it)
        rel = path_under(p, Path(root).expanduser()) if root else None
        if rel is not None: return name if rel == '.' else f'{name}/{rel}'
    return str(p)

@contextmanager
def file_lock(folder: str | Path, name: str = '.lock', *,
              what: str = '',  # what the lock guards, for the messages (default: the folder)
              timeout: float | None = None,  # seconds to wait before giving up; None: `NS_VIT_LOCK_TIMEOUT` or LOCK_TIMEOUT_S
              ):
    "An exclusive lock on `folder` (file `name` in it): another process asking for it says whom it waits for, and gives up after `timeout`."
    try: import fcntl
    except ImportError: yield; return  # no POSIX locks (Windows): nothing is shared between processes there
    Path(folder).mkdir(parents=True, exist_ok=True)
    path, what = Path(folder) / name, what or shown_path(folder)
    timeout = float(os.environ.get('NS_VIT_LOCK_TIMEOUT', LOCK_TIMEOUT_S)) if timeout is None else timeout
    def take() -> bool:
        try: fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB); return True
        except BlockingIOError: return False
    with open(path, 'a') as fh:
        if not take():
            print(f'waiting for {what}: {shown_path(path)} is locked by {lock_holder(path)}; giving up after {timeout:g} s '
                  '(NS_VIT_LOCK_TIMEOUT)', file=sys.stderr, flush=True)
            t0 = time.monotonic()
            while not take():
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f'gave up waiting for {what} after {timeout:g} s: {path} is still locked by '
                                       f'{lock_holder(path)}; let it finish, end it, or set NS_VIT_LOCK_TIMEOUT (seconds) higher')
                time.sleep(0.2)
        try: yield
        finally: fcntl.flock(fh, fcntl.LOCK_UN)

@contextmanager
def run_lock(run_dir: str | Path):
    "`file_lock` on a run folder for a single process: a second process asking for the same run waits, then reuses it."
    if rank_world()[1] > 1: yield; return  # under torchrun every rank trains the run together
    with file_lock(run_dir): yield


# %%
with tempfile.TemporaryDirectory() as d:
    claim_run_dir(Path(d) / 'r', dict(a=1)); claim_run_dir(Path(d) / 'r', dict(a=1))  # same spec: reused
    test_fail(lambda: claim_run_dir(Path(d) / 'r', dict(a=2)), contains='other parameters (a: 1 → 2;')
    claim_run_dir(Path(d) / 'c', dict(config=dict(lr=1e-3), b=0))
    test_fail(lambda: claim_run_dir(Path(d) / 'c', dict(config=dict(lr=2e-3), b=0)), contains='config.lr: 0.001 → 0.002')
    import fcntl
    with run_lock(Path(d) / 'r'), open(Path(d) / 'r' / '.lock') as other:  # a second holder is refused while the lock is held
        test_fail(lambda: fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB))
    with open(Path(d) / 'r' / '.lock') as other: fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released afterwards

# %%
# a second process waits for a lock that a suspended run holds (Ctrl-Z): it says for what and for whom at once, and
# gives up after the stated time naming the holder's pid, instead of hanging silently
import signal, contextlib, io
with tempfile.TemporaryDirectory() as d:
    script = f'import fcntl, time; fh = open({str(Path(d) / ".lock")!r}, "a"); fcntl.flock(fh, fcntl.LOCK_EX); print(1, flush=True); time.sleep(60)'
    holder = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # it holds the lock now
        os.kill(holder.pid, signal.SIGSTOP)
        test_eq(lock_holder(Path(d) / '.lock'), f'pid {holder.pid} (stopped, e.g. by Ctrl-Z: resume it with `kill -CONT {holder.pid}`, or end it)')
        def second():
            with file_lock(d, what='the run folder r', timeout=0.5): pass
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            test_fail(second, contains=f'gave up waiting for the run folder r after 0.5 s: {Path(d) / ".lock"} is still locked by pid {holder.pid} (stopped')
        assert err.getvalue().startswith(f'waiting for the run folder r: {Path(d) / ".lock"} is locked by pid {holder.pid}'), err.getvalue()
        assert 'giving up after 0.5 s' in err.getvalue()
    finally: holder.kill(); holder.wait()
    with file_lock(d, timeout=0.5): pass  # released when its holder ends
    test_eq(lock_holder(Path(d) / '.lock'), 'another process')  # nobody holds it
# the waiting line lands in executed notebooks (make reports runs two notebooks that share the cache): a lock under the
# working folder is named relative to it, so no machine path is printed; one elsewhere keeps its full path (above)
with tempfile.TemporaryDirectory(dir='.') as d:
    script = f'import fcntl, time; fh = open({str(Path(d).resolve() / ".lock")!r}, "a"); fcntl.flock(fh, fcntl.LOCK_EX); print(1, flush=True); time.sleep(60)'
    holder = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        err = io.StringIO()
        with contextlib.redirect_stderr(err): test_fail(lambda: file_lock(Path(d).resolve(), timeout=0.3).__enter__(), contains='gave up waiting')
        rel = Path(d).resolve().relative_to(Path.cwd()).as_posix()
        assert err.getvalue().startswith(f'waiting for {rel}: {rel}/.lock is locked by pid {holder.pid}'), err.getvalue()
        assert str(Path.cwd()) not in err.getvalue(), err.getvalue()
    finally: holder.kill(); holder.wait()
# a cache outside the working folder ($NS_VIT_CACHE: make reports' two workers share it, and the second waits for the
# first's CIFAR-10 archive) is named by its variable, and a path under the home folder by ~, not by the machine's path
saved = os.environ.get('NS_VIT_CACHE')
with tempfile.TemporaryDirectory() as d:
    os.environ['NS_VIT_CACHE'] = d
    try:
        test_eq(shown_path(Path(d) / 'x' / '.lock'), '$NS_VIT_CACHE/x/.lock'); test_eq(shown_path(d), '$NS_VIT_CACHE')
    finally:
        if saved is None: os.environ.pop('NS_VIT_CACHE')
        else: os.environ['NS_VIT_CACHE'] = saved
probe = Path.home() / 'ns_vit_probe' / '.lock'
test_eq(shown_path(probe), path_under(probe, Path.cwd()) or '~/ns_vit_probe/.lock')
test_eq(shown_path('/nowhere/x/.lock'), '/nowhere/x/.lock')  # elsewhere: as given


# %% [markdown]
# ## Resume state
# A training loop that can be killed writes its resume state (weights, optimiser, schedule, step, RNG, logs: whatever it
# needs) with `save_state` after each round or epoch, with its configuration under the key `cfg`, and reads it back with
# `read_state` when it starts. Finetuning, pretraining (and with it the DamageNet surrogate and the fingerprint's models,
# which train with `pretrain.train_classifier`) share these two functions:
# - a state saved under another configuration is refused, naming each field that differs (fields that only one side
#   has are not compared, so a configuration that gains a field still resumes its old states);
# - a state that cannot be read (a truncated or corrupt file) is set aside as `<name>.unreadable-<time>` with a warning,
#   and the run starts over; under torchrun only rank 0 moves it, and only rank 0 writes.

# %%
#| export
def save_state(path: str | Path, state: dict, cfg) -> Path | None:
    "Write a run's resume `state` with its configuration `cfg` (a dataclass) under 'cfg', atomically; rank 0 only (others: None)."
    if rank_world()[0] != 0: return None
    return atomic_save({**state, 'cfg': asdict(cfg)}, path)

def read_state(path: str | Path, cfg,  # the run's configuration, a dataclass
               map_location='cpu', mmap: bool = False) -> dict | None:
    "The resume state at `path` if saved under `cfg` (else ValueError naming the fields that differ); an unreadable one is set aside, warned, None."
    path = Path(path)
    try:
        st = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        if not isinstance(st, dict): raise TypeError(f'it holds a {type(st).__name__}, not a state')
    except Exception as e:  # missing (None, quietly), truncated, corrupt, or not a state
        if rank_world()[0] == 0 and path.exists():
            aside = path.with_name(f'{path.name}.unreadable-{int(time.time())}'); path.rename(aside)
            warnings.warn(f'{path} is unreadable ({type(e).__name__}: truncated or corrupt): moved to {aside.name}; the run starts over')
        return None
    stored = st.get('cfg') or {}
    diff = [f'{k}: {stored[k]!r} → {v!r}' for k, v in asdict(cfg).items() if k in stored and stored[k] != v]
    if diff: raise ValueError(f'{path} was saved by a run with other settings ({", ".join(diff)}): resume with the same '
                              f'settings, or use another run folder (or delete {path} to start over)')
    return st


# %%
from dataclasses import dataclass
@dataclass
class _Cfg: lr: float = 1e-3; steps: int = 10
with tempfile.TemporaryDirectory() as d:
    p = Path(d) / 'state.pt'
    test_eq(read_state(p, _Cfg()), None)  # nothing saved yet: nothing to resume, no warning
    save_state(p, dict(step=3, w=torch.ones(2)), _Cfg())
    st = read_state(p, _Cfg()); test_eq((st['step'], st['cfg']), (3, dict(lr=1e-3, steps=10))); test_eq(st['w'], torch.ones(2))
    test_fail(lambda: read_state(p, _Cfg(lr=2e-3)), contains='other settings (lr: 0.001 → 0.002)')  # names the field
    torch.save(dict(step=1, cfg=dict(lr=1e-3)), p); test_eq(read_state(p, _Cfg())['step'], 1)  # fields one side lacks: not compared
    for bad in (p.read_bytes()[:40], b'not a torch file'):  # truncated, garbage
        p.write_bytes(bad)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always'); test_eq(read_state(p, _Cfg()), None)
        assert 'unreadable' in str(w[0].message) and 'starts over' in str(w[0].message) and not p.exists()
    test_eq(len(list(Path(d).glob('state.pt.unreadable-*'))) >= 1, True)  # set aside, not deleted


# %% [markdown]
# ## Batches by step
# A run's batches are a function of (seed, step): seeded epoch permutations of the training set, the global batch of
# each step split across ranks (`rank::world`, a distributed sampler). Resuming at step k gives exactly the batches
# an uninterrupted run would have seen. In-memory CIFAR-sized tensors are indexed directly; a file-backed dataset
# (an ImageNet ImageFolder) goes through a `DataLoader` with workers, pinned memory when feeding a GPU, and
# prefetching, so decoding JPEGs runs in parallel with the training step instead of before it.

# %%
#| export
def step_indices(n: int, step: int, batch_size: int, seed: int) -> Tensor:
    "This rank's indices of the global batch of `step`: seeded epoch permutations of range(n), split across ranks."
    per_epoch = n // batch_size
    if per_epoch == 0: raise ValueError(f'{n} items are fewer than one batch of {batch_size}')
    epoch, off = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed_of(seed, epoch)))
    glob = order[off * batch_size:(off + 1) * batch_size]
    rank, world = rank_world()
    return glob[rank::world]

class StepBatchSampler(Sampler):
    "Yields the index batch of every step from `start` to `end` (a batch sampler for `DataLoader`)."
    def __init__(self, n: int, batch_size: int, seed: int, start: int, end: int):
        self.n, self.batch_size, self.seed, self.start, self.end = n, batch_size, seed, start, end
    def __len__(self) -> int: return max(0, self.end - self.start)
    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.start, self.end): yield step_indices(self.n, s, self.batch_size, self.seed).tolist()

def step_batches(data: Dataset, batch_size: int, seed: int, start: int, end: int, num_workers: int = 0,
                 pin_memory: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    "(images (B, C, H, W) in [0, 1], labels) for steps start..end-1; tensors in memory, files through workers."
    if callable(getattr(data, 'tensors', None)):  # UInt8Images: one gather per batch beats any loader
        for s in range(start, end): yield data.tensors(step_indices(len(data), s, batch_size, seed))
        return
    sampler = StepBatchSampler(len(data), batch_size, seed, start, end)
    yield from DataLoader(data, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=False, prefetch_factor=4 if num_workers else None)


# %%
from torch.utils.data import TensorDataset
class _Tensors:  # the UInt8Images protocol
    def __init__(self, x, y): self.x, self.y = x, y
    def __len__(self): return len(self.x)
    def tensors(self, idx): return self.x[idx], self.y[idx]
xs, ys = torch.rand(50, 3, 4, 4), torch.arange(50)
a = list(step_batches(_Tensors(xs, ys), 8, 0, 0, 14))
b = list(step_batches(TensorDataset(xs, ys), 8, 0, 0, 14))                 # through a DataLoader
c = list(step_batches(TensorDataset(xs, ys), 8, 0, 5, 14, num_workers=2))  # resumed at step 5, with workers
test_eq(len(a), 14); test_eq([y for _, y in a], [y for _, y in b])
for (x1, y1), (x2, y2) in zip(a[5:], c): test_eq(y1, y2); test_eq(x1, x2)
epoch0 = torch.cat([y for _, y in a[:6]])  # 6 batches of 8 per epoch of 50: no repeats inside an epoch
test_eq(len(set(epoch0.tolist())), 48)
test_fail(lambda: step_indices(5, 0, 8, 0), contains='fewer than one batch')


# %% [markdown]
# One batch by indices (the noise batch of a round), through workers when the dataset reads files:

# %%
#| export
def gather(data: Dataset, idx: Tensor, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    "Images (B, C, H, W) in [0, 1] and labels for indices `idx` of an in-memory or file-backed dataset."
    if callable(getattr(data, 'tensors', None)): return data.tensors(idx)
    sub = torch.utils.data.Subset(data, [int(i) for i in idx])
    return next(iter(DataLoader(sub, batch_size=max(1, len(sub)), num_workers=num_workers)))


# %%
test_eq(gather(_Tensors(xs, ys), torch.tensor([3, 1]))[1], torch.tensor([3, 1]))
test_eq(gather(TensorDataset(xs, ys), torch.tensor([3, 1]), num_workers=1)[0], xs[[3, 1]])
