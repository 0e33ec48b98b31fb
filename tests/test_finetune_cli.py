"""The finetuning console script: a run killed with SIGKILL resumes to the same weights as an uninterrupted run,
and two processes under torchrun (gloo, CPU) give the same model as one process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ns_vit.models import create_vit, save_checkpoint, model_card

ROOT = Path(__file__).resolve().parents[1]
ARCH_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)


def tiny_checkpoint(d: Path) -> Path:
    torch.manual_seed(0)
    m = create_vit('vit_tiny_patch16_224', **ARCH_KW)
    return save_checkpoint(m, d / 'tiny.safetensors', model_card(m, 'vit_tiny_patch16_224', ARCH_KW))


def args(ckpt: Path, out: Path, steps: int, **extra) -> list[str]:
    a = ['--checkpoint', str(ckpt), '--out', str(out), '--steps', str(steps), '--batch-size', '32',
         '--refresh-every', '5', '--train-fraction', '0.01', '--noise-max-steps', '20', '--noise-batch', '32',
         '--eval-size', '0', '--lr', '1e-3', '--warmup-steps', '2', '--device', 'cpu']
    for k, v in extra.items(): a += [f'--{k.replace("_", "-")}', str(v)]
    return a


def cmd(*a: str) -> list[str]:
    return [sys.executable, '-m', 'ns_vit.experiments', *a]


def weights(out: Path) -> dict:
    return load_file(str(out / 'model.safetensors'))


def test_kill9_then_resume_matches_uninterrupted(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    ref, killed = tmp_path / 'ref', tmp_path / 'killed'
    subprocess.run(cmd(*args(ckpt, ref, 60)), check=True, cwd=ROOT, capture_output=True)
    p = subprocess.Popen(cmd(*args(ckpt, killed, 60)), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / 'state.pt'
    t0 = time.time()
    while not state.exists() and p.poll() is None and time.time() - t0 < 120: time.sleep(0.01)
    assert p.poll() is None, 'the run ended before it could be killed; make it longer'
    os.kill(p.pid, signal.SIGKILL); p.wait()
    step_at_kill = torch.load(state, weights_only=True)['step']
    assert 0 < step_at_kill < 60 and not (killed / 'model.safetensors').exists()
    subprocess.run(cmd(*args(ckpt, killed, 60)), check=True, cwd=ROOT, capture_output=True)  # resume
    a, b = weights(ref), weights(killed)
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), k
    assert json.loads((killed / 'metrics.json').read_text())['logs']['train'][-1]['step'] == 60


def test_torchrun_two_processes_match_one(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    one, two = tmp_path / 'one', tmp_path / 'two'
    common = dict(augment='false')
    subprocess.run(cmd(*args(ckpt, one, 10, **common)), check=True, cwd=ROOT, capture_output=True)
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        '-m', 'ns_vit.experiments', *args(ckpt, two, 10, **common)],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    m1, m2 = json.loads((one / 'metrics.json').read_text()), json.loads((two / 'metrics.json').read_text())
    assert [x['noise_norm'] for x in m1['logs']['rounds']] == [x['noise_norm'] for x in m2['logs']['rounds']]
    a, b = weights(one), weights(two)
    for k in a: assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), (k, (a[k] - b[k]).abs().max())
