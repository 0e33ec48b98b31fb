"""Check the built site in a real browser (`make docs-check`): serve _site/ on localhost, load every page in headless
Chromium, and fail if a page logs an error (a script error, or a resource that did not load), an image does not
load (naturalWidth 0), an internal link answers 404, any request to the server answers 404, or the Table 2 page is
more than two clicks from the home page. Saves a screenshot of the Table 2 page.

Needs Debian's `chromium` and `chromium-driver` (`apt-get install -y chromium chromium-driver`) and the `selenium`
package (`make docs-check` installs it).

    python tools/check_site.py [--site _site] [--screenshot reports/table2_robustness/site_screenshot.png]
"""
from __future__ import annotations
import argparse, functools, shutil, sys, threading, urllib.error, urllib.request
from collections import deque
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urldefrag, urlparse

ROOT = Path(__file__).resolve().parents[1]
TABLE2 = 'reports/table2_robustness/index.html'  # the page a reader must reach from the home page in two clicks
# every <img> settled (loaded or failed), then its URL and natural width; lazy images are made eager first
IMAGES_JS = '''
const done = arguments[arguments.length - 1];
const imgs = Array.from(document.images);
imgs.forEach(i => { i.loading = 'eager'; });
Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; setTimeout(r, 5000); })))
  .then(() => done(imgs.map(i => [i.currentSrc || i.src, i.naturalWidth])));
'''
# MathJax has typeset the page (its queue has run), or the page has no MathJax
MATHJAX_JS = '''
const done = arguments[arguments.length - 1];
if (window.MathJax && MathJax.Hub && MathJax.Hub.Queue) MathJax.Hub.Queue(() => done(true)); else done(false);
'''


class Server(ThreadingHTTPServer):
    "A static file server on 127.0.0.1 that records the status of every request."
    def __init__(self, site: Path):
        self.log: list[tuple[str, int]] = []
        super().__init__(('127.0.0.1', 0), functools.partial(Handler, directory=str(site)))


class Handler(SimpleHTTPRequestHandler):
    def log_request(self, code='-', size='-'):
        self.server.log.append((self.path, int(code) if str(code).isdigit() else 0))

    def log_message(self, *args): pass  # quiet

    def handle(self):
        try: super().handle()
        except (BrokenPipeError, ConnectionResetError): pass  # the browser moved on to the next page mid-transfer


def browser(width: int = 1280, height: int = 900):
    "Headless Debian Chromium through its chromedriver, logging the console."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    chrome, driver = shutil.which('chromium') or shutil.which('chromium-browser'), shutil.which('chromedriver')
    if not chrome or not driver:
        sys.exit('headless Chromium not found: apt-get install -y chromium chromium-driver (Debian packages)')
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', f'--window-size={width},{height}',
              '--disable-background-networking', '--no-first-run'):
        opts.add_argument(a)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    return webdriver.Chrome(service=Service(driver), options=opts)


def status(url: str) -> int:
    "HTTP status of a GET on the local server."
    try:
        with urllib.request.urlopen(url, timeout=10) as r: return r.status
    except urllib.error.HTTPError as e: return e.code


def check(site: Path, screenshot: Path | None) -> list[str]:
    "Every problem found on the site, as readable lines (empty: all good)."
    if not (site / 'index.html').exists(): return [f'{site}/index.html not found: run make docs first']
    server = Server(site)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f'http://127.0.0.1:{server.server_address[1]}/'
    pages = sorted(p.relative_to(site).as_posix() for p in site.glob('**/*.html'))
    problems, links, graph = [], {}, {}
    drv = browser()
    try:
        drv.set_page_load_timeout(60); drv.set_script_timeout(30)
        for page in pages:
            drv.get(base + page)
            drv.execute_async_script(MATHJAX_JS)
            for e in drv.get_log('browser'):
                if e['level'] == 'SEVERE': problems.append(f'{page}: console error: {e["message"][:300]}')
            for src, w in drv.execute_async_script(IMAGES_JS):
                if not w: problems.append(f'{page}: image did not load: {src[:120]}')
            hrefs = drv.execute_script('return Array.from(document.querySelectorAll("a[href]")).map(a => a.href)')
            internal = {urldefrag(h)[0] for h in hrefs if h.startswith(base)}
            graph[page] = {urlparse(h).path.lstrip('/') or 'index.html' for h in internal}
            for h in internal: links.setdefault(h, page)
            if page == TABLE2 and screenshot is not None:
                h = drv.execute_script('return document.documentElement.scrollHeight')
                drv.set_window_size(1280, min(max(h, 900), 2400))
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                drv.save_screenshot(str(screenshot))
                drv.set_window_size(1280, 900)
    finally:
        drv.quit()
    for url, page in sorted(links.items()):
        if (s := status(url)) >= 400: problems.append(f'{page}: link {url[len(base):]} answers {s}')
    problems += [f'request for {path} answered {code}' for path, code in server.log if code >= 400]
    server.shutdown()
    if TABLE2 not in pages: problems.append(f'{TABLE2} is not in the site: the Table 2 report is missing (make reports)')
    elif clicks('index.html', TABLE2, graph) > 2: problems.append(f'{TABLE2} is more than two clicks from the home page')
    print(f'checked {len(pages)} pages, {len(links)} internal links, {len(server.log)} requests')
    return problems


def clicks(start: str, goal: str, graph: dict[str, set[str]]) -> float:
    "The fewest clicks from page `start` to page `goal` over the links found (inf: unreachable)."
    seen, todo = {start: 0}, deque([start])
    while todo:
        p = todo.popleft()
        if p == goal: return seen[p]
        for q in graph.get(p, ()):
            if q not in seen: seen[q] = seen[p] + 1; todo.append(q)
    return float('inf')


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--site', default=str(ROOT / '_site'), help='the built site (default: _site/)')
    ap.add_argument('--screenshot', default=str(ROOT / 'reports/table2_robustness/site_screenshot.png'),
                    help="where the Table 2 page's screenshot goes ('' for none)")
    args = ap.parse_args()
    found = check(Path(args.site), Path(args.screenshot) if args.screenshot else None)
    for line in found: print('FAIL', line)
    print(f'{len(found)} problems' if found else 'site check passed')
    sys.exit(1 if found else 0)
