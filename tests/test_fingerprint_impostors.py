"""Notebook 10b's impostor run (`make fingerprint-impostors`, i.e. `-p impostors True`) end-to-end at smoke size: the
near-accuracy negatives, other parties' finetunes of the same parent and the short-finetune evasion, with the table of
false-positive rates per kind and the sentence on what a match certifies, in runs/smoke/reports/fingerprint/impostors/.
(The default run, impostors off, is covered by test_notebooks.py.)"""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_fingerprint_impostors_smoke(tmp_path):
    out = ROOT / 'runs' / 'smoke' / 'reports' / 'fingerprint' / 'impostors'
    for f in out.glob('*'): f.unlink()  # only this run's files count
    r = subprocess.run([sys.executable, '-m', 'papermill', 'nbs/10b_fingerprint.ipynb', str(tmp_path / '10b.ipynb'), '--cwd', str(ROOT),
                        '-p', 'smoke', 'True', '-p', 'impostors', 'True'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['params']['smoke'] is True and meta['params']['impostors'] is True
    assert meta['certifies'] in ('ancestry', 'ownership', 'neither')
    assert not (out / 'fingerprint_distances.md').exists()  # the default run's tables stay in reports/fingerprint
    kinds = pd.read_csv(out / 'fpr_by_kind.csv').set_index(['frame', 'kind'])
    params = meta['params']
    sib = kinds.loc[('B: owner = a finetune of the public parent', "other parties' finetunes of the same parent")]
    assert sib.n == len(params['siblings']) and 0 <= sib.ci_low <= sib.match_rate <= sib.ci_high <= 1
    assert kinds.loc[('A: owner = the released model', 'own init, near accuracy')].n == params['n_near']
    assert kinds.loc[('B: owner = a finetune of the public parent', 'the public parent itself')].n == 1
    assert ((kinds.matches <= kinds.n) & (kinds.distance_min <= kinds.distance_max)).all()
    verdict = pd.read_csv(out / 'certifies.csv')
    assert verdict.certifies.item() == meta['certifies'] and verdict.certifies.item() in verdict.sentence.item()
    evasions = pd.read_csv(out / 'evasions.csv')
    assert len(evasions) == 3 and evasions.evasion.str.startswith('short plain finetune').any()
    imp = pd.read_csv(out / 'impostors.csv')
    assert len(imp) == 2 + len(params['siblings']) + params['n_near'] and (out / 'impostors.png').exists()
