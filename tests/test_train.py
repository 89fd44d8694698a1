"""Training end to end on the tiny configuration: one process, two DDP processes, the racing guard, exact resume,
frozen stages, safetensors only; and what clusters do to long runs: signals, full disks, shared folders."""
import json
import os
import re
import shutil
import signal
import stat
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
    from progressive_ct.runs import final_weights
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
    from progressive_ct.ops import load_weights
    from progressive_ct.runs import build_model
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


# --- what clusters do to long runs ---------------------------------------------------------------------------------

CUT = {'training.stage2.num_epochs': 3, 'training.stage2.batch_size': 1}    # 4 batches an epoch: a signal lands inside one


def train_cmd(cfg, *args):
    return [sys.executable, '-m', 'progressive_ct.train', '--config', str(cfg), '--no-progress', *args]


def stage2_alone(folder, dataset, one_process, **changes):
    "A run folder holding the reference run's stage-1 weights, and a config that trains stage 2 alone (`--stages 2`)."
    folder.mkdir(exist_ok=True)
    cfg = write_config(folder, dataset, **CUT, **changes)
    (folder / 'run').mkdir(parents=True)
    for f in ('stage1_best.safetensors', 'stage1_best.json'): shutil.copy(one_process / 'run' / f, folder / 'run' / f)
    return cfg


def with_umask(mask):
    return lambda: os.umask(mask)


def signal_when_stage2_starts(cmd, folder, pick, env=None, umask=0o022):
    "Start `cmd`; as soon as it prints that stage 2 starts, SIGTERM the process `pick(popen)` names. (rc, stdout, stderr, seconds to exit)."
    err = open(folder / 'stderr.txt', 'w')
    p = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=err, text=True, preexec_fn=with_umask(umask),
                         env={**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})})
    lines, t0 = [], None
    for line in p.stdout:
        lines.append(line)
        if line.startswith('stage 2: 32') and t0 is None:
            os.kill(pick(p), signal.SIGTERM); t0 = time.time()
    p.wait(timeout=300); err.close()
    assert t0 is not None, ''.join(lines)[-2000:]
    return p.returncode, ''.join(lines), (folder / 'stderr.txt').read_text(), time.time() - t0


def same_weights(a, b, names=('stage2_best', 'stage2_last')):
    for name in names:
        x, y = weights(a, name), weights(b, name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (name, max((x[k] - y[k]).abs().max().item() for k in x))


def modes(folder, skip=()):
    "Permission bits of every file and folder under `folder` the run wrote (not those the test put there)."
    return {p: stat.S_IMODE(p.stat().st_mode) for p in folder.rglob('*') if p.name not in skip}


def test_sigterm_inside_an_epoch_then_resume_equals_uninterrupted(dataset, one_process, tmp_path):
    """SIGTERM in the middle of a stage-2 epoch: the run saves after its step and exits 75 within a minute, saying how to
    resume; --resume continues from that batch and ends bit-identical to an uninterrupted run (one process, CPU: the
    same arithmetic in the same order). The uninterrupted run writes under umask 022, the interrupted one under 077."""
    ref, cut = tmp_path / 'ref', tmp_path / 'cut'
    r = run(train_cmd(stage2_alone(ref, dataset, one_process), '--stages', '2'), cwd=ref.parent, preexec_fn=with_umask(0o022))
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = stage2_alone(cut, dataset, one_process)
    rc, out, err, seconds = signal_when_stage2_starts(train_cmd(cfg, '--stages', '2'), cut, lambda p: p.pid, umask=0o077)
    stops = [l for l in out.splitlines() if 'stopped by SIGTERM' in l]
    assert rc == 75 and seconds < 60 and len(stops) == 1, (rc, seconds, out[-2000:], err[-2000:])
    assert re.search(r'stage 2: stopped by SIGTERM after step \d+ \(epoch 1, batch \d of 4\); saved in .*--resume', stops[0]), stops
    progress = json.loads((cut / 'run' / 'progress.json').read_text())
    assert progress['stopped'] == 'SIGTERM' and progress['stage'] == 2 and 1 <= progress['batch'] < 4 and (cut / 'run' / progress['state'] / 'custom_checkpoint_0.pkl').is_file()
    assert not (cut / 'run' / 'stage2_best.safetensors').exists()
    r = run(train_cmd(cfg, '--stages', '2', '--resume'), cwd=cut, preexec_fn=with_umask(0o077))
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r'stage 2: resumed inside epoch 1 after batch \d \(step \d\)', r.stdout), r.stdout[-2000:]
    same_weights(ref, cut)
    done = json.loads((cut / 'run' / 'progress.json').read_text())
    assert len(done['states']) == 2 and 'stopped' not in done         # checkpoints.keep_states; the stop is over
    assert len(list((cut / 'run' / 'states').iterdir())) == 2
    # files follow the umask: readable by group and others under 022, by nobody else under 077
    mine = ('stage1_best.safetensors', 'stage1_best.json')        # copied in by the test
    shared, private = modes(ref / 'run', mine), modes(cut / 'run', mine)
    assert shared and all(m & 0o044 == 0o044 for m in shared.values()), {str(p): oct(m) for p, m in shared.items() if m & 0o044 != 0o044}
    assert private and all(m & 0o077 == 0 for m in private.values()), {str(p): oct(m) for p, m in private.items() if m & 0o077}


def test_stage_boundary_resume_equals_one_process(dataset, one_process, tmp_path):
    "`--stages 1`, then `--stages 1,2 --resume`: stage 2 equals stage 2 of the run that trained every stage in one process."
    cfg = write_config(tmp_path, dataset)
    for args in (['--stages', '1'], ['--stages', '1,2', '--resume']):
        r = run(train_cmd(cfg, *args), cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    assert 'stage 1: done in an earlier run' in r.stdout
    same_weights(one_process, tmp_path)


def _children(pid):
    "Process ids whose parent is `pid` (from /proc)."
    kids = []
    for d in Path('/proc').iterdir():
        try:
            if d.name.isdigit() and int((d / 'stat').read_text().rsplit(')', 1)[1].split()[1]) == pid: kids.append(int(d.name))
        except OSError: pass
    return kids


def _rank(pid):
    env = (Path('/proc') / str(pid) / 'environ').read_bytes().split(b'\0')
    return next((int(e.split(b'=', 1)[1]) for e in env if e.startswith(b'RANK=')), None)


def test_two_processes_stop_together_when_one_is_signalled(dataset, one_process, tmp_path):
    """Two DDP processes, SIGTERM to the second only: both stop at the same step (one state, one stop line), and
    `--resume` with two processes finishes the run."""
    cfg = stage2_alone(tmp_path, dataset, one_process)
    cmd = accelerate_cmd() + ['--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no',
                              '--dynamo_backend', 'no', '-m', 'progressive_ct.train', '--config', str(cfg), '--no-progress', '--stages', '2']
    def second(p):
        return next(k for k in _children(p.pid) if _rank(k) == 1)
    rc, out, err, seconds = signal_when_stage2_starts(cmd, tmp_path, second, env={'ACCELERATE_USE_CPU': '1'})
    assert rc != 0 and seconds < 60 and out.count('stopped by SIGTERM') == 1, (rc, out[-2000:], err[-3000:])
    assert 'exitcode  : 75' in err, err[-3000:]                               # the launcher's report names the stop
    progress = json.loads((tmp_path / 'run' / 'progress.json').read_text())
    state = tmp_path / 'run' / progress['state']
    assert progress['stage'] == 2 and {p.name for p in state.iterdir()} >= {'random_states_0.pkl', 'random_states_1.pkl', 'custom_checkpoint_0.pkl'}
    r = run(cmd + ['--resume'], env={'ACCELERATE_USE_CPU': '1'}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'stage 2: resumed' in r.stdout and 'on 2 process(es)' in r.stdout and (tmp_path / 'run' / 'stage2_best.safetensors').is_file()


def _namespace_with_tmpfs():
    "How this test can mount a small tmpfs of its own: `unshare` (as root, or in a user namespace); None where it cannot."
    if not shutil.which('unshare'): return None
    cmd = ['unshare', '--mount'] + ([] if os.geteuid() == 0 else ['--user', '--map-root-user'])
    probe = subprocess.run(cmd + ['sh', '-c', 'd=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs "$d"'], capture_output=True)
    return cmd if probe.returncode == 0 else None


def test_full_disk_is_one_line_and_the_last_state_survives(dataset, one_process, tmp_path):
    """A save directory on a small file system: the preflight lets the run start (room for one save), a later save finds
    the disk full: one line naming the folder and the space a save needs, exit 2, no partial file, the previous state
    intact. Resumed where there is room, the run finishes; started again on the full disk, the preflight refuses it."""
    ns = _namespace_with_tmpfs()
    if ns is None: pytest.skip('cannot mount a tmpfs here (needs root or user namespaces with unshare)')
    from progressive_ct.config import load_config
    from progressive_ct.runs import build_model
    from progressive_ct.saving import save_bytes
    from progressive_ct.dataset import load_metadata
    mnt = tmp_path / 'mnt'; mnt.mkdir()
    cfg_file = write_config(tmp_path, dataset, **CUT, **{'checkpoints.save_dir': str(mnt / 'run')})
    model = build_model(load_config(cfg_file), load_metadata(dataset)); model.set_stage(2)
    stage1 = sum((one_process / 'run' / f).stat().st_size for f in ('stage1_best.safetensors', 'stage1_best.json'))
    size_kb = (stage1 + save_bytes(model, model.trainable_parameters())) // 1024 + 256     # room for one save, not two
    py = f"{sys.executable} -m progressive_ct.train --config {cfg_file} --stages 2 --no-progress"
    script = (f'mount -t tmpfs -o size={size_kb}k tmpfs {mnt} || exit 99; mkdir {mnt}/run; cp {one_process}/run/stage1_best.* {mnt}/run/; '
              f'{py} > {tmp_path}/out1 2> {tmp_path}/err1; echo $? > {tmp_path}/rc1; cp -r {mnt}/run {tmp_path}/saved; '
              f'find {mnt} > {tmp_path}/files; {py} --resume > {tmp_path}/out2 2> {tmp_path}/err2; echo $? > {tmp_path}/rc2')
    r = subprocess.run(ns + ['sh', '-c', script], capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'PYTHONWARNINGS': 'ignore'})    # the tiny config's random-VGG warning aside: stderr is the error
    assert r.returncode == 0, r.stderr
    rc1, err1 = (tmp_path / 'rc1').read_text().strip(), (tmp_path / 'err1').read_text().strip()
    assert rc1 == '2' and len(err1.splitlines()) == 1 and 'Traceback' not in err1, (rc1, err1[-3000:])
    assert f'checkpoints.save_dir {mnt / "run"}: could not write' in err1 and 'No space left on device' in err1, err1
    assert re.search(r'one save needs about [\d.]+ MB', err1) and 'is intact' in err1, err1
    files = (tmp_path / 'files').read_text().split()
    assert not [f for f in files if f.endswith(('.tmp', '.partial')) or '.tmp.' in f or '.partial/' in f], files
    progress = json.loads((tmp_path / 'saved' / 'progress.json').read_text())
    assert progress['stage'] == 2 and progress['epoch'] >= 1 and str(mnt / 'run' / progress['state']) in err1
    # started again on the full disk: the preflight refuses it before any step
    rc2, err2 = (tmp_path / 'rc2').read_text().strip(), (tmp_path / 'err2').read_text().strip()
    assert rc2 == '2' and len(err2.splitlines()) == 1 and 'free, but one save needs about' in err2, (rc2, err2)
    # the state that survived resumes where there is room
    cfg = json.loads(cfg_file.read_text()); cfg['checkpoints']['save_dir'] = str(tmp_path / 'saved'); cfg_file.write_text(json.dumps(cfg))
    r = run(train_cmd(cfg_file, '--stages', '2', '--resume'), cwd=tmp_path)
    assert r.returncode == 0 and f'stage 2: resumed after epoch {progress["epoch"]}' in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])


def test_prepare_and_infer_outputs_follow_the_umask(one_process, tmp_path):
    "Under umask 022 what `prepare` and `infer` write is readable by the group and others (as any program's outputs)."
    from conftest import cli_command
    (tmp_path / 'prep.json').write_text(json.dumps({'data': {'resolution': 32, 'xray_size': 32, 'fov_mm': 400.0}}))
    for cmd in (['prepare', '--source', 'phantoms', '--out', tmp_path / 'data', '--config', tmp_path / 'prep.json',
                 '--num-patients', '4', '--quiet'],
                ['infer', '--checkpoint', one_process / 'run', '--mode', 'single', '--sample-idx', '0',
                 '--output-dir', tmp_path / 'infer', '--save-nifti']):
        r = run(cli_command() + [str(c) for c in cmd], cwd=tmp_path, preexec_fn=with_umask(0o022))
        assert r.returncode == 0, r.stderr[-3000:]
    found = modes(tmp_path / 'data') | modes(tmp_path / 'infer')
    assert len(found) > 10 and all(m & 0o044 == 0o044 for m in found.values()), {str(p): oct(m) for p, m in found.items() if m & 0o044 != 0o044}
