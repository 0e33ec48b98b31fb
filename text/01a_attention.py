# %% [markdown]
# # Attention maps
# > Record a timm ViT's attention probabilities (and their gradients) with hooks, without forking timm.

# %%
#| default_exp attention

# %%
#| export
from __future__ import annotations
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator
from torch import nn, Tensor
from ns_vit.models import as_vit, token_layout  # `token_layout` re-exported here (`_all_`)
_all_ = ['token_layout']

# %%
import torch
from fastcore.test import test_eq, test_close, test_fail
from ns_vit.models import create_vit


# %% [markdown]
# timm computes attention with `F.scaled_dot_product_attention` when `fused_attn` is on, so the probabilities never
# exist as a tensor. With it off, `Attention.forward` computes `attn.softmax(-1)` and passes it through
# `attn_drop` (an `nn.Dropout`, identity in eval mode): a forward hook on `attn_drop` sees the probabilities
# (B, H, T, T), where T counts the prefix tokens (class and register tokens) and the patch tokens.
# `record_attention` switches `fused_attn` off per attention module for the duration of the context, hooks every
# block, and restores both afterwards, so the model is the same object before and after. The two code paths are the
# same mathematics; the test below checks that the logits agree.

# %%
#| export
@dataclass
class AttentionRecord:
    "Attention probabilities (B, H, T, T) per block, in block order, and their gradients when asked for."
    maps: list[Tensor] = field(default_factory=list)
    grads: list[Tensor | None] = field(default_factory=list)
    def clear(self) -> None: self.maps.clear(); self.grads.clear()

def _attention_modules(model: nn.Module) -> list[nn.Module]:
    "The attention module of every block of the ViT inside `model`."
    mods = [b.attn for b in as_vit(model).blocks]
    if not all(hasattr(m, 'attn_drop') and hasattr(m, 'fused_attn') for m in mods):
        raise TypeError('record_attention needs timm Attention modules (with fused_attn and attn_drop) in every block')
    return mods

@contextmanager
def record_attention(model: nn.Module, retain_grad: bool = False) -> Iterator[AttentionRecord]:
    "Within the context every forward of `model` appends each block's attention (B, H, T, T) to the record."
    rec, mods = AttentionRecord(), _attention_modules(model)
    def hook(module, inputs, out: Tensor) -> None:
        i = len(rec.maps); rec.maps.append(out); rec.grads.append(None)
        if retain_grad and out.requires_grad:
            def save(g: Tensor, i=i) -> None: rec.grads[i] = g
            out.register_hook(save)
    fused = [m.fused_attn for m in mods]
    handles = [m.attn_drop.register_forward_hook(hook) for m in mods]
    for m in mods: m.fused_attn = False
    try: yield rec
    finally:
        for h in handles: h.remove()
        for m, f in zip(mods, fused): m.fused_attn = f


# %%
def tiny(**kw):
    torch.manual_seed(0)
    return create_vit('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, **kw).eval()

x = torch.rand(3, 3, 32, 32)
for kw in (dict(), dict(global_pool='avg', class_token=False), dict(reg_tokens=2)):
    m = tiny(**kw)
    mods = _attention_modules(m)
    for a in mods: a.fused_attn = True
    ref = m(x)
    with record_attention(m) as rec: out = m(x)
    T = as_vit(m).num_prefix_tokens + 16
    test_eq(len(rec.maps), 2); test_eq(rec.maps[0].shape, (3, 2, T, T))
    test_close(rec.maps[0].sum(-1), torch.ones(3, 2, T))  # rows are probability distributions
    test_close(out, ref, eps=1e-5)  # the hooks and the unfused path leave the logits unchanged
    test_eq([a.fused_attn for a in mods], [True, True])  # restored
    test_eq(sum(len(a.attn_drop._forward_hooks) for a in mods), 0)  # hooks removed

# %% [markdown]
# With `retain_grad=True` the record also holds ∂(whatever is back-propagated)/∂attention per block, which
# gradient-weighted relevance methods need. The record is filled even when the forward raises: the context still
# restores the model.

# %%
m = tiny()
with record_attention(m, retain_grad=True) as rec:
    m(x)[:, 0].sum().backward()
assert all(g is not None and g.shape == a.shape for a, g in zip(rec.maps, rec.grads))
try:
    with record_attention(m): raise RuntimeError('boom')
except RuntimeError: pass
assert all(b.attn.fused_attn == f for b, f in zip(as_vit(m).blocks, [b.attn.fused_attn for b in as_vit(tiny()).blocks]))
test_fail(lambda: record_attention(nn.Linear(2, 2)).__enter__(), contains='timm VisionTransformer')

# %% [markdown]
# ## Token layout
# `token_layout` lives in `ns_vit.models` (a ViT's geometry) and is re-exported here: the prefix tokens and the patch grid.

# %%
test_eq(token_layout(tiny()), (1, (4, 4)))
test_eq(token_layout(tiny(reg_tokens=2)), (3, (4, 4)))
test_eq(token_layout(tiny(global_pool='avg', class_token=False)), (0, (4, 4)))
