"""`progressive-ct drr` end to end: outputs, orientation through the NIfTI affine, and bad input."""
import json

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform

from progressive_ct.phantoms import chest_phantom
from progressive_ct.volumes import AXCODES, ipl_affine

SIZE, FOV = 48, 400.0
SPACING = (FOV / SIZE,) * 3


@pytest.fixture(scope='module')
def phantom():
    return chest_phantom(seed=3, size=SIZE, fov_mm=FOV).numpy()


def save_as(hu, path, codes):
    "Save an (I, P, L) volume in another voxel order, with the affine that matches it."
    img = nib.Nifti1Image(hu.astype(np.float32), ipl_affine(hu.shape, SPACING))
    img = img.as_reoriented(ornt_transform(axcodes2ornt(AXCODES), axcodes2ornt(codes)))
    nib.save(img, str(path))
    return img


def test_outputs(cli, tmp_path, phantom):
    save_as(phantom, tmp_path / 'ct.nii.gz', AXCODES)
    r = cli('drr', '--ct', tmp_path / 'ct.nii.gz', '--out', tmp_path / 'out', '--detector', 64)
    assert r.returncode == 0, r.stderr
    out = tmp_path / 'out'
    assert sorted(p.name for p in out.iterdir()) == ['ap.npy', 'ap.png', 'geometry.json', 'lateral.npy', 'lateral.png']
    ap, lat = np.load(out / 'ap.npy'), np.load(out / 'lateral.npy')
    assert ap.dtype == np.float32 and ap.shape == lat.shape == (64, 64)
    info = json.loads((out / 'geometry.json').read_text())
    assert info['volume']['shape'] == [SIZE] * 3 and info['volume']['spacing_mm'] == pytest.approx(list(SPACING))
    for key in ('kind', 'sid', 'sdd', 'detector', 'pixel_spacing', 'views'):
        assert key in info['geometry']
    # the detector was fitted: the body's edge never touches the image border
    assert max(ap[0].max(), ap[-1].max(), ap[:, 0].max(), ap[:, -1].max()) < 0.05 * ap.max()


@pytest.mark.parametrize('codes', [('R', 'A', 'S'), ('L', 'P', 'S')])
def test_same_radiographs_whatever_the_voxel_order(cli, tmp_path, phantom, codes):
    save_as(phantom, tmp_path / 'ipl.nii.gz', AXCODES)
    img = save_as(phantom, tmp_path / 'other.nii.gz', codes)
    assert nib.aff2axcodes(img.affine) == codes and not np.array_equal(np.asarray(img.dataobj), phantom)
    for name in ('ipl', 'other'):
        r = cli('drr', '--ct', tmp_path / f'{name}.nii.gz', '--out', tmp_path / name, '--detector', 48, '--geometry', 'clinical')
        assert r.returncode == 0, r.stderr
    for view in ('ap', 'lateral'):
        a, b = np.load(tmp_path / 'ipl' / f'{view}.npy'), np.load(tmp_path / 'other' / f'{view}.npy')
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5), view


def test_heart_on_the_left_in_the_ap_image(cli, tmp_path, phantom):
    "The heart (patient's left) puts more attenuation right of the AP image's centre line than left of it."
    save_as(phantom, tmp_path / 'ct.nii.gz', ('R', 'A', 'S'))
    assert cli('drr', '--ct', tmp_path / 'ct.nii.gz', '--out', tmp_path / 'out', '--detector', 64).returncode == 0
    ap = np.load(tmp_path / 'out' / 'ap.npy')
    rows = slice(24, 44)                                   # mid chest
    assert ap[rows, 32:44].sum() > ap[rows, 20:32].sum()


def test_anisotropic_volume_and_padding(cli, tmp_path):
    "Thick slices and scanner padding far below -1000 HU are normal: they render (padding counts as air)."
    hu = np.full((20, 64, 64), -3024.0, np.float32)
    yy, xx = np.mgrid[:64, :64]
    hu[:, (yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 30 ** 2] = 0.0
    nib.save(nib.Nifti1Image(hu, ipl_affine(hu.shape, (5.0, 0.7, 0.7))), str(tmp_path / 'thick.nii.gz'))
    r = cli('drr', '--ct', tmp_path / 'thick.nii.gz', '--out', tmp_path / 'out', '--detector', 32, '--geometry', 'parallel')
    assert r.returncode == 0, r.stderr
    ap = np.load(tmp_path / 'out' / 'ap.npy')
    assert ap.shape == (32, 32) and ap.min() >= -1e-3
    # the middle rows (away from where the volume ends at top and bottom): 60 voxels of water at 0.7 mm through the centre
    assert ap[8:24].max() == pytest.approx(0.0206 * 60 * 0.7, rel=0.01)


def _bad_files(tmp, good):
    (tmp / 'corrupt.nii.gz').write_bytes(good.read_bytes()[:400])
    (tmp / 'text.nii').write_text('hello')
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), str(tmp / 'flat.nii.gz'))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 2), np.float32), np.eye(4)), str(tmp / 'four.nii.gz'))
    nan = np.zeros((16, 16, 16), np.float32); nan[1, 2, 3] = np.nan; nan[4, 5, 6] = np.inf
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp / 'nan.nii.gz'))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), str(tmp / 'zero.nii'))
    raw = bytearray((tmp / 'zero.nii').read_bytes())
    raw[252:254] = np.int16(0).tobytes(); raw[254:256] = np.int16(1).tobytes()   # sform only ...
    raw[296:312] = np.zeros(4, np.float32).tobytes()                             # ... with a zero-length axis
    (tmp / 'zero.nii').write_bytes(bytes(raw))


BAD = [
    (['--ct', 'missing.nii.gz'], 'missing.nii.gz'),
    (['--ct', 'corrupt.nii.gz'], 'corrupt.nii.gz'),
    (['--ct', 'text.nii'], 'text.nii'),
    (['--ct', 'flat.nii.gz'], '3D'),
    (['--ct', 'four.nii.gz'], '3D'),
    (['--ct', 'nan.nii.gz'], 'NaN'),
    (['--ct', 'zero.nii'], 'spacing'),
    (['--ct', 'good.nii.gz', '--detector', '0'], '--detector 0'),
    (['--ct', 'good.nii.gz', '--spacing', '0'], '--spacing 0'),
    (['--ct', 'good.nii.gz', '--geometry', 'fluoro'], 'fluoro'),
    (['--ct', 'good.nii.gz', '--views', 'ap,coronal'], 'coronal'),
]


@pytest.mark.parametrize('args,word', BAD, ids=[w for _, w in BAD])
def test_bad_input_is_one_clear_line(cli, tmp_path, phantom, args, word):
    save_as(phantom, tmp_path / 'good.nii.gz', AXCODES)
    _bad_files(tmp_path, tmp_path / 'good.nii.gz')
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'keep.txt').write_text('earlier results')
    r = cli('drr', *args, '--out', tmp_path / 'out')
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err and word in err, err
    if args[1] != 'good.nii.gz': assert args[1] in err      # names the file
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['keep.txt']   # nothing lost, nothing half-written


def test_xray_model_renders_a_clinical_picture(cli, tmp_path, phantom):
    "`--xray-model chest`: the system's log image beside the ideal line integrals (lower: scatter), and a 16-bit picture."
    from PIL import Image
    save_as(phantom, tmp_path / 'ct.nii.gz', AXCODES)
    for model in ('ideal', 'chest'):
        r = cli('drr', '--ct', tmp_path / 'ct.nii.gz', '--out', tmp_path / model, '--detector', 64, '--xray-model', model)
        assert r.returncode == 0, r.stderr
    ideal, chest = np.load(tmp_path / 'ideal' / 'ap.npy'), np.load(tmp_path / 'chest' / 'ap.npy')
    assert chest.shape == ideal.shape and np.corrcoef(chest.ravel(), ideal.ravel())[0, 1] > 0.95
    assert chest.max() < 0.9 * ideal.max()                        # scatter lifts the thickest paths' signal
    pic = np.asarray(Image.open(tmp_path / 'chest' / 'ap.png'))
    assert pic.dtype == np.uint16 and pic.max() <= 4095 and len(np.unique(pic)) > 256   # 12 bits stored
    info = json.loads((tmp_path / 'chest' / 'geometry.json').read_text())
    assert info['xray_model'] == 'chest' and 'log image' in info['radiographs']['ap']['units']
    r = cli('drr', '--ct', tmp_path / 'ct.nii.gz', '--out', tmp_path / 'x', '--xray-model', 'fluoroscope')
    assert r.returncode == 2 and 'fluoroscope' in r.stderr and 'Traceback' not in r.stderr
