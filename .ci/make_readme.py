"""README.md from nbs/index.ipynb without Quarto: its stored outputs, hidden cells and directives dropped, nbconvert to Markdown.

    python .ci/make_readme.py           # write README.md and README_files/
    python .ci/make_readme.py --check   # exit 1 if README.md or its images are not what index.ipynb holds now

`nbdev_readme` does the same through Quarto where Quarto is installed; this is the offline path CI checks. Nothing is
executed: the notebook carries its outputs (`python .ci/outputs.py write nbs/index.ipynb` refreshes them, and
`outputs.py check` fails when they are stale), so the README's figure is byte for byte the front page's.
"""
import argparse
import re
import sys
import tempfile
from pathlib import Path

import nbformat
from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parents[1]
DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*)$')


def directives(src):
    out = {}
    for line in src.splitlines():
        m = DIRECTIVE.match(line)
        if m: out[m.group(1)] = m.group(2).strip().lower() or 'true'
    return out


def front_matter(cell):
    meta = dict(re.findall(r'^(\w+):\s*(.+)$', cell.source, flags=re.M))
    text = f"# {meta.get('title', '')}\n"
    if 'description' in meta: text += f"\n> {meta['description']}\n"
    return nbformat.v4.new_markdown_cell(text)


def site_link(m):
    "A link to a notebook, as the docs site's page (the README is read on GitHub and PyPI, where nbs/ is not the site)."
    from nbdev.config import get_config
    from nbdev.doclinks import _nbpath2html
    cfg = get_config()
    page = _nbpath2html(Path(m.group(1) + '.ipynb')).as_posix()
    return f'](https://{cfg.doc_host.split("://")[-1]}{cfg.doc_baseurl}/{page}{m.group(2) or ""})'


def render(files_dir='README_files'):
    nb = nbformat.read(ROOT / 'nbs' / 'index.ipynb', as_version=4)
    cells = []
    for cell in nb.cells:
        if cell.cell_type == 'raw' and cell.source.lstrip().startswith('---'):
            cells.append(front_matter(cell)); continue
        if cell.cell_type != 'code':
            cells.append(cell); continue
        d = directives(cell.source)
        if 'hide' in d or d.get('include') == 'false': continue
        if 'export' in d or 'exporti' in d or 'default_exp' in d: continue
        cell.source = '\n'.join(l for l in cell.source.splitlines() if not DIRECTIVE.match(l)).strip()
        if d.get('echo') == 'false': cell.source = ''
        if d.get('output') == 'false': cell.outputs = []
        cell.outputs = [o for o in cell.outputs if o.get('output_type') != 'stream' or o.get('name') != 'stderr']
        cells.append(cell)
    nb.cells = cells
    exporter = MarkdownExporter()
    exporter.exclude_input_prompt = exporter.exclude_output_prompt = True
    body, resources = exporter.from_notebook_node(nb, resources={'output_files_dir': files_dir, 'unique_key': 'README'})
    body = re.sub(r'```(?:python)?\n\s*```\n', '', body)             # code cells whose source was hidden
    body = re.sub(r'\]\(([\w./-]+)\.ipynb(#[\w-]+)?\)', site_link, body)   # links between notebooks -> the docs site
    body = re.sub(r'\n{3,}', '\n\n', body).strip() + '\n'
    return body, resources.get('outputs', {})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--check', action='store_true', help='compare with README.md instead of writing it')
    args = ap.parse_args()
    body, outputs = render()
    if args.check:
        current = (ROOT / 'README.md').read_text(encoding='utf-8') if (ROOT / 'README.md').exists() else ''
        stale = [n for n, data in outputs.items() if not (ROOT / n).is_file() or (ROOT / n).read_bytes() != data]
        if stale:
            print(f'README images out of date with nbs/index.ipynb: {", ".join(stale)}: run `python .ci/make_readme.py`')
            return 1
        if current != body:
            with tempfile.NamedTemporaryFile('w', suffix='.md', delete=False) as f: f.write(body)
            print(f'README.md is out of date with nbs/index.ipynb: run `python .ci/make_readme.py` (new text in {f.name})')
            return 1
        print('README.md is up to date with nbs/index.ipynb')
        return 0
    for old in (ROOT / 'README_files').glob('*'):
        if old.relative_to(ROOT).as_posix() not in outputs: old.unlink()
    for name, data in outputs.items():
        (ROOT / name).parent.mkdir(parents=True, exist_ok=True)
        (ROOT / name).write_bytes(data)
    (ROOT / 'README.md').write_text(body, encoding='utf-8')
    print(f'wrote README.md and {len(outputs)} image(s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
