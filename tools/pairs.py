"""Text pairs of the notebooks for readable reviews and diffs: `nbs/<name>.ipynb` -> `text/<name>.py` (jupytext's
py:percent format). The notebooks stay the source; the pairs are generated (`make pairs`) and checked (`make check-pairs`),
so no pairing metadata is added to the notebooks.

    python tools/pairs.py            # write text/*.py, remove pairs of notebooks that no longer exist
    python tools/pairs.py --check    # exit 1, naming the files, when a pair is missing, stale or orphaned
"""
from __future__ import annotations
import argparse, sys
from pathlib import Path
import jupytext

ROOT = Path(__file__).resolve().parents[1]
NBS, TEXT = ROOT / 'nbs', ROOT / 'text'


def pair_text(nb: Path) -> str:
    "The py:percent text of notebook `nb`, without the notebook-metadata header (so a jupytext upgrade changes no pair)."
    book = jupytext.read(nb)
    book.metadata.setdefault('jupytext', {})['notebook_metadata_filter'] = '-all'
    return jupytext.writes(book, fmt='py:percent')


def expected() -> dict[Path, str]:
    "Every pair as it should be: text/<name>.py -> its text."
    return {TEXT / f'{nb.stem}.py': pair_text(nb) for nb in sorted(NBS.glob('*.ipynb'))}


def stale(want: dict[Path, str]) -> list[str]:
    "Pairs that are missing, differ from their notebook, or have no notebook."
    have = set(TEXT.glob('*.py'))
    out = [f'{p.relative_to(ROOT)}: missing' for p in want if p not in have]
    out += [f'{p.relative_to(ROOT)}: out of date with nbs/{p.stem}.ipynb' for p in want if p in have and p.read_text() != want[p]]
    return out + [f'{p.relative_to(ROOT)}: no notebook nbs/{p.stem}.ipynb' for p in sorted(have - set(want))]


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--check', action='store_true', help='only check; exit 1 when a pair is out of date')
    args, want = ap.parse_args(), expected()
    if args.check:
        bad = stale(want)
        for line in bad: print(line)
        if bad: sys.exit(f'{len(bad)} text pairs out of date: run make pairs')
        print(f'{len(want)} text pairs in sync')
    else:
        TEXT.mkdir(exist_ok=True)
        for p in set(TEXT.glob('*.py')) - set(want): p.unlink()
        for p, text in want.items():
            if not p.exists() or p.read_text() != text: p.write_text(text)
        print(f'{len(want)} text pairs in {TEXT.relative_to(ROOT)}/')
