"""The browser check itself, on a tiny site with known faults: run by `make docs-check` before it checks the real site
(it needs Debian's chromium, which `make test` does not install)."""
import importlib.util
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(path: str):
    "A module from a file of the repository (tools/ holds scripts, not packages)."
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_browser_check_catches_broken_pages(tmp_path):
    assert shutil.which('chromium') and shutil.which('chromedriver'), 'install Debian chromium and chromium-driver (apt-get install -y chromium chromium-driver)'
    check = load('tools/check_site.py')
    (tmp_path / 'reports/table2_robustness').mkdir(parents=True)
    (tmp_path / 'favicon.ico').write_bytes(b'')
    (tmp_path / 'reports/table2_robustness/index.html').write_text('<html><body><h1>Table 2</h1><a href="../../index.html">home</a></body></html>')
    (tmp_path / 'index.html').write_text('<html><body><a href="reports/table2_robustness/index.html">Table 2</a></body></html>')
    shot = tmp_path / 'shot.png'
    assert check.check(tmp_path, shot) == [] and shot.read_bytes()[:4] == b'\x89PNG'  # a good site passes
    (tmp_path / 'index.html').write_text('<html><body><a href="reports/table2_robustness/index.html">Table 2</a> <a href="gone.html">x</a>'
                                         '<img src="nope.png"><script>notDefined()</script></body></html>')
    problems = '\n'.join(check.check(tmp_path, None))
    for what in ('link gone.html answers 404', 'image did not load', 'notDefined', 'request for /nope.png answered 404'): assert what in problems
