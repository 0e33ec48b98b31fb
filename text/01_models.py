# %% [markdown]
# # Models
# > timm ViTs that take [0, 1] pixels, carry their own normalisation, and load from local checkpoints safely.

# %%
#| default_exp models

# %%
#| export
from __future__ import annotations
import hashlib, json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable
import torch
from torch import nn, Tensor
from ns_vit.progress import quiet_tqdm_import
quiet_tqdm_import()  # before timm, which imports tqdm.auto through huggingface_hub: see ns_vit.progress
import timm
from safetensors import SafetensorError
from safetensors.torch import save_file, load_file, safe_open
from ns_vit.data import repo_root
from ns_vit.training import atomic_save
from ns_vit.checks import check_images

# %%
#| hide
import tempfile, os
from fastcore.test import test_eq, test_fail, test_close


# %% [markdown]
# ## Pixel-space models
# Attacks, nullspace noise and corruptions all act on images in [0, 1], so every model ns_vit hands out is a thin
# wrapper: normalise, then run the timm `VisionTransformer`, which stays reachable as `.vit` for the nullspace code.

# %%
#| export
class PixelViT(nn.Module):
    "A timm ViT that takes images in [0, 1] and normalises them itself."
    def __init__(self, vit: nn.Module, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        super().__init__()
        self.vit = check_vit(vit)
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    def normalize(self, x: Tensor) -> Tensor: return (x - self.mean) / self.std  # (B, C, H, W)
    cpu_math_attention: bool = True  # on CPU with ≤ 256 tokens, attention as plain matmuls (faster there than SDPA's kernel)
    def forward(self, x: Tensor) -> Tensor:  # (B, num_classes)
        if not (self.cpu_math_attention and x.device.type == 'cpu'): return self.vit(self.normalize(x))
        with math_attention(self.vit): return self.vit(self.normalize(x))

@contextmanager
def math_attention(vit: nn.Module, max_tokens: int = 256):
    "Within the context the blocks of `vit` compute attention with explicit matmuls instead of fused SDPA (short sequences)."
    mods = [b.attn for b in getattr(vit, 'blocks', []) if hasattr(b, 'attn') and hasattr(b.attn, 'fused_attn')]
    pe = getattr(vit, 'patch_embed', None)
    tokens = getattr(pe, 'num_patches', max_tokens + 1) + getattr(vit, 'num_prefix_tokens', 1)
    if not mods or tokens > max_tokens or getattr(pe, 'dynamic_img_size', False): yield; return
    flags = [m.fused_attn for m in mods]
    for m in mods: m.fused_attn = False
    try: yield
    finally:
        for m, f in zip(mods, flags): m.fused_attn = f

def check_vit(vit: nn.Module) -> nn.Module:
    "Return `vit` if it is a ViT with a linear, non-overlapping patch embedding; raise a clear error otherwise."
    pe = getattr(vit, 'patch_embed', None)
    proj = getattr(pe, 'proj', None)
    if not isinstance(proj, nn.Conv2d) or not hasattr(vit, 'blocks') or not hasattr(vit, '_pos_embed'):
        raise TypeError(f'{type(vit).__name__} is not a timm VisionTransformer with a linear patch embedding '
                        '(patch_embed.proj Conv2d, blocks, _pos_embed); ns_vit works on ViT-style models only.')
    if proj.kernel_size != proj.stride or proj.padding not in (0, (0, 0)) or proj.groups != 1 or proj.dilation != (1, 1):
        raise TypeError(f'the patch embedding of {type(vit).__name__} is not a non-overlapping linear map '
                        f'(kernel {proj.kernel_size}, stride {proj.stride}, padding {proj.padding}); its nullspace '
                        'is not defined patch by patch.')
    return vit

def as_vit(model: nn.Module) -> nn.Module:
    "The timm VisionTransformer inside `model` (a `PixelViT` or a bare ViT)."
    return model.vit if isinstance(model, PixelViT) else check_vit(model)


# %%
from timm.models.vision_transformer import VisionTransformer
_vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=10)
_m = PixelViT(_vit, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5)).eval()
_x = torch.rand(2, 3, 32, 32)
test_close(_m(_x), _vit((_x - torch.tensor([.1, .2, .3]).view(1, 3, 1, 1)) / 0.5), eps=1e-6)
test_eq(as_vit(_m) is _vit, True)
test_fail(lambda: check_vit(nn.Linear(3, 3)), contains='not a timm VisionTransformer')
# on CPU the forward uses matmul attention (same function, other kernel); the fused flags come back afterwards
_m.cpu_math_attention = False; _fused = _m(_x)
_m.cpu_math_attention = True
test_close(_m(_x), _fused, eps=1e-5)
test_eq([b.attn.fused_attn for b in _vit.blocks], [True] * len(_vit.blocks))
with math_attention(_vit): test_eq({b.attn.fused_attn for b in _vit.blocks}, {False})


# %% [markdown]
# ## Reading a ViT's geometry
# The one home of the questions ns_vit's modules ask a ViT: its patch size, token layout, embedding shape, classes, input
# size and channels. Each accepts a `PixelViT` or a bare timm ViT. The patch size is the kernel of the patch
# embedding's convolution, the map the nullspace is computed from (`check_vit` makes sure it equals the stride);
# `attacks`, `attention`, `checks`, `noise` and `nullspace` re-export these functions under their old names.

# %%
#| export
def patch_size(model: nn.Module) -> tuple[int, int]:
    "Pixel size (h, w) of one patch: the kernel of the patch embedding of the ViT inside `model`."
    return tuple(check_vit(as_vit(model)).patch_embed.proj.kernel_size)

def token_layout(model: nn.Module) -> tuple[int, tuple[int, int]]:
    "(number of prefix tokens: class + register, patch grid (h, w)) of the ViT inside `model`."
    vit = as_vit(model)
    return vit.num_prefix_tokens, tuple(vit.patch_embed.grid_size)

def embed_shape(model: nn.Module) -> tuple[int, int]:
    "(N, D): number of patch tokens and embedding width of the ViT inside `model`."
    vit = as_vit(model)
    return vit.patch_embed.num_patches, vit.embed_dim

def num_classes(model: nn.Module) -> int:
    "Number of classes the ViT inside `model` predicts."
    return as_vit(model).num_classes

def input_size(model: nn.Module) -> tuple[int, int] | None:
    "The (H, W) input resolution of the ViT inside `model`; None when it takes any size."
    size = as_vit(model).patch_embed.img_size
    return None if size is None else tuple(size)

def in_chans(model: nn.Module) -> int:
    "Number of image channels the patch embedding of the ViT inside `model` reads."
    return check_vit(as_vit(model)).patch_embed.proj.in_channels


# %%
_r = PixelViT(VisionTransformer(img_size=(16, 32), patch_size=(4, 8), embed_dim=48, depth=1, num_heads=2, num_classes=7, reg_tokens=2))
test_eq(patch_size(_r), (4, 8)); test_eq(patch_size(_r.vit), (4, 8))  # non-square patches, wrapped or bare
test_eq(token_layout(_r), (3, (4, 4))); test_eq(embed_shape(_r), (16, 48)); test_eq(num_classes(_r), 7)
test_eq(input_size(_r), (16, 32)); test_eq(in_chans(_r), 3)
test_eq(_r(torch.rand(1, 3, 16, 32)).shape, (1, 7))
test_fail(lambda: patch_size(nn.Linear(2, 2)), contains='not a timm VisionTransformer')


# %% [markdown]
# ## Creating and loading ViTs
# `create_vit` takes any timm ViT by name. `pretrained` is `False` (random init), `True` (timm's hub; needs
# internet) or the path of a local checkpoint: safetensors, or a torch `.pth`/`.pth.tar` holding a state dict
# directly or under `state_dict` / `model` / `state_dict_ema`, with or without DDP's `module.` prefix, including
# easyrobust's layout `0.mean`, `0.std`, `1.<vit keys>`. Files are never unpickled into arbitrary objects.

# %%
#| export
def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    "Tensors from a safetensors or torch checkpoint file, unwrapped from common containers; no arbitrary unpickling."
    path = Path(path).expanduser()
    if not path.is_file(): raise FileNotFoundError(f'checkpoint {path} does not exist')
    try:
        if path.suffix == '.safetensors': return load_file(str(path))
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise ValueError(f'cannot read checkpoint {path}: the file is corrupt or not a checkpoint ({e})') from None
    except Exception as e:  # pickle errors: arbitrary objects refused by weights_only, or garbage
        if 'Unsupported global' in str(e):
            raise ValueError(f'cannot read checkpoint {path} safely: it pickles arbitrary objects, which ns_vit '
                             'never unpickles; save a plain state dict or safetensors instead') from None
        raise ValueError(f'cannot read checkpoint {path}: the file is corrupt or not a checkpoint') from None
    for key in ('state_dict_ema', 'state_dict', 'model'):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict): sd = sd[key]; break
    if not isinstance(sd, dict): raise ValueError(f'checkpoint {path} holds a {type(sd).__name__}, not a state dict')
    return {k.removeprefix('module.'): v for k, v in sd.items() if isinstance(v, Tensor)}

def split_normalizer(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], tuple | None, tuple | None]:
    "(ViT state dict, mean, std) of `sd`: easyrobust's `0.mean`/`0.std` + `1.` layout, a `PixelViT`'s `mean`/`std` + `vit.`, or a bare ViT's (no mean, std)."
    if '0.mean' in sd: mean, std, sd = sd['0.mean'], sd['0.std'], {k[2:]: v for k, v in sd.items() if k.startswith('1.')}
    elif {'mean', 'std'} <= set(sd) and any(k.startswith('vit.') for k in sd):  # PixelViT.state_dict()
        mean, std, sd = sd['mean'], sd['std'], {k: v for k, v in sd.items() if k not in ('mean', 'std')}
    else: mean = std = None
    if sd and all(k.startswith('vit.') for k in sd): sd = {k.removeprefix('vit.'): v for k, v in sd.items()}  # a wrapper's ViT
    return sd, *(None if t is None else tuple(t.flatten().tolist()) for t in (mean, std))


# %%
#| export
def _timm_vit(name: str, pretrained: bool, **kw) -> nn.Module:
    "timm.create_model with a clear message when hub weights cannot be had."
    try: return timm.create_model(name, pretrained=pretrained, **kw)
    except RuntimeError as e:
        if 'Unknown model' in str(e): raise ValueError(f'{name!r} is not a timm model name') from None
        raise
    except Exception as e:
        if not pretrained: raise
        raise RuntimeError(f'could not fetch pretrained weights for {name!r} ({type(e).__name__}: {e}). Offline? '
                           'Pass pretrained=<path to a local .safetensors/.pth checkpoint> instead.') from None

def _arch_summary(sd: dict[str, Tensor]) -> str:
    "The shape of the ViT a state dict describes: patch size, width, depth, classes."
    pe, head = sd.get('patch_embed.proj.weight'), sd.get('head.weight')  # (D, C, P, P), (K, D)
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    parts = ([f'patch {pe.shape[-1]}', f'width {pe.shape[0]}'] if pe is not None else []) + [f'depth {depth}']
    return ', '.join(parts + ([f'{head.shape[0]} classes'] if head is not None else []))

def _few(keys, k: int = 3) -> str:
    "Up to `k` of `keys`, sorted, and how many more."
    keys = sorted(keys)
    return ', '.join(keys[:k]) + (f' and {len(keys) - k} more' if len(keys) > k else '')

def _key_diff(sd: dict[str, Tensor], mine: dict[str, Tensor]) -> str:
    "How state dict `sd` differs from a model's `mine`: a few keys of other shapes, missing and unexpected, with the counts."
    shapes = [f'{k} {tuple(sd[k].shape)} ≠ {tuple(mine[k].shape)}' for k in sd if k in mine and mine[k].shape != sd[k].shape]
    missing, unexpected = set(mine) - set(sd), set(sd) - set(mine)
    parts = (('tensors of other shapes', shapes, 2), ('missing keys', missing, 3), ('unexpected keys', unexpected, 3))
    return '; '.join(f'{len(ks)} {what}: {_few(ks, k)}' for what, ks, k in parts if ks)

def load_vit_weights(vit: nn.Module, sd: dict[str, Tensor], source: str | Path, arch: str = '',
                     stored: dict[str, Tensor] | None = None, advice: str = '') -> nn.Module:
    "Load the ViT state dict `sd` (read from `source`, as `stored` before resampling) into `vit` strictly; another architecture's is an error naming both and a few keys."
    mine = vit.state_dict()
    if set(mine) != set(sd) or any(mine[k].shape != sd[k].shape for k in sd):
        raise ValueError(f'checkpoint {source} holds a ViT with {_arch_summary(stored or sd)}, but the model {arch or type(vit).__name__} '
                         f'has {_arch_summary(mine)} ({_key_diff(sd, mine)}): {advice}pass the architecture the checkpoint '
                         'was trained with as --model (model= in Python: an embedded model or a timm ViT name, with its kwargs), '
                         'or a checkpoint ns_vit wrote (a run folder or save_checkpoint\'s .safetensors: its card names the architecture)')
    vit.load_state_dict(sd)
    return vit

def create_vit(name: str, pretrained: bool | str | Path = False, mean=None, std=None, **kw) -> PixelViT:
    "A timm ViT by name, random-init, from timm's hub (`True`) or from a local checkpoint path, as a `PixelViT`."
    vit = _timm_vit(name, pretrained is True, **kw)
    check_vit(vit)
    cfg = getattr(vit, 'pretrained_cfg', {}) or {}
    m0, s0 = cfg.get('mean', (0.5, 0.5, 0.5)), cfg.get('std', (0.5, 0.5, 0.5))
    if not isinstance(pretrained, bool):
        sd, m1, s1 = split_normalizer(read_state_dict(pretrained))
        from timm.models.vision_transformer import checkpoint_filter_fn  # resamples pos_embed/patch_embed to vit's size
        load_vit_weights(vit, checkpoint_filter_fn(sd, vit), pretrained, name, stored=sd)
        m0, s0 = m1 or m0, s1 or s0
    return PixelViT(vit, mean or m0, std or s0)


# %%
m = create_vit('vit_tiny_patch16_224', img_size=32, patch_size=8, num_classes=10)
test_eq(m(torch.rand(1, 3, 32, 32)).shape, (1, 10))
test_fail(lambda: create_vit('resnet18'), contains='not a timm VisionTransformer')
test_fail(lambda: create_vit('not_a_model'), contains='not a timm model')
with tempfile.TemporaryDirectory() as d:
    sd = {f'module.{k}': v for k, v in m.vit.state_dict().items()}
    torch.save({'state_dict': sd, 'epoch': 3}, Path(d) / 'a.pth.tar')
    m2 = create_vit('vit_tiny_patch16_224', Path(d) / 'a.pth.tar', img_size=32, patch_size=8, num_classes=10)
    assert torch.equal(m2.vit.patch_embed.proj.weight, m.vit.patch_embed.proj.weight)
    dat = {'0.mean': torch.tensor([.4, .4, .4]), '0.std': torch.tensor([.2, .2, .2]),
           **{f'1.{k}': v for k, v in m.vit.state_dict().items()}}
    torch.save(dat, Path(d) / 'dat.pth')
    m3 = create_vit('vit_tiny_patch16_224', Path(d) / 'dat.pth', img_size=32, patch_size=8, num_classes=10)
    test_close(m3.mean.flatten(), torch.tensor([.4, .4, .4])); assert torch.equal(m3.vit.head.weight, m.vit.head.weight)
    (Path(d) / 'bad.pth').write_bytes(b'not a checkpoint')
    test_fail(lambda: read_state_dict(Path(d) / 'bad.pth'), contains='corrupt')
    torch.save({'obj': nn.Linear(2, 2)}, Path(d) / 'pickle.pth')  # an arbitrary pickled object
    test_fail(lambda: read_state_dict(Path(d) / 'pickle.pth'), contains='safely')
    save_file({k: v.contiguous() for k, v in m.vit.state_dict().items()}, str(Path(d) / 'tiny.safetensors'))
    test_fail(lambda: create_vit('vit_tiny_patch16_224', Path(d) / 'tiny.safetensors', img_size=32, patch_size=8, embed_dim=64,
                                 num_heads=2, num_classes=10),  # another width: no timm shape traceback, both named
              contains='holds a ViT with patch 8, width 192, depth 12, 10 classes, but the model vit_tiny_patch16_224 has patch 8, width 64')

# %% [markdown]
# Offline, asking timm's hub for weights fails with a message that says what to do instead:

# %%
#| notest
os.environ['HF_HUB_OFFLINE'] = '1'
test_fail(lambda: create_vit('vit_small_patch32_224', pretrained=True), contains='local')


# %% [markdown]
# ## Checkpoints
# `save_checkpoint` writes safetensors weights (the card embedded in its metadata) plus the same card as JSON beside
# it, each atomically. The card holds the architecture, normalisation, the weights' sha256 (`weights_digest`, over the
# weights and the normalisation) and whatever the caller adds (data, command, metrics), so `load_checkpoint` rebuilds
# the model from the file alone and refuses one whose bytes changed after it was written: safetensors checks its header,
# not the tensors, so a flipped byte inside a weight would otherwise load silently as a worse model. They are the one
# writer and reader of weights in ns_vit: any other module (the DamageNet surrogate CNN) is saved whole, and loaded with
# `build`, a function that makes the empty model from the card.

# %%
#| export
def model_card(model: PixelViT, arch: str, arch_kwargs: dict, **meta) -> dict:
    "The JSON-able card of `model`: architecture, its kwargs, normalisation and free-form metadata."
    return {'arch': arch, 'arch_kwargs': arch_kwargs, 'mean': model.mean.flatten().tolist(),
            'std': model.std.flatten().tolist(), **meta}

def weights_digest(model: nn.Module, length: int = 8) -> str:
    "Hex sha256 (first `length` digits) of a model's weights and buffers in key order (run folders, caches, cards)."
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()): h.update(k.encode()); h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:length]

def save_checkpoint(model: nn.Module, path: str | Path, card: dict) -> Path:
    "Write `model`'s weights to `path` (.safetensors) and `card` with their sha256 to `path` with .json, both atomically."
    path = Path(path); path = path if path.suffix == '.safetensors' else path.with_name(path.name + '.safetensors')  # 'ns-eps0.03' keeps its dots
    card = {**card, 'weights_sha256': weights_digest(model, 64)}
    weights = (model.vit if isinstance(model, PixelViT) else model).state_dict()  # a PixelViT's mean and std are in its card
    sd = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    atomic_save(sd, path, lambda o, p: save_file(o, p, metadata={'card': json.dumps(card)}))
    atomic_save(card, path.with_suffix('.json'), lambda o, p: Path(p).write_text(json.dumps(o, indent=2) + '\n'))
    return path

def _card_vit(card: dict, path: Path) -> PixelViT:
    "The `PixelViT` that `card` names, with the weights of checkpoint `path`."
    arch, kwargs = card['arch'], card['arch_kwargs']
    if not kwargs and arch in EMBEDDED_MODELS:  # the cards of vit-ti8 finetunes written before `base_card` named the model only
        arch, kwargs = EMBEDDED_MODELS[arch]['arch'], EMBEDDED_MODELS[arch]['kwargs']
    vit = load_vit_weights(_timm_vit(arch, False, **kwargs), read_state_dict(path), path, arch)
    return PixelViT(vit, card['mean'], card['std'])

def load_checkpoint(path: str | Path, map_location: str | torch.device = 'cpu', *,
                    build: Callable[[dict], nn.Module] | None = None,  # the empty model of a card (None: the `PixelViT` it names)
                    ) -> tuple[nn.Module, dict]:
    "Rebuild the model of a checkpoint written by `save_checkpoint` (eval mode) and its card, verifying the weights' sha256."
    path = Path(path).expanduser()
    if not path.is_file(): raise FileNotFoundError(f'checkpoint {path} does not exist')
    card = checkpoint_card(path)  # the one reader of cards; corrupt files are errors here
    if card is None: raise ValueError(f'{path} is not an ns_vit checkpoint: it has no card (save_checkpoint writes one); '
                                      'a plain state dict loads with load_plain_checkpoint(model name, path)')
    if build is None: model = _card_vit(card, path)
    else:
        model = build(card)
        model.load_state_dict(read_state_dict(path))
    want = card.get('weights_sha256')  # checkpoints written before ns_vit recorded it carry none
    if want is not None and weights_digest(model, len(want)) != want:
        raise ValueError(f'checkpoint {path} is corrupt: its weights do not match the sha256 in its card '
                         f'({weights_digest(model, 12)}… ≠ {want[:12]}…); restore or regenerate the file')
    return model.to(map_location).eval(), card

CHECKPOINT_FORMS = ('a finetune run folder (its model.safetensors), a .safetensors that ns_vit wrote (save_checkpoint), or a plain '
                    'state dict (.pth, .pt or .safetensors) of the architecture --model names')

def checkpoint_file(checkpoint: str | Path) -> Path:
    "The weights file `checkpoint` names: the file itself, or a finetune run folder's model.safetensors; an unfinished run is an error saying how to finish it."
    path = Path(checkpoint).expanduser()
    if path.is_file(): return path
    if (path / 'model.safetensors').is_file(): return path / 'model.safetensors'
    if (path / 'run.json').is_file(): raise FileNotFoundError(_unfinished(path))
    what = 'is a folder without model.safetensors (not a finetune run folder)' if path.is_dir() else 'does not exist'
    raise FileNotFoundError(f'checkpoint {path} {what}: pass {CHECKPOINT_FORMS}')

def _unfinished(run_dir: Path) -> str:
    "Why a finetune run folder has no model yet, and the command that finishes it."
    from .experiments import finetune_command  # imported here: experiments imports this module
    state = 'its resume state state.pt is there' if (run_dir / 'state.pt').exists() else 'no resume state was saved yet'
    try: cmd = f'`{finetune_command(run_dir)}`'
    except (OSError, ValueError, KeyError, TypeError): cmd = f'ns-vit-finetune --out {run_dir} with the options in {run_dir / "run.json"}'
    return (f'run folder {run_dir} holds an unfinished run: it has no model.safetensors yet ({state}). Finish it by running the '
            f'command that started it again, which resumes it: {cmd}; then pass {run_dir} again')

def checkpoint_card(path: str | Path) -> dict | None:
    "The card of a checkpoint that ns_vit wrote (`save_checkpoint`); None for a plain state dict file."
    path = Path(path)
    if path.suffix != '.safetensors': return None
    try:
        with safe_open(str(path), 'pt') as f: card = (f.metadata() or {}).get('card')
        return None if card is None else json.loads(card)
    except (SafetensorError, json.JSONDecodeError, OSError) as e:
        raise ValueError(f'cannot read checkpoint {path}: the file is corrupt or not a checkpoint ({type(e).__name__}: {e})') from None


# %%
def _umask() -> int: u = os.umask(0); os.umask(u); return u
with tempfile.TemporaryDirectory() as d:
    kw = dict(img_size=32, patch_size=8, num_classes=10)
    p = save_checkpoint(m, Path(d) / 'm', model_card(m, 'vit_tiny_patch16_224', kw, note='test'))
    m4, card = load_checkpoint(p)
    test_eq(card['note'], 'test'); test_eq(json.loads(p.with_suffix('.json').read_text()), card)
    test_eq(card['weights_sha256'], weights_digest(m, 64))
    test_eq(save_checkpoint(m, Path(d) / 'ns-eps0.03', card).name, 'ns-eps0.03.safetensors')  # a dot in the name is kept
    test_eq(save_checkpoint(m, Path(d) / 'x.safetensors', card).name, 'x.safetensors')
    test_eq(oct(p.stat().st_mode & 0o777), oct(0o666 & ~_umask()))  # the usual mode, not safetensors' 0600
    x = torch.rand(2, 3, 32, 32)
    test_close(m4(x), m.eval()(x), eps=1e-6)
    b = bytearray(p.read_bytes()); b[-5] ^= 0x40; p.write_bytes(bytes(b))  # one byte of one weight; header intact
    test_fail(lambda: load_checkpoint(p), contains=f'checkpoint {p} is corrupt: its weights do not match')
    p.write_bytes(p.read_bytes()[:100])  # truncated file
    test_fail(lambda: load_checkpoint(p), contains='corrupt')
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(); cnn[1].running_mean.add_(1)  # any module, buffers too
    q = save_checkpoint(cnn, Path(d) / 'cnn.v2', {'arch': 'test CNN', 'width': 4})
    test_eq(q.name, 'cnn.v2.safetensors'); test_eq(checkpoint_card(q)['width'], 4)
    cnn2, card2 = load_checkpoint(q, build=lambda c: nn.Sequential(nn.Conv2d(3, c['width'], 3), nn.BatchNorm2d(c['width'])))
    test_eq(weights_digest(cnn2), weights_digest(cnn)); test_eq(cnn2.training, False); test_eq(card2['arch'], 'test CNN')

# %% [markdown]
# A `checkpoint` argument (`get_model`, `--checkpoint`) names a file or a finetune run folder, which stands for its
# `model.safetensors`; a folder whose run is unfinished says how to finish it (`nbs/05a_experiments.ipynb` tests that
# message). `checkpoint_card` tells a checkpoint that ns_vit wrote (its card names the architecture) from a plain state dict.

# %%
with tempfile.TemporaryDirectory() as d:
    run = Path(d) / 'run'
    p = save_checkpoint(m, run / 'model.safetensors', model_card(m, 'vit_tiny_patch16_224', kw))
    test_eq(checkpoint_file(run), p); test_eq(checkpoint_file(p), p)
    test_eq(checkpoint_card(p)['arch_kwargs'], kw)
    torch.save(m.vit.state_dict(), Path(d) / 'plain.pth'); test_eq(checkpoint_card(Path(d) / 'plain.pth'), None)
    save_file({k: v.contiguous() for k, v in m.vit.state_dict().items()}, str(Path(d) / 'plain.safetensors'))
    test_eq(checkpoint_card(Path(d) / 'plain.safetensors'), None)
    test_fail(lambda: checkpoint_file(d), contains='is a folder without model.safetensors (not a finetune run folder): pass a finetune run folder')
    test_fail(lambda: checkpoint_file(Path(d) / 'missing.pth'), contains='missing.pth does not exist: pass a finetune run folder')

# %% [markdown]
# ## The embedded default model
# A small ViT for 32×32 CIFAR-10 with 8×8 patches: the patch embedding maps C·P² = 192 pixel values to D < 192
# dimensions, so it has a non-trivial nullspace. It is trained from scratch by `nbs/02_pretrain.ipynb`; its weights
# and card are committed under `data/`.

# %%
#| export
DEFAULT_ARCH = 'vit_tiny_patch16_224'  # timm name; the kwargs below override its size
DEFAULT_ARCH_KWARGS = dict(img_size=32, patch_size=8, embed_dim=128, depth=6, num_heads=4, mlp_ratio=3.0,
                           num_classes=10, global_pool='avg', class_token=False, fc_norm=True)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DEFAULT_CHECKPOINT = 'data/default_vit.safetensors'
EMBEDDED_MODELS = {  # name → timm architecture, its size overrides, and the committed weights (written by 02_pretrain)
    'default': dict(arch=DEFAULT_ARCH, kwargs=DEFAULT_ARCH_KWARGS, checkpoint=DEFAULT_CHECKPOINT),
    # timm's ViT-Ti (width 192, depth 12, 3 heads) with 8-pixel patches: 16 tokens like the default, 5.3× its
    # parameters, and C·P² = 192 = D, so like ViT-B/16 (768 = 768) no exact patch-embedding nullspace
    'vit-ti8': dict(arch='vit_tiny_patch16_224', checkpoint='data/vit_ti8.safetensors',
                    kwargs=dict(img_size=32, patch_size=8, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0,
                                num_classes=10, global_pool='avg', class_token=False, fc_norm=True, drop_path_rate=0.1)),
}

def _embedded(name: str) -> dict:
    "The registry entry of an embedded model, or a clear error listing the names."
    if name not in EMBEDDED_MODELS: raise ValueError(f'{name!r} is not an embedded model; choose from {list(EMBEDDED_MODELS)}')
    return EMBEDDED_MODELS[name]

def embedded_vit(name: str = 'default') -> PixelViT:
    "A freshly initialised (untrained) embedded model `name`."
    e = _embedded(name)
    return create_vit(e['arch'], mean=CIFAR10_MEAN, std=CIFAR10_STD, **e['kwargs'])

def default_vit() -> PixelViT:
    "A freshly initialised embedded-default ViT (untrained)."
    return embedded_vit('default')

def load_embedded_model(name: str = 'default', path: str | Path | None = None, map_location='cpu') -> PixelViT:
    "The embedded model `name` pretrained on CIFAR-10 by `nbs/02_pretrain.ipynb` (weights under `data/`)."
    path = Path(path) if path else repo_root() / _embedded(name)['checkpoint']
    if not path.exists():
        arg = '' if name == 'default' else f' -p model {name}'
        raise FileNotFoundError(f'{path} not found: run `papermill nbs/02_pretrain.ipynb /dev/null{arg}` to train it')
    return load_checkpoint(path, map_location)[0]

def load_default_model(path: str | Path | None = None, map_location='cpu') -> PixelViT:
    "The embedded default ViT pretrained on CIFAR-10 by `nbs/02_pretrain.ipynb` (weights under `data/`)."
    return load_embedded_model('default', path, map_location)

def _same_shapes(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    "Whether two state dicts have the same keys with the same shapes."
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)

def load_plain_checkpoint(name: str, path: str | Path) -> PixelViT:
    "The embedded model `name` with the weights of a plain state dict file (a ViT's or a `PixelViT`'s, no card), loaded strictly."
    vit, path = embedded_vit(name).vit, Path(path)
    sd, mean, std = split_normalizer(read_state_dict(path))
    advice = ''
    if not _same_shapes(vit.state_dict(), sd):  # another embedded model's weights: name it
        match = next((k for k in EMBEDDED_MODELS if k != name and _same_shapes(embedded_vit(k).vit.state_dict(), sd)), None)
        advice = f'it is a state dict of the embedded model {match!r}: pass --model {match}; otherwise ' if match else ''
    load_vit_weights(vit, sd, path, f'{name!r} (--model {name})', advice=advice)
    return PixelViT(vit, mean or CIFAR10_MEAN, std or CIFAR10_STD).eval()



# %%
d0 = default_vit()
test_eq(d0.vit.patch_embed.proj.weight.shape, (128, 3, 8, 8))
assert 3 * 8 * 8 > DEFAULT_ARCH_KWARGS['embed_dim']  # non-trivial nullspace by rank-nullity
test_eq(d0(torch.rand(2, 3, 32, 32)).shape, (2, 10))
t8 = embedded_vit('vit-ti8')
test_eq(t8.vit.patch_embed.proj.weight.shape, (192, 3, 8, 8))  # C·P² = 192 = D: no exact nullspace, as in ViT-B/16
test_eq(sum(p.numel() for p in t8.parameters()) > 4 * sum(p.numel() for p in d0.parameters()), True)
test_eq(t8(torch.rand(2, 3, 32, 32)).shape, (2, 10))
test_fail(lambda: embedded_vit('vit-huge'), contains='choose from')


# %% [markdown]
# A plain state dict of an embedded model (`torch.save(model.state_dict())` of the `PixelViT` or of its `vit`, with or
# without DDP's `module.`; or safetensors without a card) loads into the architecture its name gives, strictly; another
# architecture's is an error that lists a few keys, names `--model`, and the embedded model whose weights they are:

# %%
with tempfile.TemporaryDirectory() as d:
    for i, sd in enumerate([d0.state_dict(), d0.vit.state_dict(), {f'module.{k}': v for k, v in d0.state_dict().items()}]):
        torch.save(sd, Path(d) / f'{i}.pth')
        test_eq(weights_digest(load_plain_checkpoint('default', Path(d) / f'{i}.pth')), weights_digest(d0))
    save_file({k: v.contiguous() for k, v in d0.vit.state_dict().items()}, str(Path(d) / 'd0.safetensors'))
    test_eq(weights_digest(load_plain_checkpoint('default', Path(d) / 'd0.safetensors')), weights_digest(d0))
    torch.save({**d0.state_dict(), 'mean': torch.tensor([.5, .5, .5])}, Path(d) / 'mean.pth')  # a PixelViT's own normalisation is kept
    test_eq(load_plain_checkpoint('default', Path(d) / 'mean.pth').mean.flatten().tolist(), [.5, .5, .5])
    torch.save(t8.state_dict(), Path(d) / 'ti8.pth')
    test_fail(lambda: load_plain_checkpoint('default', Path(d) / 'ti8.pth'),
              contains="holds a ViT with patch 8, width 192, depth 12, 10 classes, but the model 'default' (--model default) has patch 8, width 128, depth 6")
    test_fail(lambda: load_plain_checkpoint('default', Path(d) / 'ti8.pth'), contains="it is a state dict of the embedded model 'vit-ti8': pass --model vit-ti8")
    test_fail(lambda: load_plain_checkpoint('default', Path(d) / 'ti8.pth'), contains='72 unexpected keys: blocks.10.attn.proj.bias, blocks.10.attn.proj.weight, blocks.10.attn.qkv.bias and 69 more')
    torch.save(m.vit.state_dict(), Path(d) / 'other.pth')  # a ViT of no embedded architecture
    test_fail(lambda: load_plain_checkpoint('default', Path(d) / 'other.pth'), contains='2 missing keys: fc_norm.bias, fc_norm.weight; 75 unexpected keys')
    test_fail(lambda: load_plain_checkpoint('default', Path(d) / 'other.pth'), contains='): pass the architecture the checkpoint was trained with as --model')


# %% [markdown]
# ## Modes for a while
# Code that needs a model in eval mode for a while (predictions, attacks, evaluations, nullspace checks) uses
# `eval_mode`, which puts it back in the mode it was in, each submodule as it was, when the context ends, also when an
# error ends it. `frozen` adds frozen weights (no parameter gradients) for code that differentiates through a model
# it must not train (learning a noise, saliency maps).

# %%
#| export
@contextmanager
def eval_mode(model: nn.Module):
    "Within the context `model` is in eval mode; on exit, also after an error, each of its modules is back in its own mode."
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try: yield model
    finally:
        for m, t in modes: m.train(t)

@contextmanager
def frozen(model: nn.Module):
    "`eval_mode` and no parameter gradients inside the context; restores both after, also after an error."
    flags = [p.requires_grad for p in model.parameters()]
    with eval_mode(model):
        for p in model.parameters(): p.requires_grad_(False)
        try: yield model
        finally:
            for p, f in zip(model.parameters(), flags): p.requires_grad_(f)


# %%
_t = default_vit().train(); _t.vit.blocks[0].eval()  # a model in train mode with one block in eval mode
with eval_mode(_t): test_eq({m.training for m in _t.modules()}, {False})
test_eq(_t.training, True); test_eq(_t.vit.blocks[0].training, False); test_eq(_t.vit.blocks[1].training, True)  # each as it was
def _fails():
    with eval_mode(_t): raise RuntimeError('inside')
test_fail(_fails, contains='inside'); test_eq(_t.training, True)  # restored after an error too
_t.vit.head.weight.requires_grad_(False)
with frozen(_t): test_eq(_t.training or any(p.requires_grad for p in _t.parameters()), False)
test_eq(_t.training, True); test_eq(_t.vit.head.weight.requires_grad, False); test_eq(_t.vit.head.bias.requires_grad, True)


# %% [markdown]
# ## Predictions and accuracy
# Batched, no-grad, device-agnostic helpers used by every experiment.

# %%
#| export
def model_device(model: nn.Module) -> torch.device:
    "The device of `model`'s parameters."
    return next(model.parameters()).device

@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    "Logits of `model` (eval mode) on images (N, C, H, W) in [0, 1], batched, returned on CPU."
    dev = model_device(model)
    with eval_mode(model):
        return torch.cat([model(images[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(images), batch_size)])  # (N, K)

def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    "Top-1 accuracy of `model` on (images, labels)."
    check_images(images)
    return (predict(model, images, batch_size).argmax(1) == labels.cpu()).float().mean().item()


# %%
test_eq(predict(d0.train(), torch.rand(7, 3, 32, 32), batch_size=3).shape, (7, 10)); test_eq(d0.training, True)  # mode kept
d0.eval();
_a = accuracy(d0, torch.rand(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)); assert 0 <= _a <= 1


# %% [markdown]
# ## One entry point for experiments
# Experiment notebooks and the console scripts take `model` (an embedded model, 'default' or 'vit-ti8', or any timm ViT
# name) and `checkpoint`: '' (the embedded model's own weights; a timm name's random init), `'hub'` (timm's pretrained
# weights), a finetune run folder, a `.safetensors` that ns_vit wrote (its card names the architecture), or a plain state
# dict (`.pth`, `.pt`, `.safetensors`) of the architecture `model` names. `get_model` turns them into a `PixelViT` on
# `device`, in eval mode; `base_card` is the card of that model's architecture (finetuned models' cards start from it).
# `loader_size` is the size an image folder is loaded at for a model: its input size, the whole image for a CIFAR-scale
# model (as CIFAR-10 itself is fed to it, and CINIC-10 in `06c_shifts`), timm's 0.875 centre crop at ImageNet scale.

# %%
#| export
def get_model(model: str = 'default', checkpoint: str = '', device: str | torch.device = 'cpu', **kw) -> PixelViT:
    "An embedded model by name (`'default'`, `'vit-ti8'`) or a timm ViT, with its own weights or `checkpoint`'s (a file, a run folder, 'hub'); a timm ViT without weights is a random init, the same at every call (seed 0), so runs from it share one base."
    if checkpoint == 'hub' and model in EMBEDDED_MODELS:
        raise ValueError(f"checkpoint 'hub' means timm's weights of a timm model name; the embedded model {model!r} has none: "
                         'pass its weights file, or nothing for its own')
    path = checkpoint_file(checkpoint) if checkpoint and checkpoint != 'hub' else None
    if model not in EMBEDDED_MODELS:
        with torch.random.fork_rng(devices=[]):  # the caller's random state untouched
            torch.manual_seed(0); m = create_vit(model, pretrained=path or checkpoint == 'hub', **kw)
    elif path is None: m = load_embedded_model(model)
    else: m = load_checkpoint(path)[0] if checkpoint_card(path) is not None else load_plain_checkpoint(model, path)
    return m.to(device).eval()

def base_card(model: str = 'default', checkpoint: str = '') -> dict:
    "The card (architecture, its kwargs, …) of the model `get_model(model, checkpoint)` builds: its checkpoint's, the registry's, or a timm name's."
    if model not in EMBEDDED_MODELS: return dict(arch=model, arch_kwargs={})
    card = checkpoint_card(checkpoint_file(checkpoint or repo_root() / EMBEDDED_MODELS[model]['checkpoint']))
    return card or dict(arch=EMBEDDED_MODELS[model]['arch'], arch_kwargs=EMBEDDED_MODELS[model]['kwargs'])

def loader_size(model: nn.Module) -> dict:
    "`img_size` and `crop_pct` to load an image folder for `model` at: its ViT's input size; the whole image below 224 px (CIFAR-scale), timm's 0.875 centre crop from 224 px (ImageNet-scale)."
    size = input_size(model)[0]
    return dict(img_size=size, crop_pct=0.875 if size >= 224 else 1.0)
def experiment_model(model: str = 'default', checkpoint: str = '', device: str | torch.device = 'cpu', *, smoke: bool = False) -> PixelViT:
    "An experiment's model (`get_model`); a smoke run on a clone without an embedded model's weights gets 02's smoke weights or a random init."
    if smoke and model in EMBEDDED_MODELS and not checkpoint and not (repo_root() / EMBEDDED_MODELS[model]['checkpoint']).exists():
        fallback = repo_root() / f'runs/smoke/pretrain/{Path(EMBEDDED_MODELS[model]["checkpoint"]).name}'  # 02_pretrain in smoke mode
        return get_model(model, str(fallback), device) if fallback.exists() else embedded_vit(model).to(device).eval()
    return get_model(model, checkpoint, device)



# %%
# an experiment's model is `get_model`'s; with the default weights present a smoke run gets them too
test_eq(weights_digest(experiment_model('default', smoke=True)), weights_digest(get_model('default')))
test_fail(lambda: experiment_model('default', '/nonexistent.safetensors'), contains='does not exist')


# %%
test_eq(get_model('vit_tiny_patch16_224', img_size=32, patch_size=8, num_classes=10)(torch.rand(1, 3, 32, 32)).shape, (1, 10))
test_fail(lambda: get_model('default', checkpoint='/nonexistent.safetensors'), contains='does not exist')
base = get_model('default')
with tempfile.TemporaryDirectory() as d:  # every form of checkpoint, as the console scripts pass it
    torch.save(base.state_dict(), Path(d) / 'default.pth')  # a plain state dict of the default model: the same model
    test_eq(weights_digest(get_model('default', str(Path(d) / 'default.pth'))), weights_digest(base))
    run = save_checkpoint(base, Path(d) / 'run' / 'model.safetensors', base_card()).parent
    test_eq(weights_digest(get_model('default', str(run))), weights_digest(base))  # a run folder: its model
    torch.save(t8.vit.state_dict(), Path(d) / 'ti8.pth')
    test_eq(weights_digest(get_model('vit-ti8', str(Path(d) / 'ti8.pth'))), weights_digest(t8))
    torch.save(m.state_dict(), Path(d) / 'm.pth')  # a timm name takes a PixelViT's state dict too
    test_eq(weights_digest(get_model('vit_tiny_patch16_224', str(Path(d) / 'm.pth'), img_size=32, patch_size=8, num_classes=10)), weights_digest(m))
    test_eq(base_card()['arch_kwargs'], DEFAULT_ARCH_KWARGS)  # the committed weights' card
    test_eq(base_card('default', str(run))['arch_kwargs'], DEFAULT_ARCH_KWARGS)  # the run's card
    test_eq(base_card('vit-ti8', str(Path(d) / 'ti8.pth')), dict(arch=DEFAULT_ARCH, arch_kwargs=EMBEDDED_MODELS['vit-ti8']['kwargs']))
    test_eq(base_card('vit_small_patch16_224', 'hub'), dict(arch='vit_small_patch16_224', arch_kwargs={}))
    old = save_checkpoint(t8, Path(d) / 'old_ti8.safetensors', model_card(t8, 'vit-ti8', {}))  # a vit-ti8 finetune's card before base_card
    test_eq(weights_digest(load_checkpoint(old)[0]), weights_digest(t8))
test_fail(lambda: get_model('default', 'hub'), contains="the embedded model 'default' has none")
test_eq(loader_size(base), dict(img_size=32, crop_pct=1.0))
test_eq(loader_size(create_vit('vit_tiny_patch16_224', depth=1)), dict(img_size=224, crop_pct=0.875))
