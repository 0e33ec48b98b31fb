"""Issue 29, a newcomer's first hour: every option of both commands is explained, `make help` lists every target, and
the README answers on one screen (the finding with its numbers, the two set-up commands and the main job in its first
40 lines; no machine path, no tool's warning)."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def parsers():
    from ns_vit import evaluate, experiments
    return {'ns-vit-finetune': experiments.cli_parser(), 'ns-vit-evaluate': evaluate.cli_parser()}


@pytest.mark.parametrize('name', ['ns-vit-finetune', 'ns-vit-evaluate'])
def test_every_option_has_a_description_and_the_help_ends_with_an_example(name):
    p = parsers()[name]
    assert p.prog == name
    undescribed = [a.option_strings for a in p._actions if not (a.help or '').strip()]
    assert undescribed == [], f'{name}: options without a description: {undescribed}'
    text = p.format_help()  # a stray % in a help would raise here
    last = text.rstrip().splitlines()[-1].strip()  # the help ends with an example command
    assert 'examples:' in text and last.startswith((name, 'torchrun')), last


def test_finetune_help_comes_from_the_dataclass_comments():
    "One source: each FinetuneConfig option's help is its field's trailing comment, with its default and choices."
    from dataclasses import asdict
    from fastcore.docments import docments
    from ns_vit.finetune import FinetuneConfig, METHODS
    helps = {a.dest: a.help for a in parsers()['ns-vit-finetune']._actions}
    comments = docments(FinetuneConfig)
    for field in asdict(FinetuneConfig()):
        assert helps[field].replace('%%', '%').startswith(comments[field]), field
    assert helps['method'].endswith('; choices: ' + ', '.join(METHODS))
    help_text = ' '.join(parsers()['ns-vit-finetune'].format_help().split())
    assert "(reference: torch's default 0.9) (default: 0.9)" in help_text


def makefile_targets() -> list[str]:
    return re.findall(r'^([A-Za-z0-9_-]+):(?!=)', (ROOT / 'Makefile').read_text(), flags=re.M)


@pytest.mark.skipif(shutil.which('make') is None, reason='make is not installed')
def test_make_help_lists_every_target_with_its_description():
    out = subprocess.run(['make', '-s', 'help'], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    listed = dict(re.findall(r'^  make (\S+)\s+(.*)$', out, flags=re.M))
    targets = makefile_targets()
    assert {'install', 'test', 'readme', 'help', 'study'} <= set(targets)
    assert sorted(listed) == sorted(targets)
    assert [t for t, d in listed.items() if d == '(no description)'] == []


def test_readme_answers_on_one_screen():
    "The committed README (make readme) passes the check that make readme applies to what it renders."
    from ns_vit.report import README_MUST, HEADLINE, readme_problems
    text = (ROOT / 'README.md').read_text()
    assert readme_problems(text) == []
    top = '\n'.join(text.splitlines()[:40])
    assert 'make install' in top and 'make test' in top and README_MUST[-1] in top
    if (ROOT / HEADLINE).exists():  # the finding, with its numbers
        first = (ROOT / HEADLINE).read_text().strip().splitlines()[0]
        assert first in top and re.search(r'\d', first)
    assert '/work/' not in text and 'Warning' not in text and 'site-packages' not in text
