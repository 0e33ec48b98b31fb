"""Every experiment notebook runs end-to-end through papermill with smoke-sized parameters, from the repo root,
as a user would type it, and writes its artifacts under runs/smoke/reports/<artifact>/."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# notebook -> (artifact folders it must write, extra papermill parameters)
EXPERIMENTS = {
    '02_pretrain.ipynb': (['pretrain'], {}),
    '03_nullspace.ipynb': (['table1_nullspace_dims', 'fig2_exact_nullspace'], {}),
    '04a_fig3_approx_nullspace.ipynb': (['fig3_approx_nullspace'], {}),
    '04b_fig5_closure.ipynb': (['fig5_closure'], {}),
    '05_finetune.ipynb': (['finetune/ns-eps0.03'], {}),
    '06a_attacks.ipynb': (['attack_budgets'], {}),
    '06b_corruptions.ipynb': (['corruptions'], {}),
    '06d_damagenet.ipynb': (['damagenet_cifar10'], {}),
    '07_table3_robustness.ipynb': (['table3_robustness'], {}),
    '08_table4_eps_ablation.ipynb': (['table4_eps_ablation'], {}),
    '09_table2_robustness.ipynb': (['table2_robustness'], {}),
    '10_blend.ipynb': (['fig6_watermark', 'fig7_lookalike'], {}),
    '10a_explain.ipynb': (['fig8_10_saliency'], {}),
    '10b_fingerprint.ipynb': (['fingerprint'], {}),
    '11_reproduction.ipynb': (['reproduction/quick', 'reproduction/screen'], {}),
    '12_benchmarks.ipynb': (['benchmarks'], {}),
}


def has_parameters_cell(nb: Path) -> bool:
    cells = json.loads(nb.read_text())['cells']
    return any('parameters' in c.get('metadata', {}).get('tags', []) for c in cells)


def test_every_parameterised_notebook_is_listed():
    found = {p.name for p in (ROOT / 'nbs').glob('*.ipynb') if has_parameters_cell(p)}
    assert found == set(EXPERIMENTS), f'papermill notebooks not covered by the smoke tests: {found ^ set(EXPERIMENTS)}'


@pytest.mark.parametrize('name', sorted(EXPERIMENTS))
def test_notebook_smoke(name, tmp_path):
    artifacts, extra = EXPERIMENTS[name]
    args = ['-p', 'smoke', 'True']
    for k, v in extra.items(): args += ['-p', k, str(v)]
    out = tmp_path / name
    r = subprocess.run([sys.executable, '-m', 'papermill', f'nbs/{name}', str(out), '--cwd', str(ROOT), *args],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    for a in artifacts:
        d = ROOT / 'runs' / 'smoke' / 'reports' / a
        meta = json.loads((d / 'meta.json').read_text())
        assert meta['params'].get('smoke') is True
        assert any(d.glob('*.png')) or any(d.glob('*.md')), f'{d} holds no figure or table'
