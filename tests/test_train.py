"""Training end to end on the tiny configuration: one process, two DDP processes, the racing guard, exact resume,
frozen stages, safetensors only."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from progressive_ct.dataset import prepare

ROOT = Path(__file__).resolve().parents[1]
TINY = json.loads((ROOT / 'configs' / 'tiny.json').read_text())


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    "The tiny phantom dataset, built once for the module."
    path = tmp_path_factory.mktemp('data') / 'tiny'
    prepare('phantoms', path, config={k: v for k, v in TINY['data'].items() if k != 'dataset_path'} | {'resolution': 64, 'xray_size': 64},
            progress=False, log=lambda *a: None)
    return path


def write_config(folder: Path, dataset: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg['data']['dataset_path'] = str(dataset)
    cfg['checkpoints']['save_dir'] = str(folder / 'run')
    for key, value in changes.items():                 # 'training.stage2.num_epochs' = 3
        d = cfg
        *path, last = key.split('.')
        for p in path: d = d.setdefault(p, {})
        d[last] = value
    f = folder / 'config.json'
    f.write_text(json.dumps(cfg))
    return f


def run(args, env=None, timeout=900, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, **kw)


def accelerate_cmd():
    exe = Path(sys.executable).with_name('accelerate')
    return [str(exe), 'launch'] if exe.exists() else [sys.executable, '-m', 'accelerate.commands.launch']


def record(folder, name):
    return json.loads((folder / 'run' / f'{name}.json').read_text())


def weights(folder, name):
    return load_file(str(folder / 'run' / f'{name}.safetensors'))


@pytest.fixture(scope='module')
def one_process(dataset, tmp_path_factory):
    "The tiny run in one process (the reference of the other tests)."
    folder = tmp_path_factory.mktemp('one')
    cfg = write_config(folder, dataset)
    r = run([sys.executable, '-m', 'progressive_ct.train', '--config', str(cfg), '--no-progress'], cwd=folder)
    assert r.returncode == 0, r.stderr[-3000:]
    return folder


def test_three_stages_and_their_records(one_process):
    for k in (1, 2, 3):
        rec = record(one_process, f'stage{k}_best')
        assert rec['stage'] == k and rec['epoch'] >= 1 and 'val_psnr' in rec['metrics'] and rec['config']['training']
        assert 'code_version' in rec
    rows = (one_process / 'run' / 'metrics.csv').read_text().splitlines()
    assert rows[0] == 'time,stage,epoch,step,name,value' and any(',val_psnr,' in r for r in rows)
    assert json.loads((one_process / 'run' / 'progress.json').read_text())['stages_done'] == [1, 2, 3]


def test_frozen_stages_stay_bit_identical(one_process):
    "Stage 1's weights (and buffers, the mean volume included) do not change while stages 2 and 3 train."
    s1, s2, s3 = (weights(one_process, f'stage{k}_best') for k in (1, 2, 3))
    frozen1 = [k for k in s1 if k.startswith('stage1.') or k.startswith('encoder.stem') or k.startswith('encoder.level')]
    stage1_keys = [k for k in s1 if k.startswith('stage1.')]
    assert stage1_keys and 'stage1.mean_volume' in s1 and s1['stage1.mean_volume'].abs().sum() > 0
    for k in stage1_keys:
        assert torch.equal(s1[k], s2[k]) and torch.equal(s1[k], s3[k]), k
    for k in (k for k in s2 if k.startswith('stage2.')):
        assert torch.equal(s2[k], s3[k]), k
    # and the stage that trained did change
    assert any(not torch.equal(s2[k], s3[k]) for k in s3 if k.startswith('stage3.'))


def test_end_to_end_phase_trains_every_stage(dataset, one_process, tmp_path):
    "--stages e2e --end-to-end 1 after the seed's schedule: every stage moves, each stage's loss is logged, its weights are the final ones."
    shutil.copytree(one_process / 'run', tmp_path / 'run')
    cfg = write_config(tmp_path, dataset)
    r = run([sys.executable, '-m', 'progressive_ct.train', '--config', str(cfg), '--stages', 'e2e', '--no-progress'], cwd=tmp_path)
    assert r.returncode == 2 and '--end-to-end' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run([sys.executable, '-m', 'progressive_ct.train', '--config', str(cfg), '--stages', 'e2e', '--end-to-end', '1',
             '--no-progress'], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s3, e2e = weights(tmp_path, 'stage3_best'), weights(tmp_path, 'end_to_end_best')
    for stage in ('stage1.', 'stage2.', 'stage3.', 'encoder.trunk.'):
        assert any(not torch.equal(s3[k], e2e[k]) for k in s3 if k.startswith(stage)), stage
    assert torch.equal(s3['stage1.mean_volume'], e2e['stage1.mean_volume'])
    log = (tmp_path / 'run' / 'metrics.csv').read_text()
    assert all(re.search(rf',4,1,\d+,train_stage{k}_l1,', log) for k in (1, 2, 3)), log[-1500:]
    from progressive_ct.train import final_weights
    assert final_weights(tmp_path / 'run').name == 'end_to_end_best.safetensors' and record(tmp_path, 'end_to_end_best')['stage'] == 4


def test_two_processes_train_like_one(dataset, one_process, tmp_path):
    "Real DDP over gloo on the CPU: the run finishes, and its weights load and evaluate like the one-process run's."
    cfg = write_config(tmp_path, dataset)
    r = run(accelerate_cmd() + ['--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no',
                                '--dynamo_backend', 'no', '-m', 'progressive_ct.train', '--config', str(cfg), '--no-progress'],
            env={'ACCELERATE_USE_CPU': '1'}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'on 2 process(es)' in r.stdout, r.stdout[-2000:]
    from progressive_ct.config import load_config
    from progressive_ct.dataset import load_metadata
    from progressive_ct.train import build_model, load_weights
    from progressive_ct.quickstart import evaluate_stages
    c = load_config(cfg)
    results = []
    for folder in (tmp_path, one_process):
        model = build_model(c, load_metadata(dataset))
        load_weights(model, folder / 'run' / 'stage3_best.safetensors')
        results.append(evaluate_stages(model, dataset, 'test'))
    for k in ('stage1', 'stage2', 'stage3'):
        assert results[0][k]['psnr'] > 5 and abs(results[0][k]['psnr'] - results[1][k]['psnr']) < 6, (k, results)


def test_unconnected_processes_are_stopped(dataset, tmp_path):
    "--multi_gpu without GPUs and without ACCELERATE_USE_CPU starts processes that are not one job: a clear error."
    cfg = write_config(tmp_path, dataset)
    env = {k: v for k, v in os.environ.items() if k != 'ACCELERATE_USE_CPU'}
    r = subprocess.run(accelerate_cmd() + ['--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no',
                                           '--dynamo_backend', 'no', '-m', 'progressive_ct.train', '--config', str(cfg)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode != 0
    assert 'not one distributed job' in r.stderr and 'ACCELERATE_USE_CPU=1' in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / 'run' / 'stage1_best.safetensors').exists()


def test_resume_after_kill_matches_uninterrupted(dataset, tmp_path):
    "kill -9 during stage 2, --resume: the run finishes where an uninterrupted run with the same seed does."
    changes = {'training.stage2.num_epochs': 4, 'checkpoints.save_every': 1}
    ref_dir, cut_dir = tmp_path / 'ref', tmp_path / 'cut'
    ref_dir.mkdir(); cut_dir.mkdir()
    ref = write_config(ref_dir, dataset, **changes)
    cut = write_config(cut_dir, dataset, **changes)
    r = run([sys.executable, '-m', 'progressive_ct.train', '--config', str(ref), '--no-progress'], cwd=ref_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    p = subprocess.Popen([sys.executable, '-m', 'progressive_ct.train', '--config', str(cut), '--no-progress'], cwd=cut_dir,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = cut_dir / 'run' / 'progress.json'
    deadline = time.time() + 600
    while time.time() < deadline:
        try: state = json.loads(progress.read_text())
        except (OSError, json.JSONDecodeError): state = {}
        if state.get('stage') == 2 and state.get('epoch', 0) >= 1: break
        if p.poll() is not None: pytest.fail('training ended before it could be interrupted')
        time.sleep(0.2)
    else: pytest.fail('stage 2 never saved a state')
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (cut_dir / 'run' / 'stage3_best.safetensors').exists()
    r = run([sys.executable, '-m', 'progressive_ct.train', '--config', str(cut), '--resume', '--no-progress'], cwd=cut_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'stage 1: done in an earlier run' in r.stdout and re.search(r'stage 2: resumed after epoch \d', r.stdout), r.stdout[-2000:]
    for k in (2, 3):
        a, b = record(ref_dir, f'stage{k}_best'), record(cut_dir, f'stage{k}_best')
        assert a['epoch'] == b['epoch']
        # the same arithmetic in the same order on the same CPU: equal up to float32 rounding of the validation sums
        assert abs(a['metrics']['val_psnr'] - b['metrics']['val_psnr']) < 1e-3, (k, a['metrics'], b['metrics'])


def test_bad_config_is_one_line(tmp_path):
    f = tmp_path / 'bad.json'
    f.write_text(json.dumps({'training': {'stage1': {'learning_rte': 0.1}}}))
    r = run([sys.executable, '-m', 'progressive_ct.train', '--config', str(f)], cwd=tmp_path)
    assert r.returncode == 2 and 'learning_rte' in r.stderr and "'learning_rate'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_no_unpickling_anywhere():
    "The kit never unpickles a file a user passes: no pickle, no torch.load without weights_only=True."
    for f in (ROOT / 'progressive_ct').glob('*.py'):
        text = f.read_text()
        assert 'pickle.load' not in text, f
        for m in re.finditer(r'torch\.load\(([^)]*)\)', text):
            assert 'weights_only=True' in m.group(1), (f.name, m.group(0))


def test_dry_run_times_every_stage_and_writes_nothing(tmp_path):
    "--dry-run on the tiny config: the preflight, then each stage's step time and peak memory, and not one file written."
    cfg = write_config(tmp_path, tmp_path / 'data')               # no dataset yet: the dry run must not build it
    before = sorted(p.name for p in tmp_path.rglob('*'))
    r = run([sys.executable, '-m', 'progressive_ct.train', '--config', str(cfg), '--dry-run'], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith('dry run, stage')]
    assert [l.split(':')[0] for l in lines] == [f'dry run, stage {k}' for k in (1, 2, 3)], r.stdout
    assert all(re.search(r'then \d+\.\d+ s/step .* peak memory \d+ MB', l) for l in lines), lines
    assert 'preflight: dataset' in r.stdout and 'dry run: nothing was written' in r.stdout
    assert sorted(p.name for p in tmp_path.rglob('*')) == before


def test_missing_vgg_weights_stop_the_full_config_in_seconds(tmp_path):
    "The seed's config without VGG16 weights: one line naming the file and both ways out, before any step, nothing written."
    cfg = json.loads((ROOT / 'configs' / 'config_progressive.json').read_text())
    cfg['data']['dataset_path'], cfg['checkpoints']['save_dir'] = str(tmp_path / 'data'), str(tmp_path / 'run')
    cfg['loss']['vgg_weights'] = str(tmp_path / 'weights' / 'vgg16-397923af.pth')   # a file that is not there (no download)
    f = tmp_path / 'config.json'
    f.write_text(json.dumps(cfg))
    t0 = time.time()
    r = run([sys.executable, '-m', 'progressive_ct.train', '--config', str(f)], cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert time.time() - t0 < 60
    for words in (str(tmp_path / 'weights' / 'vgg16-397923af.pth'), 'loss.allow_random_vgg', 'loss.vgg_weights', 'loss.stage2.vgg_weight'):
        assert words in r.stderr, (words, r.stderr)
    assert not (tmp_path / 'run').exists() and not (tmp_path / 'data').exists()
