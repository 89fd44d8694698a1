"""The docs site: nbdev's docs configuration, and pages built offline (.ci/render_docs.py) as a browser shows them.

Quarto itself is not needed: the pages come from nbdev's own processing (what `nbdev_docs` hands to Quarto)
converted by nbconvert, and headless Chromium renders them. Without Chromium the browser checks are skipped.
"""
import html
import inspect
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
API_NB, API_PAGE = '05_drr.ipynb', 'drr.html'      # one API notebook: fast to process, documents render_drr
BROWSERS = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')


# ------------------------------------------------------------------------------------- configuration (no browser)
def test_nbdev_yml_is_what_nbdev_writes():
    "nbdev_docs rewrites nbs/nbdev.yml from settings.ini on every build: the committed file must already be that."
    from nbdev.config import get_config
    from nbdev.quarto import _nbdev_yml
    cfg = get_config()
    vals = {k: cfg[k] for k in ['title', 'description', 'branch', 'git_url', 'doc_host', 'doc_baseurl']}
    vals['doc_path'] = cfg.doc_path.name
    assert (NBS / 'nbdev.yml').read_text(encoding='utf-8') == _nbdev_yml.format(**vals), \
        'nbs/nbdev.yml is out of date with settings.ini: run `python -c "from nbdev.quarto import refresh_quarto_yml; refresh_quarto_yml()"`'
    site = yaml.safe_load((NBS / 'nbdev.yml').read_text(encoding='utf-8'))
    assert site['project']['output-dir'] == '_docs'
    assert site['website']['site-url'] == cfg.doc_host + cfg.doc_baseurl and site['website']['repo-url'] == cfg.git_url


def test_quarto_yml():
    q = yaml.safe_load((NBS / '_quarto.yml').read_text(encoding='utf-8'))
    assert q['project']['type'] == 'website'
    html_fmt = q['format']['html']
    assert html_fmt['css'] == 'styles.css' and (NBS / 'styles.css').exists() and html_fmt['toc'] is True
    assert {'nbdev.yml', 'sidebar.yml'} <= set(q['metadata-files'])
    assert 'execute' not in q, 'the processed notebooks cannot be executed by Quarto (nbdev removed their imports)'


def _sidebar_pages(entries):
    for e in entries:
        if isinstance(e, dict):
            if e.get('href'): yield e['href']
            yield from _sidebar_pages(e.get('contents') or [])
        else: yield e


def test_sidebar_lists_every_notebook():
    "sidebar.yml is kept by hand (custom_sidebar = True, or nbdev_docs would overwrite it): no page may be left out."
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    assert get_config().custom_sidebar, 'settings.ini must say custom_sidebar = True, or nbdev_docs regenerates sidebar.yml'
    spec = yaml.safe_load((NBS / 'sidebar.yml').read_text(encoding='utf-8'))
    listed = list(_sidebar_pages(spec['website']['sidebar']['contents']))
    assert listed[0] == 'index.ipynb' and len(listed) == len(set(listed))
    numbered = [p for p in listed if re.match(r'\d+_', p)]
    assert numbered == sorted(numbered), 'module notebooks in data-flow (file-number) order'
    present = {Path(p).relative_to(NBS).as_posix() for p in nbglob(NBS, func=Path)}
    assert not present - set(listed), f'notebooks missing from nbs/sidebar.yml: {sorted(present - set(listed))}'


# ------------------------------------------------------------------------------------------ offline build
@pytest.fixture(scope='module')
def site(tmp_path_factory):
    """Every page, built by the offline docs script without executing anything: the pages show what the notebooks store.

    nbdev executes the cells that contain imports while it processes a notebook for the docs (to resolve show_doc):
    an example cell that mixes imports with code that needs earlier cells fails there, though the notebook tests pass."""
    tmp = tmp_path_factory.mktemp('docs')
    r = subprocess.run([sys.executable, str(ROOT / '.ci' / 'render_docs.py'), '--out', str(tmp / 'site'),
                        '--proc', str(tmp / 'proc'), '-j', '2'], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return tmp / 'site'


def test_every_notebook_builds(site):
    "nbdev's processing of every notebook (what `nbdev_docs` runs before Quarto) succeeds and gives a page each."
    nbs = ROOT / 'nbs'
    notebooks = [p for p in nbs.rglob('*.ipynb') if not any(part.startswith(('.', '_')) for part in p.relative_to(nbs).parts)]
    assert len(notebooks) >= 21, notebooks
    pages = list(site.rglob('*.html'))
    assert len(pages) >= len(notebooks), (sorted(p.name for p in pages), len(notebooks))


# The pages a newcomer looks at first must show pictures, not only code: the front page, the results, every tutorial,
# and the modules whose subject is an image (projection geometry, DRRs, phantoms, the cascade, the viewer).
FIGURE_PAGES = ['index.html', 'results.html', 'geometry.html', 'drr.html', 'phantoms.html', 'cascade.html', 'viewer.html']
DATA_PNG = re.compile(r'<img[^>]*\ssrc="data:image/png;base64,([^"]+)"')


def tutorial_pages():
    return sorted(f'tutorials/{p.stem}.html' for p in (NBS / 'tutorials').glob('*.ipynb'))


def test_pages_show_figures(site):
    "Built without executing anything, each of these pages holds at least one figure (an <img> with PNG data)."
    assert len(tutorial_pages()) >= 5
    counts = {page: len(DATA_PNG.findall((site / page).read_text(encoding='utf-8'))) for page in FIGURE_PAGES + tutorial_pages()}
    assert all(n >= 1 for n in counts.values()), f'pages without a figure: {[p for p, n in counts.items() if not n]} ({counts})'


def readme_figures_and_table():
    "README.md's images (bytes, in order) and the rows of its first Markdown table."
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    images = [(ROOT / p).read_bytes() for p in re.findall(r'!\[[^\]]*\]\(([^)\s]+\.png)\)', readme)]
    table = re.search(r'((?:^\|.*\|\n)+)', readme, flags=re.M).group(1).splitlines()
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in table if not set(line) <= set('|-: ')]
    return images, rows


def test_readme_shows_the_front_pages_figure_and_table(site):
    "README.md (from index.ipynb's stored outputs) holds the front page's figure, byte for byte, and its quality table."
    import base64
    images, rows = readme_figures_and_table()
    page = (site / 'index.html').read_text(encoding='utf-8')
    on_page = [base64.b64decode(b) for b in DATA_PNG.findall(page)]
    assert images and images == on_page, (len(images), len(on_page))
    assert rows[0][:2] == ['at 64³', 'PSNR (dB)'] and any(r[0] == 'stage 3 (64³)' for r in rows), rows
    cells = [visible_text(c).strip() for c in re.findall(r'<t[dh](?:\s[^>]*)?>(.*?)</t[dh]>', page, flags=re.S)]
    for row in rows:
        assert all(c in cells for c in row), f'README table row not on the front page: {row}'


def test_build_fails_naming_the_notebook(tmp_path):
    "A notebook whose show_doc processing fails makes the script exit 1 and name it; the others are still built."
    nbs = tmp_path / 'nbs'
    nbs.mkdir()
    kernel = {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}}
    def notebook(name, *sources):
        cells = [{'cell_type': 'code', 'execution_count': None, 'id': f'c{i}', 'metadata': {}, 'outputs': [],
                  'source': src} for i, src in enumerate(sources)]
        (nbs / name).write_text(json.dumps({'cells': cells, 'metadata': kernel, 'nbformat': 4, 'nbformat_minor': 5}))
    notebook('broken.ipynb', '#| export\nimport no_such_module_xyz')
    notebook('fine.ipynb', '#| export\ndef f(x:int): # a number\n    "Twice x."\n    return 2 * x')
    r = subprocess.run([sys.executable, str(ROOT / '.ci' / 'render_docs.py'), '--nbs', str(nbs), 'broken.ipynb', 'fine.ipynb',
                        '--out', str(tmp_path / 'site'), '--proc', str(tmp_path / 'proc')],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1, r.stdout + r.stderr
    failed = [l for l in r.stderr.splitlines() if l.startswith('FAILED:')]
    assert len(failed) == 1 and 'broken.ipynb' in failed[0] and 'no_such_module_xyz' in r.stderr, r.stdout + r.stderr
    assert (tmp_path / 'site' / 'fine.html').exists() and not (tmp_path / 'site' / 'broken.html').exists()
    assert 'Twice x.' in (tmp_path / 'site' / 'fine.html').read_text(encoding='utf-8')


def test_pages_written(site):
    assert (site / 'index.html').exists() and (site / API_PAGE).exists()
    home = (site / 'index.html').read_text(encoding='utf-8')
    links = re.findall(r'href="([^"]*)"', home)
    assert not [l for l in links if '.ipynb' in l], 'links between pages must point to .html pages'
    assert f'href="{API_PAGE}"' in home                     # the sidebar links the API page


# ----------------------------------------------------------------------------------------------- browser
class _Text(HTMLParser):
    "Visible text of a DOM (no script/style), whitespace collapsed."
    def __init__(self):
        super().__init__(); self.parts, self.skip = [], 0
    def handle_starttag(self, tag, attrs): self.skip += tag in ('script', 'style')
    def handle_endtag(self, tag): self.skip -= tag in ('script', 'style') and self.skip > 0
    def handle_data(self, data):
        if not self.skip: self.parts.append(data)


def visible_text(dom):
    p = _Text(); p.feed(dom)
    return re.sub(r'\s+', ' ', ''.join(p.parts))


@pytest.fixture(scope='module')
def browser():
    exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if exe is None:
        pytest.skip('headless Chromium is not installed: `apt-get install -y chromium` (Debian/Ubuntu) to run the '
                    'browser checks of the docs pages')
    return exe


@pytest.fixture(scope='module')
def chrome(browser, tmp_path_factory):
    "Run headless Chromium on a page: ('dom', path) -> DOM text, ('shot', path) -> screenshot PNG path."
    profile = tmp_path_factory.mktemp('chromium-profile')
    def run(mode, page):
        base = [browser, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars', f'--user-data-dir={profile}',
                '--window-size=1280,2000']
        if mode == 'dom':
            r = subprocess.run(base + ['--dump-dom', page.as_uri()], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0 and '<body' in r.stdout, r.stderr[-2000:]
            return r.stdout
        png = page.with_suffix('.png')
        r = subprocess.run(base + [f'--screenshot={png}', page.as_uri()], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and png.exists(), r.stderr[-2000:]
        return png
    return run


def readme_title_and_commands():
    "The README's title and its first two shell commands (the quickstart and the test command)."
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    title = re.search(r'^# (.+)$', readme, flags=re.M).group(1).strip()
    commands = re.findall(r'```bash\n(.*?)\n```', readme, flags=re.S)[:2]
    assert len(commands) == 2, 'README.md should hold the two commands in ```bash blocks'
    return title, commands


def test_home_page_shows_readme(chrome, site):
    dom = chrome('dom', site / 'index.html')
    text = visible_text(dom)
    title, commands = readme_title_and_commands()
    assert re.search(rf'<h1[^>]*>\s*{re.escape(html.escape(title))}\s*</h1>', dom), 'page title from the front matter'
    for cmd in commands:
        assert re.sub(r'\s+', ' ', cmd.strip()) in text, f'command not on the home page: {cmd}'
    for heading in re.findall(r'^## (.+)$', (ROOT / 'README.md').read_text(encoding='utf-8'), flags=re.M):
        assert heading.strip() in text


def test_api_page_shows_show_doc(chrome, site):
    from progressive_ct.drr import render_drr
    dom = chrome('dom', site / API_PAGE)
    # nbdev's show_doc: a heading with the name (Pandoc-style id, the target of doc links) and the signature
    assert re.search(r'<h3[^>]*id="render_drr"[^>]*>\s*render_drr', dom)
    text = visible_text(dom)
    sig = text[text.index('def render_drr('):]
    sig = sig[:min(i for i in (sig.find(')->'), sig.find('):')) if i >= 0) + 1]   # up to the signature's closing parenthesis
    for name in inspect.signature(render_drr).parameters:
        assert re.search(rf'\b{name}\s*[:=,)]', sig), f'parameter {name} missing from the rendered signature'
    assert '# linear attenuation' in sig, 'the per-parameter comments (nbdev docments) are shown'
    assert inspect.getdoc(render_drr).splitlines()[0] in text
    assert '#|' not in text, 'cell directives must not show'


@pytest.mark.parametrize('page', ['index.html', API_PAGE])
def test_screenshot_not_blank(chrome, site, page):
    import matplotlib.image as mpimg
    png = chrome('shot', site / page)
    assert png.stat().st_size > 20_000, f'{png.name}: {png.stat().st_size} bytes'
    img = mpimg.imread(png)[..., :3]
    assert img.shape[:2] == (2000, 1280)
    gray = img.mean(axis=2)
    content = gray[:1000, 300:]                            # right of the sidebar: title and first paragraphs
    assert gray.std() > 0.05 and content.std() > 0.05, f'{page}: screenshot looks uniform'
    dark = (content < 0.5).mean()                          # text pixels: present, but not a dark/failed page
    assert 0.005 < dark < 0.5, f'{page}: {dark:.3f} of the content area is dark'
    assert len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50


def test_front_page_figures_load_in_chromium(chrome, site, tmp_path):
    "Headless Chromium opens the front page and decodes every image on it (complete, over 100 px wide, once loaded)."
    page = tmp_path / 'index_probe.html'
    probe = ("<script>window.addEventListener('load', () => document.body.setAttribute('data-images', "
             "JSON.stringify(Array.from(document.images, i => [i.complete, i.naturalWidth, i.naturalHeight]))));</script>")
    text = (site / 'index.html').read_text(encoding='utf-8')
    page.write_text(text.replace('</body>', probe + '</body>'), encoding='utf-8')
    dom = chrome('dom', page)
    found = re.search(r'data-images="([^"]*)"', dom)
    assert found, 'the load event did not run'
    images = json.loads(html.unescape(found.group(1)))
    assert len(images) >= 1 and all(done and w > 100 and h > 50 for done, w, h in images), images
    assert len(images) == len(DATA_PNG.findall(text))


# ------------------------------------------------------------------------------------------ publishing (GitHub Pages)
def _workflow(name):
    wf = yaml.safe_load((ROOT / '.github' / 'workflows' / name).read_text(encoding='utf-8'))
    wf['on'] = wf.pop(True, wf.get('on'))                 # YAML 1.1 reads the key `on` as True
    return wf


def test_pages_workflow_publishes_what_nbdev_docs_builds():
    "nbdev's deploy workflow: on a push to the docs branch, install (CPU torch), nbdev_docs, push doc_path to gh-pages."
    from nbdev.config import get_config
    cfg = get_config()
    wf = _workflow('deploy.yaml')
    assert cfg.branch in wf['on']['push']['branches'] and 'workflow_dispatch' in wf['on']
    assert wf['permissions'] == {'contents': 'write', 'pages': 'write'}
    steps = wf['jobs']['deploy']['steps']
    runs = '\n'.join(s.get('run', '') for s in steps)
    uses = [s.get('uses', '') for s in steps]
    assert 'download.pytorch.org/whl/cpu' in runs and 'pip install -e ".[dev]"' in runs
    assert any(u.startswith('quarto-dev/quarto-actions/setup') for u in uses)
    order = [i for i, s in enumerate(steps) if 'nbdev_docs' in s.get('run', '') or 'actions-gh-pages' in s.get('uses', '')]
    assert len(order) == 2 and 'nbdev_docs' in steps[order[0]].get('run', ''), 'build, then deploy'
    deploy = steps[order[1]]['with']
    assert deploy['publish_dir'] == f'./{cfg.doc_path.name}' and deploy['force_orphan'] is True


def test_ci_workflow_runs_the_ci_script():
    steps = _workflow('test.yaml')['jobs']['test']['steps']
    assert any('bash .ci/run' in s.get('run', '') for s in steps)
