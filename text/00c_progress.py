# %% [markdown]
# # Progress bars
# > When ns_vit draws a progress bar: for a person at a terminal or in Jupyter, never in tests or in papermill's executed copies.

# %%
#| default_exp progress

# %% [markdown]
# Every loop of ns_vit that takes more than a few seconds shows a tqdm bar, and every one of them takes its `tqdm` from
# here. Two things go wrong without this module:
#
# - **Executed copies full of bars.** Under papermill a text bar is written to the notebook on every redraw, and the
#   executed copy keeps each redraw as an output: notebooks 08 and 09 were about 1 MB each, mostly bars that nobody
#   reads after the run. `show_progress()` is False in a kernel that papermill started, and under `nbdev_test` and
#   pytest; `NS_VIT_PROGRESS=1` (or `0`) overrides it either way.
# - **A warning with this machine's paths.** In a Jupyter kernel without ipywidgets the first import of `tqdm.auto`,
#   ours or timm's (timm imports huggingface_hub, which imports `tqdm.auto`), warns
#   `…/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found. Please update jupyter and
#   ipywidgets.` Nothing is wrong: tqdm falls back to its text bar. The warning named the `.venv` of the machine that
#   ran the notebook in every executed copy, so `quiet_tqdm_import()` filters that one message (and no other tqdm
#   warning) before anything imports `tqdm.auto`: this module calls it as it is imported, and `ns_vit.models` calls it
#   before it imports timm.

# %%
#| export
from __future__ import annotations
import os, sys, warnings
from pathlib import Path
from tqdm.std import TqdmWarning

def quiet_tqdm_import() -> None:
    "Filter tqdm's 'IProgress not found' warning (a Jupyter kernel without ipywidgets; tqdm draws text bars instead)."
    warnings.filterwarnings('ignore', message='IProgress not found', category=TqdmWarning)

quiet_tqdm_import()  # before tqdm.auto is imported, here or by timm
from tqdm.auto import tqdm as auto_tqdm

# %%
#| hide
import subprocess
from unittest.mock import patch
from fastcore.test import test_eq, test_fail

# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.warn('IProgress not found. Please update jupyter and ipywidgets. See https://ipywidgets.readthedocs.io', TqdmWarning)
    warnings.warn('another tqdm warning', TqdmWarning)
test_eq([str(w.message) for w in caught], ['another tqdm warning'])  # only the one message is filtered


# %% [markdown]
# ## Whether to draw
# A kernel that papermill started is told apart by its parent process: papermill (`papermill …` or
# `python -m papermill …`) starts the kernel, Jupyter's server or VS Code start it in an interactive session. Where
# `/proc` is not available the parent is unknown and bars are drawn; set `NS_VIT_PROGRESS=0` there.

# %%
#| export
def _parent_cmdline() -> str:
    "The command line of this process's parent ('' where /proc cannot say)."
    try: return Path(f'/proc/{os.getppid()}/cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace').strip()
    except OSError: return ''

def under_papermill() -> bool:
    "True in a Jupyter kernel that papermill started: everything the notebook prints stays in its executed copy."
    return 'ipykernel' in sys.modules and 'papermill' in _parent_cmdline()

def show_progress() -> bool:
    "Whether bars are drawn: `NS_VIT_PROGRESS` (1 or 0) when set; else not under nbdev_test, pytest or papermill."
    env = os.environ.get('NS_VIT_PROGRESS', '').strip()
    if env in ('0', '1'): return env == '1'
    if env: raise ValueError(f'NS_VIT_PROGRESS is {env!r}: set it to 1 (progress bars on) or 0 (off), or unset it')
    return not (os.environ.get('IN_TEST') or os.environ.get('PYTEST_CURRENT_TEST') or under_papermill())


# %%
def env(**kv):
    "os.environ with `kv` for a `with` block ('' unsets a variable)."
    return patch.dict(os.environ, {k: v for k, v in os.environ.items() if k not in kv} | {k: v for k, v in kv.items() if v}, clear=True)
with env(NS_VIT_PROGRESS='1'): test_eq(show_progress(), True)
with env(NS_VIT_PROGRESS='0'): test_eq(show_progress(), False)
with env(NS_VIT_PROGRESS='', IN_TEST='1'): test_eq(show_progress(), False)  # nbdev_test
with env(NS_VIT_PROGRESS='', IN_TEST='', PYTEST_CURRENT_TEST='x.py::test (call)'): test_eq(show_progress(), False)  # pytest
with env(NS_VIT_PROGRESS='', IN_TEST='', PYTEST_CURRENT_TEST=''): test_eq(show_progress(), not under_papermill())  # a person
with env(NS_VIT_PROGRESS='yes'): test_fail(show_progress, contains='set it to 1 (progress bars on) or 0')
if Path('/proc/self/cmdline').exists():  # a child process reads this process's command line as its parent's
    import ns_vit
    child = subprocess.run([sys.executable, '-c', 'from ns_vit.progress import _parent_cmdline; print(_parent_cmdline())'],
                           cwd=Path(ns_vit.__file__).parents[1], capture_output=True, text=True, check=True).stdout.strip()
    test_eq(child, Path('/proc/self/cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace').strip())


# %% [markdown]
# ## The bar
# `tqdm` is `tqdm.auto`'s bar (a widget in Jupyter with ipywidgets, text elsewhere) that is disabled where
# `show_progress()` is False. Modules import it from here instead of from `tqdm.auto`, and a caller's `disable=True`
# (the `quiet` arguments of ns_vit's functions) still hides a bar wherever it is.

# %%
#| export
class tqdm(auto_tqdm):
    "`tqdm.auto.tqdm`, disabled where `show_progress()` is False."
    def __init__(self, *args, disable: bool = False, **kwargs):
        super().__init__(*args, disable=disable or not show_progress(), **kwargs)


# %%
with env(NS_VIT_PROGRESS='1'):
    test_eq(tqdm(range(3)).disable, False); test_eq(tqdm(range(3), disable=True).disable, True)
with env(NS_VIT_PROGRESS='0'):
    bar = tqdm(range(3)); test_eq(bar.disable, True); test_eq(list(bar), [0, 1, 2])  # a disabled bar still iterates
