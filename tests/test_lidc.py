"""LIDC-IDRI as TCIA serves it, without LIDC-IDRI: a TCIA-like tree built from phantoms (two CT series of different
thickness, a CR study, annotation XML, a series with a missing slice, a file that does not read), through `prepare` with
split lists, beside `prepare --source nifti` of the same CT, and a training step of `configs/x2ct_lidc_tiny.json`."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from progressive_ct.config import load_config
from progressive_ct.dataset import REPORT_FILE, CTDataset, load_metadata, prepare
from progressive_ct.errors import InputError
from progressive_ct.phantoms import chest_phantom
from progressive_ct.volumes import save_nifti, write_dicom_series, ipl_affine

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / 'configs' / 'x2ct_lidc_tiny.json'
N, FOV = 64, 320.0                     # the CTs: 64 slices of 5 mm over 320 mm
SP = FOV / N
QUIET = dict(progress=False, log=lambda *a: None)
XML = '<?xml version="1.0"?><LidcReadMessage><ResponseHeader/></LidcReadMessage>\n'


def study(root, pid, name): return root / pid / f'01-01-2000-{name}'


def ct_series(root, pid, hu, number, thick=False, study_name='30178', folder=None, step=2):
    "A CT series in TCIA's layout (folder `<number>.000000-NA-<digits>`); `thick`: every `step`-th slice (SliceThickness step × 5 mm)."
    vol, sp = (hu[::step], (step * SP, SP, SP)) if thick else (hu, (SP,) * 3)
    folder = study(root, pid, study_name) / (folder or f'{number}.000000-NA-{number % 100000:05d}')
    return write_dicom_series(vol, sp, folder, ipl_affine(hu.shape, (SP,) * 3) @ np.diag([step if thick else 1.0, 1, 1, 1]),
                              patient_id=pid, series_number=number)


def cr_study(root, pid, hu):
    "A chest radiograph study beside the CT (one CR image): not a CT, passed over."
    files = write_dicom_series(hu[:, :, :1].transpose(2, 0, 1), (SP,) * 3, study(root, pid, '92385') / '1.000000-NA-68385', patient_id=pid)
    for f in files:
        ds = pydicom.dcmread(f); ds.Modality = 'CR'; ds.save_as(f)


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """Nine patients as TCIA serves them, and split lists in X2CT-GAN's form that name eight of them (one in both lists) and
    one that was not downloaded."""
    base = tmp_path_factory.mktemp('lidc')
    root = base / 'LIDC-IDRI'
    hu = {k: chest_phantom(seed=k, size=N, fov_mm=FOV).numpy().astype(np.float32) for k in range(1, 9)}
    for k in (1, 2, 5):                                    # a thin and a thick series, a CR study, the readers' XML
        pid = f'LIDC-IDRI-000{k}'
        ct_series(root, pid, hu[k], 3000 + k)
        ct_series(root, pid, hu[k], 4000 + k, thick=True)
        cr_study(root, pid, hu[k])
        (next(study(root, pid, '30178').glob(f'{3000 + k}.*')) / '069.xml').write_text(XML)
    bad = ct_series(root, 'LIDC-IDRI-0003', hu[3], 3003)   # a file that does not read
    bad[10].write_bytes(b'\0' * 64)
    gap = ct_series(root, 'LIDC-IDRI-0004', hu[4], 3004)   # a missing slice
    gap[20].unlink()
    ct_series(root, 'LIDC-IDRI-0006', hu[6], 3006)         # downloaded, but in no list
    ct_series(root, 'LIDC-IDRI-0007', hu[7], 3007)         # a thin series, and the thicker one the list names as 8658.4
    ct_series(root, 'LIDC-IDRI-0007', hu[7], 8658, thick=True, folder='8658.400000-NA-00001')
    ct_series(root, 'LIDC-IDRI-0008', hu[8], 3008)         # the list names a series the download does not have
    cr_study(root, 'LIDC-IDRI-0010', hu[1])                # radiographs only
    lists = base / 'lists'
    lists.mkdir()
    (lists / 'train.txt').write_text('# as X2CT-GAN writes them: patient.date.SeriesNumber.k\n' + ''.join(
        f'LIDC-IDRI-000{k}.20000101.{3000 + k}.1\n' for k in (1, 3, 4, 5)) + 'LIDC-IDRI-0009.20000101.3009.1\n'
        'LIDC-IDRI-0007.20000101.3007.1\nLIDC-IDRI-0008.20000101.9999.1\nLIDC-IDRI-0010.20000101.3010.1\n')
    (lists / 'test.txt').write_text('LIDC-IDRI-0002.20000101.3002.1\nLIDC-IDRI-0007.20000101.8658.4.1\n')   # 0007: in both lists
    nifti = base / 'nifti'                                 # the same CT as one NIfTI file
    nifti.mkdir()
    save_nifti(hu[1], (SP,) * 3, nifti / 'LIDC-IDRI-0001.nii.gz')
    return {'root': root, 'lists': lists, 'nifti': nifti, 'base': base}


def tiny(tree, **data):
    "configs/x2ct_lidc_tiny.json with the test's lists and folders."
    cfg = json.loads(TINY.read_text())
    cfg['base'] = str(TINY.parent / cfg['base'])
    cfg['data'].update({'split_file': str(tree['lists']), **data})
    return cfg


@pytest.fixture(scope='module')
def prepared(tree):
    cfg = tiny(tree, train_split=1.0, val_split=0.0, test_split=0.0)   # the training list is all training: two patients
    logged = []
    (tree['base'] / 'tiny.json').write_text(json.dumps(cfg))
    summary = prepare('dicom', tree['base'] / 'ds', input_dir=tree['root'], config=tree['base'] / 'tiny.json', progress=False,
                      log=logged.append)
    return summary, logged, tree['base'] / 'ds'


def test_the_thin_series_for_every_patient_the_rest_reported(prepared, tree):
    summary, logged, ds = prepared
    report = json.loads((ds / REPORT_FILE).read_text())
    built = {b['patient_id']: Path(b['name']).name for b in report['built']}
    assert built == {'LIDC-IDRI-0001': '3001.000000-NA-03001', 'LIDC-IDRI-0002': '3002.000000-NA-03002', 'LIDC-IDRI-0005': '3005.000000-NA-03005',
                     'LIDC-IDRI-0007': '8658.400000-NA-00001', 'LIDC-IDRI-0008': '3008.000000-NA-03008'}
    for pid in ('LIDC-IDRI-0001', 'LIDC-IDRI-0002', 'LIDC-IDRI-0005'):   # the list names the thin series: 5 mm, not the 10 mm one
        folder = next(tree['root'].joinpath(pid).rglob(built[pid]))
        assert float(pydicom.dcmread(next(folder.glob('*.dcm')), stop_before_pixels=True).SliceThickness) == SP
    notes = {n['patient_id']: n['note'] for n in report['notes']}
    for pid in ('LIDC-IDRI-0001', 'LIDC-IDRI-0002', 'LIDC-IDRI-0005'):
        k = int(pid[-1])
        assert re.match(rf'chose \S+/{3000 + k}\.000000-NA-0300{k} \(CT, 64 files, 5 mm slices, series number {3000 + k}\): the series the split list names;', notes[pid]), notes[pid]
        assert f'{4000 + k}.000000-NA-0400{k} (CT, 32 files, 10 mm slices, series number {4000 + k}): CT: not the series the split list names' in notes[pid]
        assert 'not CT (modality CR)' in notes[pid] and '1 non-DICOM file(s) ignored: 069.xml' in notes[pid]
    # 0007: the test list's 8658.4 (TCIA's folder 8658.400000, SeriesNumber 8658), chosen over a thinner series
    assert re.match(r'chose \S+/8658\.400000-NA-00001 \(CT, 32 files, 10 mm slices, series number 8658\): the series the split list names', notes['LIDC-IDRI-0007'])
    assert 'the thinnest CT series (the split list names series 9999, not in this download)' in notes['LIDC-IDRI-0008']
    skipped = {s['patient_id']: s['reason'] for s in report['skipped']}
    assert sorted(skipped) == ['LIDC-IDRI-0003', 'LIDC-IDRI-0004', 'LIDC-IDRI-0010']
    assert 'missing slice' in skipped['LIDC-IDRI-0004']
    assert 'not a readable DICOM file' in skipped['LIDC-IDRI-0003'] and re.search(r'\.dcm', skipped['LIDC-IDRI-0003'])
    assert 'no CT image series' in skipped['LIDC-IDRI-0010'] and 'not CT (modality CR)' in skipped['LIDC-IDRI-0010']
    lists = report['split_lists']
    assert lists['missing'] == {'train': ['LIDC-IDRI-0009'], 'test': []}
    assert lists['skipped'] == {'train': ['LIDC-IDRI-0003', 'LIDC-IDRI-0004', 'LIDC-IDRI-0010'], 'test': []}
    assert lists['not_listed'] == ['LIDC-IDRI-0006'] and lists['in_both'] == ['LIDC-IDRI-0007'] and lists['over_limit'] == []
    said = '\n'.join(logged)
    for words in ('LIDC-IDRI-0009', 'LIDC-IDRI-0006', 'passed over', 'skipped 3', 'in both the train and the test list, tested only: LIDC-IDRI-0007'):
        assert words in said, (words, said)
    meta = load_metadata(ds)
    assert meta['splits'] == {'train': ['LIDC-IDRI-0001', 'LIDC-IDRI-0005', 'LIDC-IDRI-0008'], 'val': [], 'test': ['LIDC-IDRI-0002', 'LIDC-IDRI-0007']}


def test_by_the_rule_alone_every_patient_gets_its_thinnest_series(tree, tmp_path):
    "Without lists naming a series, the thinnest is kept, whichever has more slices; every patient's choice checked."
    from progressive_ct.dataset import find_sources
    root = tmp_path / 'tcia'
    hu = chest_phantom(seed=11, size=N, fov_mm=FOV).numpy()
    ct_series(root, 'LIDC-IDRI-0011', hu[12:52], 5)                            # 40 slices of 5 mm
    ct_series(root, 'LIDC-IDRI-0011', hu, 6)                                   # 64 slices of 5 mm ...
    for f in next(root.rglob('6.000000-*')).glob('*.dcm'):                       # ... retagged 7 mm thick: more slices, thicker
        d = pydicom.dcmread(f); d.SliceThickness = 7.0; d.save_as(f)
    [src] = find_sources('dicom', root)
    assert Path(src.path).name == '5.000000-NA-00005' and 'the thinnest CT series' in src.note
    assert '6.000000-NA-00006 (CT, 64 files, 7 mm slices, series number 6): CT: thicker slices than the chosen 5 mm' in src.note
    chosen = {s.patient_id: Path(s.path).name for s in find_sources('dicom', tree['root'])}
    assert chosen == {**{f'LIDC-IDRI-000{k}': f'{3000 + k}.000000-NA-0300{k}' for k in (1, 2, 3, 4, 5, 6, 7, 8)},
                      'LIDC-IDRI-0010': 'LIDC-IDRI-0010'}                             # radiographs only: its folder, to be skipped


def test_strict_stops_at_the_bad_patient(tree, tmp_path):
    cfg = tiny(tree)
    (tmp_path / 'c.json').write_text(json.dumps(cfg))
    with pytest.raises(InputError, match='LIDC-IDRI-0003'):
        prepare('dicom', tmp_path / 'ds', input_dir=tree['root'], config=tmp_path / 'c.json', strict=True, **QUIET)
    assert not (tmp_path / 'ds').exists()


def test_the_cube_matches_prepare_nifti_of_the_same_ct(prepared, tree, tmp_path):
    _, _, ds = prepared
    cfg = tiny(tree, split_file=None, train_split=1.0, val_split=0.0, test_split=0.0)
    (tmp_path / 'c.json').write_text(json.dumps(cfg))
    prepare('nifti', tmp_path / 'nifti_ds', input_dir=tree['nifti'], config=tmp_path / 'c.json', **QUIET)
    ref = CTDataset(tmp_path / 'nifti_ds', 'train').rows()[0]
    meta = load_metadata(ds)
    split = next(s for s, ps in meta['splits'].items() if 'LIDC-IDRI-0001' in ps)
    row = CTDataset(ds, split).rows()[meta['splits'][split].index('LIDC-IDRI-0001')]
    cube = lambda r: np.frombuffer(r.column('ct')[0].as_buffer(), np.int16).astype(int)
    assert ref.column('patient_id')[0].as_py() == row.column('patient_id')[0].as_py() == 'LIDC-IDRI-0001'
    diff = np.abs(cube(row) - cube(ref))
    assert diff.max() <= 1, diff.max()
    assert np.allclose(row.column('affine')[0].as_py(), ref.column('affine')[0].as_py(), atol=1e-3)
    assert cube(ref).std() > 100                                                  # a chest, not an empty cube


def test_a_training_step_of_the_tiny_variant(prepared, tree, tmp_path):
    "`configs/x2ct_lidc_tiny.json` (x2ct_lidc.json at a test size) trains stage 1 on the dataset prepared from the tree."
    _, _, ds = prepared
    cfg = tiny(tree, dataset_path=str(ds))
    cfg['checkpoints'] = {'save_dir': str(tmp_path / 'run'), 'save_every': 1}
    (tmp_path / 'c.json').write_text(json.dumps(cfg))
    assert load_config(tmp_path / 'c.json').data.detector_mm == 500.0           # the base's X2CT-GAN imager came through
    r = subprocess.run([sys.executable, '-m', 'progressive_ct.train', '--config', str(tmp_path / 'c.json'), '--stages', '1', '--no-progress'],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / 'run' / 'stage1_last.safetensors').is_file() or list((tmp_path / 'run').rglob('stage1*.safetensors')), \
        sorted(p.name for p in (tmp_path / 'run').rglob('*'))


def test_dry_run_of_the_lidc_config_before_the_data(tmp_path):
    "The full X2CT-GAN setting, before LIDC-IDRI or VGG16 weights are here: every stage measured, what training needs named, nothing written."
    cfg = json.loads((ROOT / 'configs' / 'x2ct_lidc.json').read_text())
    cfg['data']['dataset_path'], cfg['checkpoints']['save_dir'] = str(tmp_path / 'data'), str(tmp_path / 'run')
    cfg['loss']['vgg_weights'] = str(tmp_path / 'vgg16-397923af.pth')          # not there: no download
    for k, (n, crop) in zip((1, 2, 3), ((16, None), (32, None), (64, 32))):     # its shapes, smaller: the CPU test's budget
        cfg['training'][f'stage{k}'].update(voxel_dim=n, batch_size=2, **({'crop_size': crop} if crop else {}))
    cfg['training']['end_to_end']['crop_size'] = 32
    cfg['data'].update(resolution=64)
    (tmp_path / 'c.json').write_text(json.dumps(cfg))
    before = sorted(p.name for p in tmp_path.rglob('*'))
    r = subprocess.run([sys.executable, '-m', 'progressive_ct.train', '--config', str(tmp_path / 'c.json'), '--dry-run', '--cpu'],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith('dry run, stage')]
    assert len(lines) == 3 and all(re.search(r's/step .* peak memory \d+ MB', l) for l in lines), r.stdout
    assert 'NOT READY' in r.stdout and f"prepare --source dicom --config {tmp_path / 'c.json'}" in r.stderr and 'vgg16-397923af.pth' in r.stderr
    assert sorted(p.name for p in tmp_path.rglob('*')) == before


def test_the_command_line_takes_the_lists_and_names_bad_ones(tree, tmp_path):
    "`progressive-ct prepare --split-file DIR`: the lists from the command line; a folder without them is one line, exit 2, nothing written."
    from conftest import cli_command
    cfg = tiny(tree, split_file=None, train_split=1.0, val_split=0.0, test_split=0.0)
    (tmp_path / 'c.json').write_text(json.dumps(cfg))
    run = lambda *a: subprocess.run(cli_command() + ['prepare', '--config', str(tmp_path / 'c.json'), '--source', 'dicom',
                                                     '--input-dir', str(tree['root']), '--quiet', *map(str, a)],
                                    capture_output=True, text=True, timeout=600, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    r = run('--split-file', tmp_path, '--out', tmp_path / 'bad')
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and f'{tmp_path}: no train.txt' in r.stderr, r.stderr
    assert not (tmp_path / 'bad').exists()
    r = run('--split-file', tree['lists'], '--out', tmp_path / 'ds')
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_metadata(tmp_path / 'ds')['splits']['test'] == ['LIDC-IDRI-0002', 'LIDC-IDRI-0007'] and 'LIDC-IDRI-0009' in r.stdout
