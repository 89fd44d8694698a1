"""`prepare` end to end: the command line, parallel builds, the cache, `kill -9` mid-build, DICOM folders, bad input."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from progressive_ct.dataset import META_FILE, REPORT_FILE, CTDataset, load_metadata, make_loader, prepare
from progressive_ct.errors import InputError
from progressive_ct.phantoms import chest_phantom
from progressive_ct.volumes import Volume, canonical_ct, ipl_affine, save_nifti, write_dicom_series

from conftest import cli_command

TINY = {'resolution': 32, 'xray_size': 32, 'train_split': 0.5, 'val_split': 0.25, 'test_split': 0.25, 'num_workers': 2}
QUIET = dict(progress=False, log=lambda *a: None)


def prepare_command():
    "`progressive-ct prepare` once the console script registers it; until then the module's own entry point."
    from progressive_ct.cli import build_parser
    subs = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    if any('prepare' in a.choices for a in subs): return cli_command() + ['prepare']
    return [sys.executable, '-m', 'progressive_ct.dataset', 'prepare']


def run_prepare(tmp_path, *args, **popen):
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore'}
    cmd = prepare_command() + [str(a) for a in args]
    if popen: return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def write_config(path, **data):
    path.write_text(json.dumps({'data': {**TINY, **data}}))
    return path


def ct_bytes(folder):
    "Every patient's stored CT and radiographs, by patient id."
    out = {}
    for split in ('train', 'val', 'test'):
        ds = CTDataset(folder, split)
        for i in range(len(ds)):
            it = ds[i]
            out[it['patient_id']] = (split, it['ct'].numpy().tobytes(), it['xray'].numpy().tobytes())
    return out


def test_cli_builds_caches_and_rebuilds(tmp_path):
    cfg = write_config(tmp_path / 'tiny.json')
    r = run_prepare(tmp_path, '--source', 'phantoms', '--num-patients', 4, '--out', tmp_path / 'ds', '--config', cfg, '--quiet')
    assert r.returncode == 0, r.stderr
    assert 'built' in r.stdout
    meta = load_metadata(tmp_path / 'ds')
    ids = sum(meta['splits'].values(), [])
    assert sorted(ids) == [f'phantom-{i:04d}' for i in range(4)] and len(set(ids)) == 4
    assert [len(meta['splits'][s]) for s in ('train', 'val', 'test')] == [2, 1, 1]
    assert meta['geometry']['detector'] == [32, 32] and meta['resolution'] == 32 and meta['fov_mm'] == 400.0
    assert (tmp_path / 'ds' / 'README.md').read_text().startswith('---')
    # a second run with the same inputs does nothing and says so
    r2 = run_prepare(tmp_path, '--source', 'phantoms', '--num-patients', 4, '--out', tmp_path / 'ds', '--config', cfg, '--quiet')
    assert r2.returncode == 0 and 'up to date' in r2.stdout, r2.stdout + r2.stderr
    assert load_metadata(tmp_path / 'ds')['created'] == meta['created']
    # the loader, with worker processes: every patient of the split once, at a stage's resolution
    seen = []
    for batch in make_loader(tmp_path / 'ds', 'train', resolution=16, batch_size=2, num_workers=2):
        assert batch['xray'].shape == (2, 2, 1, 32, 32) and batch['ct'].shape == (2, 1, 16, 16, 16)
        seen += batch['patient_id']
    assert sorted(seen) == sorted(meta['splits']['train'])
    # a changed setting rebuilds; the same patients keep their splits
    write_config(cfg, xray_size=48)
    r3 = run_prepare(tmp_path, '--source', 'phantoms', '--num-patients', 4, '--out', tmp_path / 'ds', '--config', cfg, '--quiet')
    assert r3.returncode == 0 and 'built' in r3.stdout, r3.stderr
    meta3 = load_metadata(tmp_path / 'ds')
    assert meta3['xray_size'] == 48 and meta3['splits'] == meta['splits'] and meta3['cache_key'] != meta['cache_key']
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.ds.')]


def test_kill_9_mid_build_then_rerun(tmp_path):
    cfg = write_config(tmp_path / 'c.json', resolution=64, xray_size=64)
    args = ('--source', 'phantoms', '--num-patients', 6, '--config', cfg, '--quiet')
    proc = run_prepare(tmp_path, *args, '--out', tmp_path / 'ds', start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:     # wait until some patients are built, not all
        if any(len(list(b.glob('.work/*.ct'))) >= 1 for b in tmp_path.glob('.ds.building-*')): break
        time.sleep(0.02)
    assert proc.poll() is None, 'the build ended before it could be interrupted: ' + proc.stderr.read()
    os.killpg(proc.pid, signal.SIGKILL)                       # the whole build: the main process and its workers
    proc.wait()
    assert not (tmp_path / 'ds').exists()
    with pytest.raises(InputError): load_metadata(tmp_path / 'ds')
    assert list(tmp_path.glob('.ds.building-*'))              # what the killed build left behind
    r = run_prepare(tmp_path, *args, '--out', tmp_path / 'ds')
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob('.ds.*'))                    # cleaned up
    ref = run_prepare(tmp_path, *args, '--out', tmp_path / 'ref')
    assert ref.returncode == 0, ref.stderr
    assert ct_bytes(tmp_path / 'ds') == ct_bytes(tmp_path / 'ref')
    assert load_metadata(tmp_path / 'ds')['splits'] == load_metadata(tmp_path / 'ref')['splits']


def lidc_layout(root, pid, ph, **kw):
    "A DICOM series in LIDC-IDRI's layout: patient / study / series / *.dcm."
    return write_dicom_series(ph, (400.0 / ph.shape[0],) * 3, root / pid / '01-01-2000-study' / '3000566-series', patient_id=pid, **kw)


def test_dicom_folder_like_lidc(tmp_path):
    root = tmp_path / 'LIDC'
    phantoms = {f'LIDC-IDRI-000{k}': chest_phantom(seed=k, size=48, fov_mm=400.0).numpy() for k in (1, 2, 3)}
    for pid, ph in phantoms.items(): lidc_layout(root, pid, ph, slope=0.5, intercept=-1024.0)
    # a radiograph series beside patient 2's CT is passed over
    dx = write_dicom_series(phantoms['LIDC-IDRI-0002'][:, :, :1], (8.0, 8.0, 8.0), root / 'LIDC-IDRI-0002' / 'study' / 'dx')
    for f in dx:
        ds = pydicom.dcmread(f); ds.Modality = 'DX'; ds.save_as(f)
    # patient 3's series has a gantry tilt: reported and skipped
    for f in (root / 'LIDC-IDRI-0003').rglob('*.dcm'):
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.3 * z, z]; ds.save_as(f)
    res = prepare('dicom', tmp_path / 'ds', input_dir=root, config={**TINY, 'resolution': 48, 'num_workers': 0}, **QUIET)
    assert sum(res['counts'].values()) == 2
    report = json.loads((tmp_path / 'ds' / REPORT_FILE).read_text())
    assert [s['patient_id'] for s in report['skipped']] == ['LIDC-IDRI-0003'] and 'gantry tilt' in report['skipped'][0]['reason']
    assert 'LIDC-IDRI-0003' in report['skipped'][0]['reason']                           # the folder is named
    # the stored CT is the phantom's canonical cube (same grid, 48³ over 400 mm, centred on the body), HU within the
    # rounding of the stored integers, and its affine says where it lies
    meta = load_metadata(tmp_path / 'ds')
    for split, pids in meta['splits'].items():
        ds = CTDataset(tmp_path / 'ds', split)
        for i, pid in enumerate(pids):
            sp = (400.0 / 48,) * 3
            ref = canonical_ct(Volume(phantoms[pid], sp, ipl_affine((48,) * 3, sp)), 48, 400.0)
            row = ds.rows()[i]
            ct = np.frombuffer(row.column('ct')[0].as_buffer(), np.int16).reshape(48, 48, 48)
            assert np.abs(ct - np.clip(ref.hu, -1024, 3071)).max() <= 1.0, pid
            assert np.allclose(np.reshape(row.column('affine')[0].as_py(), (4, 4)), ref.affine, atol=1e-3)
    card = (tmp_path / 'ds' / 'README.md').read_text()
    assert card.startswith('---') and 'LIDC-IDRI' in card and '## This build' in card
    # each series' patient and study are kept; a reconstruction written as DICOM carries them over, marked as derived
    ids = meta['dicom_identifiers']
    assert sorted(ids) == sorted(p for ps in meta['splits'].values() for p in ps)
    for pid, d in ids.items():
        src = pydicom.dcmread(next((root / pid).rglob('3000566-series/*.dcm')))
        assert (d['PatientID'], d['StudyInstanceUID'], d['SeriesInstanceUID']) == (pid, src.StudyInstanceUID, src.SeriesInstanceUID)
    from progressive_ct.cascade import ProgressiveCascadeModel
    from progressive_ct.geometry import Geometry
    from progressive_ct.ops import save_weights
    model = ProgressiveCascadeModel.from_tier('test', xray_img_size=32, voxel_dims=(12, 24, 48), fov_mm=400.0,
                                              geometry=Geometry.from_dict(meta['geometry']))          # untrained: the files are the point
    save_weights(model, tmp_path / 'w' / 'stage3_best.safetensors', {'stage': 3, 'model': model.config, 'dataset': str(tmp_path / 'ds')})
    r = subprocess.run(cli_command() + ['infer', '--checkpoint', str(tmp_path / 'w'), '--split', 'train', '--output-dir', str(tmp_path / 'out'),
                                        '--save-dicom'], capture_output=True, text=True, timeout=600, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert r.returncode == 0, r.stderr[-2000:]
    pid = meta['splits']['train'][0]
    d = pydicom.dcmread(next((tmp_path / 'out' / pid / 'stage3_dicom').iterdir()))
    assert (d.PatientID, d.StudyInstanceUID) == (pid, ids[pid]['StudyInstanceUID']) and d.SeriesInstanceUID != ids[pid]['SeriesInstanceUID']
    assert list(d.ImageType)[:2] == ['DERIVED', 'SECONDARY'] and d.ReferencedSeriesSequence[0].SeriesInstanceUID == ids[pid]['SeriesInstanceUID']
    assert 'not a CT acquisition' in d.DerivationDescription


def write_zero_spacing(hu, path):
    "A NIfTI whose affine has a zero column (spacing 0 along H), written by editing the header's bytes."
    nib.save(nib.Nifti1Image(hu, ipl_affine(hu.shape, (5.0, 5.0, 5.0))), str(path))
    raw = bytearray(path.read_bytes())
    raw[252:254] = np.int16(0).tobytes()                 # qform_code 0: the sform is the affine
    raw[296:312] = np.zeros(4, np.float32).tobytes()      # sform row y = 0
    path.write_bytes(bytes(raw))


def test_bad_inputs_are_named_and_skipped(tmp_path):
    src = tmp_path / 'cts'; src.mkdir()
    ph = chest_phantom(seed=0, size=40, fov_mm=300.0).numpy()
    sp = (7.5,) * 3
    save_nifti(ph, sp, src / 'good.nii.gz', dtype=np.int16)
    (src / 'corrupt.nii.gz').write_bytes((src / 'good.nii.gz').read_bytes()[:400])
    nib.save(nib.Nifti1Image(ph[0], np.eye(4)), str(src / 'flat.nii.gz'))
    nib.save(nib.Nifti1Image(np.stack([ph, ph], -1), ipl_affine(ph.shape, sp)), str(src / 'fourd.nii.gz'))
    nanv = ph.copy(); nanv[20, 20, 20] = np.nan
    nib.save(nib.Nifti1Image(nanv, ipl_affine(ph.shape, sp)), str(src / 'nan.nii.gz'))
    write_zero_spacing(ph, src / 'zero.nii')
    save_nifti(ph, (12.0,) * 3, src / 'coarse.nii.gz')
    save_nifti(ph[:20], sp, src / 'short.nii.gz')
    save_nifti(ph + 1024, sp, src / 'plus1024.nii.gz')
    res = prepare('nifti', tmp_path / 'ds', input_dir=src, config={**TINY, 'num_workers': 0}, **QUIET)
    report = json.loads((tmp_path / 'ds' / REPORT_FILE).read_text())
    assert [b['patient_id'] for b in report['built']] == ['good'] and sum(res['counts'].values()) == 1
    why = {s['patient_id']: s['reason'] for s in report['skipped']}
    expected = {'corrupt': 'cannot be read', 'flat': '3D', 'fourd': '3D', 'nan': 'NaN', 'zero': 'spacing',
                'coarse': 'at most 10 mm', 'short': 'only 20 slices', 'plus1024': 'HU + 1024'}
    assert set(why) == set(expected)
    for pid, word in expected.items():
        assert pid in why[pid] and word in why[pid], (pid, why[pid])
    assert all(s['error'] == 'bad input' for s in report['skipped'])
    # the HU + 1024 file builds when told to convert
    res = prepare('nifti', tmp_path / 'conv', input_dir=src, config={**TINY, 'num_workers': 0, 'hu_plus_1024': 'convert'}, **QUIET)
    assert 'plus1024' in sum(load_metadata(tmp_path / 'conv')['splits'].values(), [])
    # --strict: the first bad file is the error, one line, exit code 2, nothing written
    r = run_prepare(tmp_path, '--source', 'nifti', '--input-dir', src, '--out', tmp_path / 'strict', '--strict', '--workers', 0, '--quiet')
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr, r.stderr
    assert '.nii' in r.stderr and str(src) in r.stderr
    assert not (tmp_path / 'strict').exists() and not list(tmp_path.glob('.strict.*'))


def test_dicom_without_pixel_data_is_named(tmp_path):
    root = tmp_path / 'dicom'
    ph = chest_phantom(seed=4, size=40, fov_mm=400.0).numpy()
    write_dicom_series(ph, (10.0,) * 3, root / 'patient_a')
    files = write_dicom_series(ph, (10.0,) * 3, root / 'patient_b')
    ds = pydicom.dcmread(files[7]); del ds.PixelData; ds.save_as(files[7])
    prepare('dicom', tmp_path / 'ds', input_dir=root, config={**TINY, 'num_workers': 0}, **QUIET)
    report = json.loads((tmp_path / 'ds' / REPORT_FILE).read_text())
    assert [b['patient_id'] for b in report['built']] == ['patient_a']
    (skip,) = report['skipped']
    assert skip['patient_id'] == 'patient_b' and files[7].name in skip['reason'] and 'no pixel data' in skip['reason']


@pytest.mark.parametrize('args, words', [
    (['--source', 'phantoms', '--config', 'bad.json'], ['data.voxels', 'unknown key']),
    (['--source', 'nifti'], ['--input-dir']),
    (['--source', 'nifti', '--input-dir', 'nowhere'], ['nowhere', 'no such folder']),
    (['--source', 'phantoms', '--config', 'missing.json'], ['missing.json']),
    (['--source', 'phantoms', '--num-patients', 0], ['--num-patients 0']),
    (['--source', 'xrays'], ['--source']),
])
def test_bad_arguments_one_line_exit_2(tmp_path, args, words):
    (tmp_path / 'bad.json').write_text(json.dumps({'data': {'voxels': 64}}))
    r = run_prepare(tmp_path, *args, '--out', tmp_path / 'ds')
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr, r.stderr
    assert all(w in r.stderr for w in words), r.stderr
    assert not (tmp_path / 'ds').exists()


def test_an_existing_folder_that_is_not_a_dataset_is_never_replaced(tmp_path):
    (tmp_path / 'mine').mkdir(); (tmp_path / 'mine' / 'thesis.tex').write_text('precious')
    with pytest.raises(InputError, match='not a progressive_ct dataset'):
        prepare('phantoms', tmp_path / 'mine', num_patients=2, config=TINY, **QUIET)
    assert (tmp_path / 'mine' / 'thesis.tex').read_text() == 'precious'


def test_materials_stored_and_inputs_randomised_per_key(tmp_path):
    "Every row keeps the water and bone mass thicknesses; the randomised inputs repeat for a key and differ for another."
    from progressive_ct.dataset import collate
    from progressive_ct.train_step import randomize_inputs
    from progressive_ct.xray import RadiographRandomizer
    prepare('phantoms', tmp_path / 'ds', num_patients=4, config={**TINY, 'num_workers': 0}, **QUIET)
    meta = load_metadata(tmp_path / 'ds')
    plain, ds = CTDataset(tmp_path / 'ds', 'train'), CTDataset(tmp_path / 'ds', 'train', materials=True)
    assert 'mass' not in plain[0] and ds[0]['mass'].shape == (2, len(meta['views']), 32, 32) and ds[len(ds)]['key'] == len(ds)
    r = RadiographRandomizer(1.0, [[0.05, 0.5]] * len(meta['views']), p_ideal=0.0, seed=3)
    batch = collate([ds[0], ds[len(ds)], ds[0]])                 # key 0, key n (the same patient, another epoch), key 0 again
    assert batch['key'] == [0, len(ds), 0]
    out = randomize_inputs(r, batch)
    assert torch.equal(out['drr'], batch['xray']) and out['xray'].shape == batch['xray'].shape
    assert torch.equal(out['xray'][0], out['xray'][2]) and not torch.equal(out['xray'][0], out['xray'][1])


def test_prepare_with_an_xray_system(tmp_path):
    "`--xray-model chest` stores the chest system's radiographs (its own cache key); the CTs are the same."
    r = run_prepare(tmp_path, '--source', 'phantoms', '--num-patients', 2, '--out', tmp_path / 'ideal',
                    '--config', write_config(tmp_path / 'c.json'), '--quiet')
    assert r.returncode == 0, r.stderr
    r = run_prepare(tmp_path, '--source', 'phantoms', '--num-patients', 2, '--out', tmp_path / 'chest', '--xray-model', 'chest',
                    '--config', write_config(tmp_path / 'c.json'), '--quiet')
    assert r.returncode == 0, r.stderr
    ideal, chest = ct_bytes(tmp_path / 'ideal'), ct_bytes(tmp_path / 'chest')
    assert load_metadata(tmp_path / 'chest')['settings']['xray_model'] == 'chest'
    assert load_metadata(tmp_path / 'chest')['cache_key'] != load_metadata(tmp_path / 'ideal')['cache_key']
    for pid in ideal:
        assert ideal[pid][:2] == chest[pid][:2] and ideal[pid][2] != chest[pid][2]
