"""The notebooks' stored outputs (.ci/outputs.py): `write` stores what executing a notebook gives, `check` fails naming
the notebook and the cell when the stored outputs are not what executing it gives now. CI runs `check` on every notebook."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / '.ci' / 'outputs.py'


def outputs(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=ROOT)


def notebook(path, cells):
    "A notebook of code cells {id: source}."
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}})
    nb.cells = [nbformat.v4.new_code_cell(src, id=cid) for cid, src in cells.items()]
    nbformat.write(nb, path)
    return path


def stored(path):
    return {c['id']: c['outputs'] for c in json.loads(path.read_text())['cells']}


def set_outputs(path, cid, outs):
    nb = json.loads(path.read_text())
    next(c for c in nb['cells'] if c['id'] == cid)['outputs'] = outs
    path.write_text(json.dumps(nb, indent=1))


def test_stale_outputs_fail_naming_the_notebook_and_cell(tmp_path):
    nb = notebook(tmp_path / 'demo.ipynb', {
        'imports': 'import time\nimport matplotlib.pyplot as plt',
        'sum': 'print(1 + 1)',
        'timed': "t0 = time.perf_counter(); time.sleep(0.01)\nprint(f'slept in {time.perf_counter() - t0:.4f} s')",
        'figure': 'plt.plot([0, 1], [1, 0]);',
        'slow': '#| slow\nprint("not run by the tests")'})
    r = outputs('write', nb)
    assert r.returncode == 0, r.stdout + r.stderr
    out = stored(nb)
    assert out['sum'][0]['text'] in ('2\n', ['2\n']) and out['slow'] == []
    assert any('image/png' in o.get('data', {}) for o in out['figure'])
    r = outputs('check', nb)                     # a duration differs from run to run: masked, the rest must match
    assert r.returncode == 0 and 'ok' in r.stdout, r.stdout + r.stderr

    set_outputs(nb, 'sum', [nbformat.v4.new_output('stream', name='stdout', text='3\n')])
    set_outputs(nb, 'figure', [o for o in out['figure'] if 'image/png' not in o.get('data', {})])
    set_outputs(nb, 'slow', [nbformat.v4.new_output('stream', name='stdout', text='unchecked\n')])
    r = outputs('check', nb)
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr
    assert f'STALE: {nb}' in err and f'outputs.py write {nb}' in err and f'1 failed: {nb}' in r.stdout
    assert 'cell sum:' in err and '-stream:stdout: 3' in err and '+stream:stdout: 2' in err
    assert 'cell figure:' in err and 'image/png' in err                   # a figure that disappeared is stale
    assert 'cell slow:' in err and 'not executed by the tests' in err
    assert 'cell timed:' not in err and 'cell imports:' not in err


def test_decimals_may_differ_by_rounding_and_nothing_else(tmp_path):
    """Another CPU rounds differently: a printed decimal may move by its last digit (plus 2e-4 of itself, plus 1e-7), and
    the padding before it with it; integers, a printed zero, hashes, file names and words may not."""
    stored = 'PSNR 39.35 dB on 4 patients, |diff| 1.4e-08, SSIM 0.5574823, max 0.0e+00, gain    9.99, key 12e4567f, [0., 1.]'
    nb = notebook(tmp_path / 'rounding.ipynb', {'psnr': f"print({stored!r})"})
    assert outputs('write', nb).returncode == 0
    changes = {('39.35', '39.36'): 0, ('1.4e-08', '1.6e-08'): 0, ('0.5574823', '0.5574824'): 0,   # rounding
               ('    9.99', '   10.00'): 0, ('0.0e+00', '1.9e-09'): 0,                          # a carry; a difference of nothing
               ('39.35', '39.38'): 1,                                  # three units of the last digit: a result
               ('4 patients', '5 patients'): 1,                        # a count
               ('1.4e-08', '1.4e-05'): 1, ('0.5574823', '0.5584823'): 1, ('0.0e+00', '9.9e-02'): 1,
               ('12e4567f', '12e4568f'): 1,                            # a hash is not a number
               ('[0., 1.]', '[1., 0.]'): 1,                            # whole numbers, written with a point
               ('on 4', 'for 4'): 1}                                   # a word
    for (old, new), rc in changes.items():
        assert old in stored
        set_outputs(nb, 'psnr', [nbformat.v4.new_output('stream', name='stdout', text=stored.replace(old, new) + '\n')])
        r = outputs('check', nb)
        assert r.returncode == rc, ((old, new), r.stdout + r.stderr)


def test_a_failing_cell_fails_the_check_with_its_traceback(tmp_path):
    nb = notebook(tmp_path / 'broken.ipynb', {'ok': 'x = 1', 'bad': 'x / 0'})
    r = outputs('check', nb)
    assert r.returncode == 1 and f'FAILED: {nb}' in r.stderr and 'ZeroDivisionError' in r.stderr, r.stdout + r.stderr


def test_stored_outputs_do_not_depend_on_where_the_repository_is(tmp_path):
    "CI checks the outputs in a clone of its own, and the site shows them to readers: no checkout's path is stored."
    nb = notebook(tmp_path / 'warns.ipynb', {
        'imports': 'from progressive_ct.losses import load_vgg16_features',
        'warns': "_ = load_vgg16_features('no-such-vgg16.pth', allow_random_weights=True)"})
    r = outputs('write', nb)
    assert r.returncode == 0, r.stdout + r.stderr
    text = ''.join(o['text'] if isinstance(o['text'], str) else ''.join(o['text']) for o in stored(nb)['warns'])
    assert 'UserWarning' in text and text.startswith('progressive_ct/losses.py:'), text     # relative to the repository
    assert str(ROOT) not in text and sys.prefix not in text, text
    assert os.path.expanduser('~') == '/' or os.path.expanduser('~/') not in text, text   # torch.hub's cache, as ~/

    moved = text.replace('progressive_ct/losses.py:', '/another/checkout/progressive_ct/losses.py:9')  # another clone, edited
    set_outputs(nb, 'warns', [nbformat.v4.new_output('stream', name='stderr', text=moved)])
    r = outputs('check', nb)
    assert r.returncode == 0 and 'ok' in r.stdout, r.stdout + r.stderr
    set_outputs(nb, 'warns', [nbformat.v4.new_output('stream', name='stderr', text=moved.replace('UserWarning', 'RuntimeWarning'))])
    assert outputs('check', nb).returncode == 1                              # the warning itself is still compared


def test_every_notebook_carries_outputs():
    "The notebooks are stored executed: the docs site shows what they hold (CI checks the outputs are current)."
    from nbdev.doclinks import nbglob
    empty = []
    for p in nbglob(ROOT / 'nbs', func=Path):
        cells = [c for c in json.loads(Path(p).read_text())['cells'] if c['cell_type'] == 'code']
        if not any(c['outputs'] for c in cells): empty.append(Path(p).name)
    assert not empty, f'notebooks stored without any output: {empty}'
