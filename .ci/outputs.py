"""The notebooks' stored outputs: write them by executing each notebook, and check that they are current.

    python .ci/outputs.py write [NB ...]      # execute, store every cell's outputs in the notebook, nbdev_clean it
    python .ci/outputs.py check [NB ...]      # execute, exit 1 naming each notebook whose stored outputs are stale
    python .ci/outputs.py check -j 2          # two notebooks at a time (default: one per CPU core)

Quarto does not execute notebooks when `nbdev_docs` builds the site, so a figure or a printed result appears on the
site only if the notebook carries it. This script is how they get there, and how CI keeps them honest.

Execution is `nbdev_test`'s, step for step (nbdev 2.4.14's `test_nb`): execnb's in-process `CaptureShell`, the
notebook's folder as working directory, `IN_TEST=1`, cells skipped for `tst_flags` (settings.ini), `#| eval: false`
and `nbdev_export()`. So `check` is `nbdev_test` plus the comparison: a cell that raises fails it the same way, and
CI runs one in place of the other. Figures are stored as PNG (`FIGURE_FORMAT`), reduced to 256 colours without
dithering where that is smaller (grey CT slices lose nothing visible; the notebooks weigh a third less).

What is compared, cell by cell: the kinds of output, in order (a figure that disappeared is stale), and their text
(printed streams, `text/plain`, `text/markdown`, `text/html`, errors). Figure bytes are not compared: they differ
between matplotlib and freetype builds. A cell skipped in execution must hold no output (nothing unchecked is
stored). Every computed number (a PSNR, a loss, a shape, a count) must come out the same, so the notebooks fix their
seeds, `PYTHONHASHSEED` is 0, and torch runs on `THREADS` threads whatever the machine's cores (a reduction split
differently rounds differently). A different CPU still rounds differently (its vector units pick other kernels), so a
printed decimal (a digit after its point, or an exponent) may differ by one unit of its last printed digit plus
`RTOL` of its size plus `ATOL`: 39.35 for 39.36, 0.5574823 for 0.5574824, a difference of 1.4e-08 for 1.6e-08 or
0.0e+00 for 1.9e-09 (`same_text`). A printed zero has no last-digit unit, and the padding a wider number shifts is
ignored. Integers, words and everything else must be equal. A result a CPU's rounding moves further (a short training
run amplifies it) is stale there: write the outputs again on the machine whose CI checks them. What a run measures of
itself cannot repeat, and
`VOLATILE` masks exactly that before comparing: durations and rates, a process's own memory and the disk's free
space, temporary folders, the repository's and Python's install paths (and a warning's line number in them),
pydicom's random UIDs, object addresses. The
stored outputs keep the real values, with one exception: they are written free of where the repository was checked
out (`portable`: a path inside it is stored relative to it, Python's own as `<python>`, the home folder as `~`), since
CI checks them in a clone of its own, and the site shows them to readers whose checkout is elsewhere again.
"""
import argparse
import difflib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREADS = '2'                         # torch's threads in each notebook's process: the count the stored outputs were written with
FIGURE_FORMAT = 'png'                 # matplotlib_inline's format: 'png' at the figure's dpi ('retina' doubles it)
TEXT_MIMES = ('text/plain', 'text/markdown', 'text/html', 'text/latex')
VOLATILE_MIMES = ('application/vnd.jupyter.widget-view+json',)   # a widget's model id is new in every run
NUM = r'\d[\d,]*(?:\.\d+)?'
HOME = os.path.expanduser('~').rstrip('/') + '/'                     # the user's home folder, written as ~/ where stored
HOME = None if HOME == '/' else HOME                                   #   (none to write where it is the root)
VOLATILE = [                                                       # (pattern, what it stands for), applied in order
    (re.escape(sys.prefix) + r'([^\s:\'"]*):\d+:', r'<python>\1:<line>:'),   # a warning's file and line in a library
    (re.escape(sys.prefix), '<python>'),                                         # (first: CI's virtualenv is in the repository)
    (re.escape(sys.base_prefix + '/lib/python'), '<python>/lib/python'),         # the standard library's
    (r'<python>([^\s:\'"]*):\d+:', r'<python>\1:<line>:'),                    # ... as `portable` stores them
    (re.escape(str(ROOT)) + '/', ''),                                             # the repository's paths, relative
    (re.escape(str(ROOT)), '<repo>'),                                            #   (as `portable` stores them)
    (r'(?:[^\s:\'"]*/)?(progressive_ct/[^\s:\'"]+\.py):\d+:', r'\1:<line>:'),   # a warning's file and line in the package,
                                                                                 #   from whichever checkout or install
    *([(re.escape(HOME), '~/')] if HOME else []),                               # the home folder (torch.hub's cache), as stored
    (re.escape(tempfile.gettempdir()) + r'/[^/\s\'"]+', '<tmp>'),
    (NUM + r' ?(?:s|ms|µs|min)(?=\b|/)', '<duration>'),               # "in 0.68 s", "5s", "0.25 s/step"
    (NUM + r' (?:samples|volumes|steps)/s\b', '<rate>'),
    (r'(peak memory|free|free for|free there,) ' + NUM + r' ?(?:MB|GB|KiB|MiB|GiB)', r'\1 <memory>'),
    (NUM + r' ?(?:MB|GB) free', '<memory> free'),
    (r'1\.2\.826\.0\.1\.3680043\.8\.498\.\d+', '<uid>'),              # pydicom's generate_uid(): random
    (r' at 0x[0-9a-f]+', ' at 0x…'),                                 # object addresses
]


def portable(text):
    "Text as stored: a path inside this repository made relative to it (the site's readers and CI's clone are elsewhere)."
    if isinstance(text, list): return portable(''.join(text)).splitlines(keepends=True)   # nbformat's lines, kept as lines
    text = text.replace(sys.prefix, '<python>')                               # first: a virtualenv may be in the repository
    text = text.replace(sys.base_prefix + '/lib/python', '<python>/lib/python')   # the standard library's files
    text = text.replace(str(ROOT) + '/', '')
    return text.replace(HOME, '~/') if HOME else text                       # last: the others may lie in the home folder

def masked(text):
    "Text with what a run measures of itself (VOLATILE) masked, for comparison only."
    for pattern, repl in VOLATILE: text = re.sub(pattern, repl, text)
    return text

def notebooks(names=()):
    "The notebooks named, or every notebook nbdev_test would run (nbdev's own glob)."
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    nbs = Path(get_config().nbs_path)
    if not names: return sorted(Path(p).resolve() for p in nbglob(nbs, func=Path))
    out = []
    for n in names:
        p = next((c for c in (Path(n), ROOT / n, nbs / n) if c.is_file()), None)
        if p is None: sys.exit(f'outputs: no notebook {n} (looked in {Path.cwd()}, {ROOT} and {nbs})')
        out.append(p.resolve())
    return out


def _skip(flags):
    "nbdev_test's `_no_eval`: which cells it does not execute."
    def no_eval(cell):
        if cell.cell_type != 'code': return True
        if 'nbdev_export' + '(' in cell.source: return True
        direc = getattr(cell, 'directives_', {}) or {}
        if direc.get('eval:', [''])[0].lower() == 'false': return True
        return bool(flags & direc.keys())
    return no_eval


def execute(path):
    "Run one notebook as nbdev_test does. Returns ({cell id: outputs}, set of skipped cell ids); raises on a failing cell."
    from execnb.shell import CaptureShell
    from fastcore.basics import str2bool
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    from nbdev.frontmatter import FrontmatterProc
    from nbdev.process import NBProcessor
    cfg = get_config()
    sys.path.insert(0, str(cfg.config_path))
    os.environ['IN_TEST'] = '1'
    flags = set(cfg.tst_flags.split())
    nb = NBProcessor(path, procs=FrontmatterProc, process=True).nb
    if str2bool(getattr(nb, 'frontmatter_', {}).get('skip_exec', False)): return {}, set()
    for cell in nb.cells:
        if cell.cell_type == 'code': cell.outputs = []
    no_eval = _skip(flags)
    shell = CaptureShell(path, mpl_format=FIGURE_FORMAT)
    try:
        with working_directory(path.parent):
            shell.run_all(nb, exc_stop=True, preproc=no_eval)
    except BaseException:
        raise RuntimeError(shell.prettytb(fname=path)) from None
    code = [c for c in nb.cells if c.cell_type == 'code' and c.get('id')]
    return ({c.id: _plain(c.outputs) for c in code}, {c.id for c in code if no_eval(c)})


def _plain(outputs):
    "execnb's outputs (fastcore AttrDicts) as plain JSON-able dicts."
    return json.loads(json.dumps(outputs or [], default=dict))


def _worker(path):
    "Child process: execute one notebook, return (outputs, skipped, seconds, error)."
    os.environ.pop('MPLBACKEND', None)          # the inline backend must capture the figures
    t0 = time.time()
    try:
        outs, skipped = execute(path)
        return outs, skipped, time.time() - t0, None
    except BaseException as e:  # noqa: BLE001 - reported with the notebook's name
        return None, None, time.time() - t0, str(e) if isinstance(e, RuntimeError) else f'{type(e).__name__}: {e}'


def run_all(paths, jobs):
    "Execute each notebook in a fresh process, `jobs` at a time; results in the order of `paths`."
    # one process per notebook: IPython's shell takes over the process's __main__, so a worker is not reused
    with get_context('spawn').Pool(jobs, maxtasksperchild=1) as pool:
        yield from zip(paths, pool.imap(_worker, paths))


def summary(outputs):
    "What is compared of one cell's outputs: (kind, text) pairs in order."
    out = []
    for o in outputs:
        kind = o['output_type']
        if kind == 'stream':
            out.append((f"stream:{o['name']}", masked(_text(o['text']))))
        elif kind == 'error':
            out.append(('error', masked(f"{o['ename']}: {o['evalue']}")))
        else:
            data = o.get('data', {})
            for mime in sorted(data):
                if mime in VOLATILE_MIMES: continue
                text = masked(_text(data[mime])) if mime in TEXT_MIMES else '(bytes)'
                out.append((f'{kind}:{mime}', text))
    return out


def _text(t): return ''.join(t) if isinstance(t, list) else str(t)


FLOAT = re.compile(r"""(?<![\w.])[-+]?(?:
      (?:\d{1,3}(?:,\d{3})+|\d+)\.\d+(?:[eE][-+]?\d+(?!\w))?    # 39.35, 0.5574823, 79,905.9, 1.4e-08: a digit after the point
    | \d+[eE][-+]?\d+(?!\w)                                     # 1e-08 (not 12e4567f, a hash)
    )""", re.VERBOSE)
RTOL, ATOL = 2e-4, 1e-7     # a decimal may move this much (relative, absolute) beyond one unit of its last printed digit


def _decimal(token):
    "A printed decimal: (value, one unit of its last printed digit; 0 for a printed zero, which must stay near zero)."
    mant, _, exp = token.replace(',', '').lower().partition('e')
    places = len(mant.partition('.')[2])
    value = float(token.replace(',', ''))
    if float(mant) == 0 or not math.isfinite(value): return value, 0.0
    return value, 10.0 ** (int(exp or 0) - places)


def close(x, y):
    "Two printed decimals that one computation, rounded differently, could give."
    (a, ua), (b, ub) = _decimal(x), _decimal(y)
    if not (math.isfinite(a) and math.isfinite(b)): return x == y
    return abs(a - b) <= max(ua, ub) + RTOL * max(abs(a), abs(b)) + ATOL


def _layout(part): return re.sub(r' +', ' ', part)   # a carry or a sign moves a right-aligned column's padding


def same_text(s, t):
    "Texts equal but for decimals within rounding (`close`) and the padding they shift; integers and words exactly equal."
    if s == t: return True
    ps, pt = FLOAT.split(s), FLOAT.split(t)
    if len(ps) != len(pt) or any(_layout(a) != _layout(b) for a, b in zip(ps, pt)): return False
    return all(close(x, y) for x, y in zip(FLOAT.findall(s), FLOAT.findall(t)))


def same(a, b):
    "One cell's compared outputs (`summary`) the same: the same kinds in order, their texts the same to within rounding."
    return len(a) == len(b) and all(k == l and same_text(s, t) for (k, s), (l, t) in zip(a, b))


def stored(path):
    "The outputs stored in the notebook, by cell id."
    nb = json.loads(path.read_text(encoding='utf-8'))
    return {c['id']: c.get('outputs', []) for c in nb['cells'] if c['cell_type'] == 'code' and c.get('id')}


def differences(path, fresh, skipped):
    "Lines naming each cell whose stored outputs are not what executing it gives now."
    old, problems = stored(path), []
    for cid in old:
        if cid in skipped:
            if old[cid]: problems.append(f'cell {cid}: is not executed by the tests, but holds outputs (nothing unchecked is stored)')
            continue
        a, b = summary(old[cid]), summary(fresh.get(cid, []))
        if same(a, b): continue
        diff = difflib.unified_diff([f'{k}: {t}' for k, t in a], [f'{k}: {t}' for k, t in b], 'stored', 'now', lineterm='', n=1)
        shown = '\n'.join(list(diff)[:24])
        problems.append(f'cell {cid}: stored outputs differ from a fresh run\n{shown}')
    return problems


def smaller_png(b64):
    "A figure's PNG (base64) with at most 256 colours, where that is smaller."
    import base64
    import io
    from PIL import Image
    raw = base64.b64decode(b64)
    buf = io.BytesIO()
    Image.open(io.BytesIO(raw)).convert('RGB').quantize(256, dither=Image.Dither.NONE).save(buf, 'PNG', optimize=True)
    return base64.b64encode(buf.getvalue()).decode() + '\n' if len(buf.getvalue()) < len(raw) else b64


def write(path, fresh):
    "Store the fresh outputs in the notebook (execution counts cleared, figures made smaller), then nbdev_clean it."
    nb = json.loads(path.read_text(encoding='utf-8'))
    for c in nb['cells']:
        if c['cell_type'] != 'code': continue
        outs = fresh.get(c.get('id'), [])
        for o in outs:
            if 'execution_count' in o: o['execution_count'] = None
            if 'text' in o: o['text'] = portable(o['text'])
            for mime in TEXT_MIMES:
                if mime in o.get('data', {}): o['data'][mime] = portable(o['data'][mime])
            if 'evalue' in o: o['evalue'] = portable(o['evalue'])
            if 'traceback' in o: o['traceback'] = [portable(t) for t in o['traceback']]
            if 'image/png' in o.get('data', {}): o['data']['image/png'] = smaller_png(_text(o['data']['image/png']))
        c['outputs'], c['execution_count'] = outs, None
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
    subprocess.run(['nbdev_clean', '--fname', str(path)], check=True, cwd=ROOT)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('action', choices=('write', 'check'))
    ap.add_argument('notebooks', nargs='*', help='paths (default: every notebook nbdev_test runs)')
    ap.add_argument('-j', '--jobs', type=int, default=os.cpu_count() or 1, help='notebooks executed at a time')
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    os.environ['PYTHONHASHSEED'] = '0'            # set iteration order: the same in every run (the workers inherit it)
    os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = THREADS   # sums reduced in the same order on any machine
    paths = notebooks(args.notebooks)
    if not paths: sys.exit('outputs: no notebook to execute')
    failed, t0 = [], time.time()
    for path, (fresh, skipped, seconds, error) in run_all(paths, args.jobs):
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        if error:
            failed.append(name)
            print(f'FAILED: {name}: a cell raised ({seconds:.0f} s)\n{error}', file=sys.stderr, flush=True)
            continue
        if args.action == 'write':
            write(path, fresh)
            print(f'wrote  {name} ({seconds:.0f} s, {path.stat().st_size / 1024:.0f} KiB)', flush=True)
            continue
        problems = differences(path, fresh, skipped)
        if problems:
            failed.append(name)
            print(f'STALE: {name}: its stored outputs are not what running it gives now; '
                  f'run `python .ci/outputs.py write {name}` and commit\n  ' + '\n  '.join(problems), file=sys.stderr, flush=True)
        else:
            print(f'ok     {name} ({seconds:.0f} s)', flush=True)
    print(f'{len(paths)} notebook(s) in {time.time() - t0:.0f} s; ' +
          (f'{len(failed)} failed: {", ".join(map(str, failed))}' if failed else 'all current' if args.action == 'check' else 'all written'))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
