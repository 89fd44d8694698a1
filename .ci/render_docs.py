"""The docs site without Quarto: nbdev's own notebook processing, then one standalone HTML page per notebook.

    python .ci/render_docs.py                              # every notebook in nbs/ -> _docs_offline/
    python .ci/render_docs.py index.ipynb 05_drr.ipynb     # only these (paths relative to nbs/, or nbs/...)
    python .ci/render_docs.py --execute                    # also run the notebooks, to show their outputs
    python .ci/render_docs.py --out DIR --proc DIR -j 2
    python .ci/render_docs.py --nbs DIR x.ipynb            # notebooks from another folder (tests)

Step 1 is what `nbdev_docs` (nbdev 2.4.14) does before it hands over to Quarto (`_pre_docs`): regenerate
sidebar.yml unless `custom_sidebar = True`, then process each notebook with nbdev's `FilterDefaults` into `_proc/`: front
matter, show_doc cells added after exported definitions and executed, exported and hidden cells removed,
symbol names linked. It reuses nbdev's functions for each step, per notebook, so that a failure names its
notebook. Three steps are left out, so that the build writes no tracked file: installing Quarto, rewriting nbs/nbdev.yml
from settings.ini (tests/test_docs.py checks it is already that), and rewriting `progressive_ct/_modidx.py`
(nbdev_export writes the same index, and CI checks that nbdev_export changes nothing); a stale file is reported.

Step 2 stands in for `quarto render`: every processed notebook becomes a page with nbconvert's HTMLExporter,
honouring the Quarto cell options nbdev relies on (`echo`, `output`, `include`), with the page title and
description from the front matter, the sidebar from nbs/sidebar.yml, nbs/styles.css, and links rewritten so
the pages link to each other locally (`x.ipynb` and the site's own URLs -> the local `.html` page). Page names
are Quarto's (`01_geometry.ipynb` -> `geometry.html`, `index.ipynb` -> `index.html`, the home page).

Outputs. Quarto does not execute `.ipynb` files, so the site `nbdev_docs` builds shows what the notebooks store:
code, prose, nbdev's show_doc signatures, and the outputs each notebook carries (figures, tables, printed results),
which `python .ci/outputs.py write` stores and CI checks are current. That is what this script renders by default,
executing nothing: it is what users of the site see, and it takes seconds per notebook. `--execute` runs each
source notebook first (nbclient, a fresh kernel, working directory = the notebook's folder, `--timeout` seconds per
notebook, cells skipped as `nbdev_test` skips them: `tst_flags` from settings.ini, `#| eval: false`), then processes
the executed copy: a preview of a notebook edited since its outputs were stored. The processed copy cannot be
executed instead, because nbdev has removed its hidden cells (the imports) by then.

Exit status 1 names every notebook whose processing or page failed.
"""
import argparse
import asyncio
import html
import json
import os
import posixpath
import re
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
CELL_KEYS = {'markdown': {'cell_type', 'id', 'metadata', 'source', 'attachments'},
             'raw': {'cell_type', 'id', 'metadata', 'source', 'attachments'},
             'code': {'cell_type', 'id', 'metadata', 'source', 'outputs', 'execution_count'}}
OPTION = re.compile(r'^\s*#\|\s?(.*)$')


# ---------------------------------------------------------------------------------------------------- step 1
def refresh_config(nbs):
    "The configuration steps of nbdev's `_pre_docs` as checks: nothing tracked is written (nbdev_docs writes them)."
    from nbdev.quarto import nbdev_sidebar
    nbdev_sidebar.__wrapped__(path=nbs)               # a no-op while settings.ini has custom_sidebar = True
    for stale in (nbdev_yml_stale(), modidx_stale()):
        if stale: print(f'WARNING: {stale}')


def nbdev_yml_stale():
    "Say if nbs/nbdev.yml is not what nbdev_docs would write from settings.ini (Quarto reads it; this build does not)."
    from nbdev.config import get_config
    from nbdev.quarto import _nbdev_yml
    cfg = get_config()
    vals = {k: cfg[k] for k in ['title', 'description', 'branch', 'git_url', 'doc_host', 'doc_baseurl']}
    vals['doc_path'] = cfg.doc_path.name
    path = Path(cfg.nbs_path) / 'nbdev.yml'
    if not path.exists() or path.read_text(encoding='utf-8') != _nbdev_yml.format(**vals):
        return f'{path.resolve().relative_to(ROOT)} is not what nbdev_docs writes from settings.ini'
    return None


def modidx_stale():
    "Build the symbol index nbdev_docs would write into a scratch copy of the package; say if it differs."
    from nbdev.config import get_config
    from nbdev.doclinks import _build_modidx
    cfg = get_config()
    lib = Path(cfg.lib_path)
    current = lib / '_modidx.py'
    nbs = Path(cfg.nbs_path).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        # the copy sits where the package sits relative to nbs/: the index records notebook paths that way
        copy = Path(tmp) / lib.resolve().relative_to(ROOT)
        shutil.copytree(lib, copy, ignore=shutil.ignore_patterns('__pycache__', '_modidx.py'))
        (Path(tmp) / nbs.relative_to(ROOT)).symlink_to(nbs, target_is_directory=True)
        in_test = os.environ.pop('IN_TEST', None)    # _build_modidx does nothing under IN_TEST
        try: _build_modidx(dest=copy, nbs_path=Path(tmp) / nbs.relative_to(ROOT))
        finally:
            if in_test is not None: os.environ['IN_TEST'] = in_test
        fresh = (copy / '_modidx.py').read_text(encoding='utf-8')
    if not current.exists() or current.read_text(encoding='utf-8') != fresh:
        return f'{current.relative_to(ROOT)} is not the index of the package now: run nbdev_export (doc links may be stale)'
    return None


def select_notebooks(nbs, names):
    "Source notebooks to build: the ones named, or every notebook nbdev_docs would render."
    from nbdev.doclinks import nbglob
    if not names:
        return sorted(Path(p).resolve() for p in nbglob(nbs, func=Path))
    out = []
    for name in names:
        p = Path(name)
        cands = [p if p.is_absolute() else ROOT / p, nbs / p]
        found = next((c.resolve() for c in cands if c.is_file()), None)
        if found is None: sys.exit(f'render_docs: no notebook {name} (looked in {ROOT} and {nbs})')
        out.append(found)
    return out


def _skip_directives(cell, flags):
    d = {}
    for line in cell.source.splitlines():
        m = OPTION.match(line)
        if not m: break
        key, _, val = m.group(1).strip().partition(' ')
        d[key.rstrip(':')] = val.strip().lower()
    return d.get('eval') == 'false' or bool(flags & d.keys())


def execute_notebook(src, dst, timeout, flags):
    "Run `src` in a fresh kernel from its folder, skipping cells as nbdev_test does; write the result to `dst`."
    from nbclient import NotebookClient
    nb = nbformat.read(src, as_version=4)
    skipped = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == 'code' and ('nbdev_export' + '(' in cell.source or _skip_directives(cell, flags)):
            skipped[i], cell.source = cell.source, ''
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3', allow_errors=False,
                            resources={'metadata': {'path': str(src.parent)}})
    try:
        asyncio.run(asyncio.wait_for(client.async_execute(), timeout))
    except asyncio.TimeoutError:
        raise RuntimeError(f'did not finish within {timeout} s (--timeout)') from None
    for i, source in skipped.items(): nb.cells[i].source = source
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)


def _process_one(src, dst, execute, timeout, flags):
    "Worker: (optionally execute, then) process one notebook with nbdev's FilterDefaults into `dst`."
    os.chdir(ROOT)                                     # nbdev_docs runs from the project root
    start = time.time()
    try: _run_one(src, dst, execute, timeout, flags)
    except Exception as e:                             # the chain does not survive the trip back: flatten it
        msg, cause = f'{type(e).__name__}: {e}', e.__cause__ or e.__context__
        while cause is not None:
            msg += f'\n  caused by {type(cause).__name__}: {cause}'
            cause = cause.__cause__ or cause.__context__
        raise RuntimeError(msg) from None
    return time.time() - start


def _run_one(src, dst, execute, timeout, flags):
    import nbdev.serve_drv
    from nbdev.processors import FilterDefaults
    if execute:
        os.environ.pop('MPLBACKEND', None)             # the kernel's inline backend must capture figures
        with tempfile.TemporaryDirectory() as tmp:
            executed = Path(tmp) / src.name
            execute_notebook(src, executed, timeout, flags)
            nbdev.serve_drv.main((executed, dst, FilterDefaults))
    else:
        nbdev.serve_drv.main((src, dst, FilterDefaults))


def process(nbs, notebooks, proc, execute, timeout, workers):
    "nbdev's `proc_nbs` for the selected notebooks, one process per notebook; returns {notebook: error}."
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    import nbdev.serve
    from nbdev.serve import _proc_file
    cfg = get_config()
    # proc_nbs's cache rule: a cache older than settings.ini or nbdev's processor is thrown away
    chk_mtime = max(cfg.config_file.stat().st_mtime, Path(nbdev.serve.__file__).stat().st_mtime)
    if proc.exists() and (execute or proc.stat().st_mtime < chk_mtime): shutil.rmtree(proc)
    proc.mkdir(parents=True, exist_ok=True)
    cache_mtime = proc.stat().st_mtime
    # the non-notebook files nbdev copies along (yml, css, images), and _quarto.yml
    others = [p for p in nbglob(nbs, func=Path, file_glob='', file_re='') if p.suffix != '.ipynb']
    others += [nbs / n for n in ('_quarto.yml', '_brand.yml') if (nbs / n).exists()]
    for p in others: _proc_file(p, proc, nbs, mtime=cache_mtime)
    jobs = {}
    for src in notebooks:
        if execute:
            dst = proc / src.relative_to(nbs)
            dst.parent.mkdir(parents=True, exist_ok=True)
            jobs[src] = dst
            continue
        todo = _proc_file(src, proc, nbs, mtime=cache_mtime)   # None when the cached copy is up to date
        if todo: jobs[src] = todo[1]
        else: print(f'  {src.relative_to(nbs)}: processed copy up to date')
    errors = {}
    flags = set(str(cfg.get('tst_flags', '')).split())
    # A fresh interpreter per notebook (spawned, as nbdev's proc_nbs does): show_doc runs the notebook's code
    # in an IPython shell, which also takes over the worker's __main__. The worker function is this file
    # imported as a module, not __main__. Python 3.10 lacks max_tasks_per_child: one pool per notebook there.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import render_docs
    items = list(jobs.items())
    if sys.version_info >= (3, 11): batches, kw = [items], {'max_tasks_per_child': 1}
    else: batches, kw = [[item] for item in items], {}
    for batch in batches:
        with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=get_context('spawn'), **kw) as pool:
            futures = {src: pool.submit(render_docs._process_one, src, dst, execute, timeout, flags) for src, dst in batch}
            for src, fut in futures.items():
                try: print(f'  {src.relative_to(nbs)}: processed in {fut.result():.1f} s')
                except Exception as e:
                    errors[src] = str(e) if isinstance(e, RuntimeError) else f'{type(e).__name__}: {e}'
                    jobs[src].unlink(missing_ok=True)      # no half-written copy in the cache
    proc.touch()
    return errors


# ---------------------------------------------------------------------------------------------------- step 2
def _pandoc_to_html(text):
    "The few Pandoc/Quarto markdown extensions nbdev's output uses, as plain HTML."
    def link(m):
        attrs = ' '.join(f'{k}="{html.escape(v)}"' for k, v in re.findall(r'([\w-]+)="([^"]*)"', m.group(3)))
        return f'<a href="{html.escape(m.group(2))}" {attrs}>{m.group(1)}</a>'
    text = re.sub(r'\[([^\]]*)\]\(([^)\s]+)\)\{([^}]*)\}', link, text)            # [source](url){target=...}
    text = re.sub(r'^:::+\s*\{([^}]*)\}\s*$',                                       # ::: {.callout-note}
                  lambda m: '<div class="{}">\n'.format(' '.join(c.lstrip('.') for c in m.group(1).split()
                                                                 if c.startswith('.'))), text, flags=re.M)
    text = re.sub(r'^:::+\s*$', '\n</div>', text, flags=re.M)
    text = re.sub(r'^(#{1,6} .*?)\s*\{#[\w-]+[^}]*\}\s*$', r'\1', text, flags=re.M)  # heading attributes
    return text


def _cell_options(cell):
    "Quarto cell options (`#| key: value` lines at the top of a code cell), and the source without them."
    lines = cell.source.splitlines()
    opts, i = {}, 0
    while i < len(lines) and OPTION.match(lines[i]):
        try: parsed = yaml.safe_load(OPTION.match(lines[i]).group(1))
        except yaml.YAMLError: parsed = None
        if isinstance(parsed, dict): opts.update(parsed)
        i += 1
    return opts, '\n'.join(lines[i:]).strip('\n')


def load_processed(path):
    "A processed notebook as nbformat, front matter taken out: (notebook, front matter dict)."
    raw = json.loads(path.read_text(encoding='utf-8'))
    cells, fm = [], {}
    for c in raw.get('cells', []):
        if 'source' not in c: continue                           # removed by nbdev (hidden, exported)
        c = {k: v for k, v in c.items() if k in CELL_KEYS.get(c.get('cell_type'), set())}
        src = ''.join(c['source']) if isinstance(c['source'], list) else c['source']
        if c['cell_type'] == 'raw' and not fm and src.lstrip().startswith('---'):
            fm = yaml.safe_load(src.strip().strip('-')) or {}
            continue
        c['source'] = src
        c.setdefault('metadata', {})
        if c['cell_type'] == 'code': c.setdefault('outputs', []); c.setdefault('execution_count', None)
        cells.append(c)
    raw['cells'] = cells
    raw.setdefault('metadata', {}).pop('widgets', None)
    nb = nbformat.from_dict(raw)
    nb.nbformat, nb.nbformat_minor = 4, max(5, raw.get('nbformat_minor', 5))
    for i, c in enumerate(nb.cells):
        if 'id' not in c: c['id'] = f'cell-{i}'
    return nb, fm


def quarto_cells(nb):
    "Apply the Quarto cell options and markdown extensions the way the site shows them."
    keep = []
    for cell in nb.cells:
        if cell.cell_type == 'markdown':
            cell.source = _pandoc_to_html(cell.source)
        elif cell.cell_type == 'code':
            opts, cell.source = _cell_options(cell)
            tags = set(cell.metadata.get('tags', []))
            if opts.get('include') is False: continue
            if opts.get('echo') is False or not cell.source.strip(): tags.add('remove_input')
            if opts.get('output') is False: tags.add('remove_output')
            for out in cell.get('outputs', []):
                data = out.get('data', {})
                if 'text/markdown' in data:
                    md = data['text/markdown']
                    data['text/markdown'] = _pandoc_to_html(''.join(md) if isinstance(md, list) else md)
            if 'remove_input' in tags and (not cell.outputs or 'remove_output' in tags): continue
            cell.metadata['tags'] = sorted(tags)
        elif cell.cell_type == 'raw':
            continue                                                 # Quarto drops raw cells of other formats
        keep.append(cell)
    nb.cells = keep
    return nb


def page_name(rel):
    "The page Quarto writes for a notebook (nbdev's output-file rule): 01_geometry.ipynb -> geometry.html."
    from nbdev.doclinks import _nbpath2html
    return _nbpath2html(Path(rel)).as_posix()


def sidebar(nbs, built, current):
    "The sidebar of nbs/sidebar.yml as HTML: links to the pages built, other entries as plain text."
    spec = yaml.safe_load((nbs / 'sidebar.yml').read_text(encoding='utf-8')) if (nbs / 'sidebar.yml').exists() else {}
    contents = (((spec or {}).get('website') or {}).get('sidebar') or {}).get('contents') or []
    here = posixpath.dirname(current)

    def title(rel):
        p = nbs / rel
        if p.suffix == '.ipynb' and p.exists():
            try:
                first = json.loads(p.read_text(encoding='utf-8'))['cells'][0]
                src = ''.join(first['source'])
                if first['cell_type'] == 'raw' and src.lstrip().startswith('---'):
                    t = (yaml.safe_load(src.strip().strip('-')) or {}).get('title')
                    if t: return str(t)
            except Exception: pass
        return Path(rel).stem

    def items(entries):
        out = []
        for e in entries:
            if isinstance(e, dict) and 'section' in e:
                out.append(f'<li class="section"><span>{html.escape(str(e["section"]))}</span>'
                           f'<ul>{"".join(items(e.get("contents") or []))}</ul></li>')
                continue
            rel = e.get('href') if isinstance(e, dict) else str(e)
            if not rel: continue
            page = page_name(rel)
            label = html.escape(e.get('text') if isinstance(e, dict) and e.get('text') else title(rel))
            if page in built:
                cls = ' class="active"' if page == current else ''
                out.append(f'<li><a{cls} href="{posixpath.relpath(page, here or ".")}">{label}</a></li>')
            else:
                out.append(f'<li><span class="missing" title="not built: {html.escape(rel)}">{label}</span></li>')
        return out
    return f'<nav class="docs-sidebar"><ul>{"".join(items(contents))}</ul></nav>', contents


OFFLINE_CSS = """
body { margin: 0; }
nav.docs-sidebar { position: fixed; top: 0; left: 0; bottom: 0; width: 15rem; overflow-y: auto;
  padding: 1rem 0.75rem; background: #f7f8fa; border-right: 1px solid #dde1e6; font: 14px/1.5 system-ui, sans-serif; }
nav.docs-sidebar ul { list-style: none; padding-left: 0; margin: 0; }
nav.docs-sidebar ul ul { padding-left: 0.8rem; }
nav.docs-sidebar li.section > span { display: block; margin-top: 0.8rem; font-weight: 600; }
nav.docs-sidebar a { display: block; padding: 0.1rem 0.4rem; color: #1f5fa8; text-decoration: none; border-radius: 3px; }
nav.docs-sidebar a.active { background: #2780e3; color: white; }
nav.docs-sidebar span.missing { display: block; padding: 0.1rem 0.4rem; color: #999; }
main.docs-page { margin-left: 16.5rem; max-width: 60rem; padding: 1rem 1.5rem 4rem; }
header.docs-title { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; padding: 0 0.5rem; }
header.docs-title h1 { margin-bottom: 0.2rem; }
.jp-RenderedMarkdown pre, .jp-RenderedHTMLCommon pre { background: #f5f6f8; padding: 0.5rem 0.75rem; border-radius: 4px; }
"""


def rewrite_links(page_html, page, src_rel, site_url, built):
    "Local links: `x.ipynb` -> its page; the site's own absolute URLs -> the local page when it was built."
    here = posixpath.dirname(page) or '.'
    src_dir = posixpath.dirname(src_rel)

    def fix(m):
        attr, url = m.group(1), html.unescape(m.group(2))
        path, hash_, frag = url.partition('#')
        target = None
        if site_url and path.startswith(site_url + '/'):
            cand = path[len(site_url) + 1:] or 'index.html'
            if cand in built: target = cand
        elif path.endswith('.ipynb') and not re.match(r'^[a-z][a-z0-9+.-]*:|^/', path):
            target = page_name(posixpath.normpath(posixpath.join(src_dir, path)))
        if target is None: return m.group(0)
        return f'{attr}="{html.escape(posixpath.relpath(target, here) + hash_ + frag)}"'
    return re.sub(r'(href)="([^"]*)"', fix, page_html)


def render_page(proc_nb, src_rel, nbs, built, site_url, css, exporter):
    nb, fm = load_processed(proc_nb)
    page = posixpath.join(posixpath.dirname(src_rel), fm.get('output-file') or Path(page_name(src_rel)).name)
    nb = quarto_cells(nb)
    title = str(fm.get('title') or Path(src_rel).stem)
    body, _ = exporter.from_notebook_node(nb, resources={'metadata': {'name': title}})
    head = f'<header class="docs-title"><h1 class="title">{html.escape(title)}</h1>'
    if fm.get('description'): head += f'<div class="description">{html.escape(str(fm["description"]))}</div>'
    head += '</header>'
    nav, _ = sidebar(nbs, built, page)
    body = body.replace('</head>', f'<style>{css}\n{OFFLINE_CSS}</style>\n</head>', 1)
    body, n = re.subn(r'(<body[^>]*>)', lambda m: f'{m.group(1)}\n{nav}\n<main class="docs-page">\n{head}\n', body, count=1)
    if not n: raise RuntimeError('nbconvert page has no <body>')
    body = body.replace('</body>', '</main>\n</body>', 1)
    return page, rewrite_links(pandoc_ids(body), page, src_rel, site_url, built)


def pandoc_ids(page_html):
    "Heading ids in lower case, as Pandoc makes them (nbdev's doc links point to `page.html#name`)."
    ids = {}
    def heading(m):
        ids[m.group(2)] = m.group(2).lower()
        return f'{m.group(1)}{m.group(2).lower()}"'
    page_html = re.sub(r'(<h[1-6][^>]*?\sid=")([^"]+)"', heading, page_html)
    return re.sub(r'href="#([^"]+)"', lambda m: f'href="#{ids.get(m.group(1), m.group(1))}"', page_html)


def make_exporter():
    from nbconvert import HTMLExporter
    from traitlets.config import Config
    c = Config()
    c.TagRemovePreprocessor.enabled = True
    c.TagRemovePreprocessor.remove_cell_tags = ('remove_cell',)
    c.TagRemovePreprocessor.remove_input_tags = ('remove_input',)
    c.TagRemovePreprocessor.remove_all_outputs_tags = ('remove_output',)
    c.HTMLExporter.exclude_input_prompt = True
    c.HTMLExporter.exclude_output_prompt = True
    return HTMLExporter(config=c, template_name='lab')


def copy_assets(nbs, out):
    "Files the pages may refer to (images, css): everything in nbs/ but notebooks, yml and hidden folders."
    from nbdev.doclinks import nbglob
    for p in nbglob(nbs, func=Path, file_glob='', file_re=''):
        if p.suffix in ('.ipynb', '.yml', '.yaml', '.py'): continue
        dst = out / p.relative_to(nbs)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n', 2)[2])
    ap.add_argument('notebooks', nargs='*', help='notebooks to build (default: all of nbs/)')
    ap.add_argument('--nbs', default=None, help="notebook folder (default: settings.ini's nbs_path)")
    ap.add_argument('--out', default='_docs_offline', help='output folder (default: %(default)s)')
    ap.add_argument('--proc', default=None, help='processed notebooks (default: _proc, as nbdev_docs; '
                                                  '_proc_executed with --execute)')
    ap.add_argument('--execute', action='store_true', help='run each notebook before processing it')
    ap.add_argument('--timeout', type=int, default=900, help='seconds per notebook with --execute (default: %(default)s)')
    ap.add_argument('-j', '--workers', type=int, default=1, help='notebooks processed at once (default: %(default)s)')
    args = ap.parse_args(argv)

    os.chdir(ROOT)
    from nbdev.config import get_config
    cfg = get_config()
    nbs = Path(args.nbs or cfg.nbs_path).resolve()
    out = Path(args.out).resolve()
    proc = Path(args.proc or ('_proc_executed' if args.execute else '_proc')).resolve()
    for folder, what in ((proc, '--proc'), (out, '--out')):     # the cache folder may be deleted and rebuilt
        if folder == ROOT or folder in ROOT.parents or folder == nbs or nbs in folder.parents or folder in nbs.parents:
            sys.exit(f'render_docs: {what} {folder} would overwrite the project or its notebooks; pick another folder')
    start = time.time()

    print('== step 1: nbdev processing (as nbdev_docs before Quarto)')
    refresh_config(nbs)
    notebooks = select_notebooks(nbs, args.notebooks)
    errors = process(nbs, notebooks, proc, args.execute, args.timeout, args.workers)

    print(f'== step 2: HTML pages -> {out}')
    out.mkdir(parents=True, exist_ok=True)
    copy_assets(nbs, out)
    css = (nbs / 'styles.css').read_text(encoding='utf-8') if (nbs / 'styles.css').exists() else ''
    site_url = f"{cfg.get('doc_host', '')}{cfg.get('doc_baseurl', '')}".rstrip('/')
    todo = [s for s in notebooks if s not in errors]
    built = {page_name(s.relative_to(nbs).as_posix()) for s in todo}
    exporter = make_exporter()
    for src in todo:
        rel = src.relative_to(nbs).as_posix()
        try:
            page, text = render_page(proc / rel, rel, nbs, built, site_url, css, exporter)
            (out / page).parent.mkdir(parents=True, exist_ok=True)
            (out / page).write_text(text, encoding='utf-8')
            print(f'  {rel} -> {page}')
        except Exception as e:
            traceback.print_exc()
            errors[src] = f'page: {type(e).__name__}: {e}'
    _, contents = sidebar(nbs, built, '')
    listed, stack = set(), list(contents)
    while stack:                                   # every page the sidebar names, sections included
        e = stack.pop()
        if isinstance(e, dict): stack += e.get('contents') or []; e = e.get('href')
        if isinstance(e, str): listed.add(e)
    for src in notebooks:
        rel = src.relative_to(nbs).as_posix()
        if rel not in listed: print(f'  note: {rel} is not in nbs/sidebar.yml, so the site does not list it')

    print(f'== {len(todo) - len(errors.keys() & set(todo))} page(s) written in {time.time() - start:.0f} s')
    if errors:
        for src, msg in errors.items():
            shown = src.relative_to(ROOT) if src.is_relative_to(ROOT) else src
            print(f'FAILED: {shown}: {msg}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
