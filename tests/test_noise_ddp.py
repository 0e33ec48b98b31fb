"""The streamed ε-noise under torch.distributed: two gloo processes, each descending on its own half of every fresh
batch, end with the same δ on both ranks and the same δ as one process fed the same global batches."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = r'''
import os, sys, torch, torch.distributed as dist
from ns_vit.models import create_vit
from ns_vit.noise import eps_noise
distributed = int(os.environ.get('WORLD_SIZE', 1)) > 1
if distributed: dist.init_process_group('gloo')
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
torch.manual_seed(0)
m = create_vit('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10).eval()
with torch.no_grad(): m.vit.head.weight.mul_(50)
pool = [torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(100 + k)) for k in range(300)]
stream = (b[rank::world] for b in pool)  # this rank's slice of every global batch
d, info = eps_noise(m, stream, eps=float(sys.argv[2]), lim=3.0, lr=0.05, max_steps=int(sys.argv[3]), lam=0.0,
                    weight_decay=0.01, schedule_steps=100, generator=torch.Generator().manual_seed(1), distributed=True)
torch.save(dict(delta=d, info=info), f'{sys.argv[1]}/rank{rank}.pt')
if distributed: dist.destroy_process_group()
'''


def run(tmp: Path, nproc: int, eps: float, max_steps: int) -> list[dict]:
    out = tmp / f'np{nproc}-{eps}'; out.mkdir()
    script = tmp / 'worker.py'; script.write_text(WORKER)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, str(script), str(out), str(eps), str(max_steps)]
    if nproc > 1: cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc), *cmd[1:]]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(out / f'rank{k}.pt', weights_only=True) for k in range(nproc)]


def test_two_ranks_hold_one_delta_equal_to_one_process(tmp_path):
    for eps, max_steps in ((0.2, 300), (0.001, 12)):  # a round that stops early, and one that runs to the cap
        one, = run(tmp_path, 1, eps, max_steps)
        r0, r1 = run(tmp_path, 2, eps, max_steps)
        assert torch.equal(r0['delta'], r1['delta'])  # one δ everywhere
        assert r0['info']['steps'] == r1['info']['steps'] == one['info']['steps']
        assert r0['info']['converged'] == one['info']['converged'] == (eps == 0.2)
        assert torch.allclose(r0['delta'], one['delta'], atol=1e-4, rtol=1e-4), (r0['delta'] - one['delta']).abs().max()
        if eps == 0.2: assert abs(r0['info']['mse_prob'] - one['info']['mse_prob']) < 1e-5
