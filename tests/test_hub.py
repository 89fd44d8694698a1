"""A trained run exported the way the Hugging Face Hub expects, and read back: bit-identical reconstructions, a card
whose metrics are the run's evaluation, `infer` on the folder, and clear errors for a missing or altered weights file
and for a repo id without a network. (`--push-to-hub` is huggingface_hub's own upload and is not run here: no network.)"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "The tiny configuration trained in one process (it builds its 8 phantoms first)."
    folder = tmp_path_factory.mktemp('hub')
    cfg = json.loads((ROOT / 'configs' / 'tiny.json').read_text())
    cfg['data']['dataset_path'], cfg['checkpoints']['save_dir'] = str(folder / 'data'), str(folder / 'run')
    cfg['data'] |= {'resolution': 64, 'xray_size': 64}
    (folder / 'config.json').write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, '-m', 'progressive_ct.train', '--config', str(folder / 'config.json'), '--no-progress'],
                       capture_output=True, text=True, timeout=900, cwd=folder)
    assert r.returncode == 0, r.stderr[-3000:]
    return folder


def cli(*args, cwd):
    return subprocess.run(cli_command() + [str(a) for a in args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**__import__('os').environ, 'PYTHONWARNINGS': 'ignore'})


@pytest.fixture(scope='module')
def exported(run):
    r = cli('export', '--checkpoint', run / 'run', '--out', run / 'exported', cwd=run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'model.safetensors' in r.stdout and 'stage 3' in r.stdout, r.stdout
    return run / 'exported'


def test_from_pretrained_reconstructs_bit_identically(run, exported):
    from progressive_ct.cascade import ProgressiveCascadeModel
    from progressive_ct.dataset import CTDataset
    from progressive_ct.runs import load_checkpoint
    from progressive_ct.inference import reconstruct
    assert sorted(p.name for p in exported.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    original, record = load_checkpoint(run / 'run')
    again = ProgressiveCascadeModel.from_pretrained(exported)
    ds = CTDataset(run / 'data', 'test', 64)
    x = torch.stack([ds[i]['xray'] for i in range(len(ds))])
    for a, b in zip(reconstruct(original, x), reconstruct(again, x)):
        assert torch.equal(a, b)
    assert again.config == original.config


def test_the_card_is_the_runs_evaluation(run, exported):
    "The card's front matter parses with huggingface_hub, and its metrics are each stage's best validation epoch."
    from huggingface_hub import ModelCard
    card = ModelCard.load(exported / 'README.md')
    data = card.data.to_dict()
    assert data['library_name'] == 'progressive_ct' and data['license'] == 'apache-2.0' and 'ct-reconstruction' in data['tags']
    assert data['datasets'] == ['progressive-ct-phantoms'] and data['metrics'] == ['psnr', 'ssim']
    psnr = {r.metric_name: r.metric_value for r in card.data.eval_results if r.metric_type == 'psnr'}
    config = json.loads((exported / 'config.json').read_text())
    for k in (1, 2, 3):
        rec = json.loads((run / 'run' / f'stage{k}_best.json').read_text())
        row = next(r for r in config['evaluation'] if r['stage'] == k and r['split'] == 'val')
        assert row['psnr'] == rec['metrics']['val_psnr'] and row['ssim'] == rec['metrics']['val_ssim'] and row['epoch'] == rec['epoch']
        name = next(n for n in psnr if n.startswith(f'stage {k} PSNR'))
        assert 'data range 1' in name and abs(psnr[name] - rec['metrics']['val_psnr']) < 5e-4
    text = card.text
    assert 'data range 1 on the [0, 1] scale = HU window -1000..1500' in text and '**synthetic**' in text
    assert '## Intended use' in text and '## Limitations' in text and 'Apache-2.0' in text


def test_infer_takes_the_exported_folder(run, exported):
    "`infer --checkpoint FOLDER` gives the same metrics as on the run folder it came from."
    outs = {}
    for name, ckpt in (('run', run / 'run'), ('exported', exported)):
        r = cli('infer', '--checkpoint', ckpt, '--mode', 'evaluate', '--dataset', run / 'data', '--output-dir', run / f'infer_{name}', cwd=run)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = json.loads((run / f'infer_{name}' / 'summary.json').read_text())['metrics']
    assert outs['run'] == outs['exported']


@pytest.mark.parametrize('damage, words', [
    ('altered', "its SHA-256 differs from the one config.json records"),
    ('missing', 'model.safetensors: missing'),
    ('repo id', 'the Hugging Face Hub could not give that repo'),
])
def test_bad_pretrained_folders_are_one_line(run, exported, tmp_path, damage, words):
    import shutil
    folder = tmp_path / 'copy'
    shutil.copytree(exported, folder)
    weights = folder / 'model.safetensors'
    if damage == 'altered': weights.write_bytes(weights.read_bytes()[:-4] + b'\0\0\0\1')
    if damage == 'missing': weights.unlink()
    target = 'nobody-xyz/no-such-cascade-xyz' if damage == 'repo id' else folder
    r = cli('infer', '--checkpoint', target, '--mode', 'evaluate', '--dataset', run / 'data', '--output-dir', tmp_path / 'out', cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr[-2000:]
    if damage != 'repo id': assert str(weights) in r.stderr
    assert not (tmp_path / 'out').exists()
