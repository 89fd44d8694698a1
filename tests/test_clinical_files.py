"""`progressive-ct infer --mode files` on radiographs as clinics write them, each rendered from a phantom chest: a
non-square MONOCHROME1 DICOM DX (12-bit, rescaled, windowed, ImagerPixelSpacing), a 16-bit PNG and an 8-bit JPEG
without any pixel size. Each lands on the checkpoint's detector where its pixel size puts it (computed here by hand),
shows there the anatomy the model's own geometry renders, and the command reconstructs from it.

The checkpoint is a small untrained cascade saved as a pretrained folder: the point is the files, not the model."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

S, DET_MM = 64, 6.25            # the checkpoint's detector: 64 pixels of 6.25 mm, 400 mm square
FOV = 256.0                     # its field of view, mm
DX = dict(shape=(300, 240), mm=1.6)          # the DX detector: 480 mm tall, 384 mm wide
PNG = dict(shape=(200, 160), mm=400 / 200)   # no pixel size in the file: its 200 rows span the detector
JPEG = dict(shape=(120, 150), mm=400 / 150)  # no pixel size: its 150 columns span the detector


def dx_file(path, bright, pixel_mm, window=(3500, 8000), frames=1, **header):
    "A DX 'for presentation' file of `bright` (bone bright): 12-bit MONOCHROME1, rescale slope 2 and intercept -500, windowed."
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID = '1.2.840.10008.5.1.4.1.1.1.1', generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=fm, preamble=b'\0' * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID, 'DX'
    ds.PhotometricInterpretation, ds.SamplesPerPixel, (ds.Rows, ds.Columns) = 'MONOCHROME1', 1, bright.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 2, -500, 'US'
    ds.WindowCenter, ds.WindowWidth = window
    ds.ImagerPixelSpacing = list(pixel_mm)
    ds.PresentationLUTShape = 'INVERSE'
    for k, v in header.items(): setattr(ds, k, v)
    stored = np.round(4000 - 3800 * bright / bright.max()).astype(np.uint16)          # bone low: shown white
    if frames > 1: ds.NumberOfFrames = frames
    ds.PixelData = np.concatenate([stored.ravel()] * frames).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.fixture(scope='module')
def kit(tmp_path_factory):
    "The checkpoint folder, the chest's radiographs on the model's detector, and the clinical files of the same chest."
    from progressive_ct.cascade import ProgressiveCascadeModel
    from progressive_ct.drr import normalize_radiograph, render_drr
    from progressive_ct.geometry import geometry_preset, hu_to_mu
    from progressive_ct.phantoms import chest_phantom
    folder = tmp_path_factory.mktemp('clinical')
    geometry = geometry_preset('x2ct', detector=(S, S), pixel_spacing=DET_MM)
    torch.manual_seed(0)
    model = ProgressiveCascadeModel.from_tier('test', geometry=geometry, fov_mm=FOV)
    chest = hu_to_mu(chest_phantom(0, 64, FOV))[None, None]
    render = lambda shape, mm: normalize_radiograph(render_drr(chest, FOV / 64, geometry.replace(detector=shape, pixel_spacing=mm)))[0].numpy()
    direct = render((S, S), DET_MM)                                     # [AP, lateral] on the model's own detector
    lo_hi = np.percentile(direct.reshape(2, -1), (1, 99), axis=1).T
    reference = {'percentiles': [1.0, 99.0], 'ap': list(map(float, lo_hi[0])), 'lateral': list(map(float, lo_hi[1]))}
    model.save_pretrained(folder / 'model', stage=3, radiograph_reference=reference)
    files = {}
    for view, (dx, png, jpg) in zip(('ap', 'lateral'), zip(render(**DX), render(**PNG), render(**JPEG))):
        files[f'{view}.dcm'] = dx_file(folder / f'{view}.dcm', dx, (DX['mm'],) * 2)
        Image.fromarray(np.round(png / png.max() * 65535).astype(np.uint16)).save(folder / f'{view}.png')
        grey = Image.fromarray(np.round(jpg / jpg.max() * 255).astype(np.uint8))
        (grey if view == 'ap' else grey.convert('RGB')).save(folder / f'{view}.jpg', quality=92)   # the lateral one as colour
        files[f'{view}.png'], files[f'{view}.jpg'] = folder / f'{view}.png', folder / f'{view}.jpg'
    return {'folder': folder, 'model': folder / 'model', 'geometry': model.geometry, 'direct': direct, 'reference': reference,
            'files': files}


# where each file lands, computed by hand from the pixel sizes: along rows and along columns, the detector pixels covered
# (fractional edges), the image pixels that reach the detector, and the mm cropped and padded
@pytest.mark.parametrize('name, fmt, rows, cols', [
    # DX: 300 × 1.6 = 480 mm tall: 25 rows cut at each end, all 64 detector rows; 240 × 1.6 = 384 mm wide: 8 mm of air each side
    ('dcm', DX, ([0, 64], [25, 275], 80, 0), ([1.28, 62.72], [0, 240], 0, 16)),
    # PNG: 200 rows span 400 mm (2 mm pixels); 160 × 2 = 320 mm wide: (400 - 320) / 2 / 6.25 = 6.4 detector columns of air each side
    ('png', PNG, ([0, 64], [0, 200], 0, 0), ([6.4, 57.6], [0, 160], 0, 80)),
    # JPEG: 150 columns span 400 mm (2.667 mm pixels); 120 rows = 320 mm tall: 6.4 detector rows of air above and below
    ('jpg', JPEG, ([6.4, 57.6], [0, 120], 0, 80), ([0, 64], [0, 150], 0, 0)),
])
def test_each_file_lands_where_its_pixel_size_puts_it(kit, name, fmt, rows, cols):
    from progressive_ct.radiographs import AIR, place_on_detector, read_radiograph
    for view, k in (('ap', 0), ('lateral', 1)):
        x, how = read_radiograph(kit['files'][f'{view}.{name}'], S, kit['reference'][view], geometry=kit['geometry'])
        placed, where = place_on_detector(np.ones(fmt['shape']), fmt['mm'], S, DET_MM)
        assert np.allclose(where['rows'], rows[0]) and np.allclose(where['cols'], cols[0]), where
        assert where['source_rows'] == rows[1] and where['source_cols'] == cols[1], where
        assert np.allclose(where['crop_mm'], [rows[2], cols[2]]) and np.allclose(where['pad_mm'], [rows[3], cols[3]]), where
        # the file read: air exactly where the image does not reach, the image wherever it does
        x = x.numpy()
        outside, inside = placed == 0, placed > 1 - 1e-9              # partly covered pixels in neither
        assert x.shape == (S, S) and (x[outside] == AIR).all() and (x[inside] != AIR).all()
        # ... and there the anatomy the model's own geometry renders (the file's percentiles matched to the reference)
        r = np.corrcoef(x[inside], kit['direct'][k][inside])[0, 1]
        assert r > 0.999, (name, view, r)
        # the level: percentiles of the part of the image the file holds, matched to the whole image's reference, are off by
        # as much as the anatomy cropped away shifts them (0.023 measured for this phantom's lateral JPEG, which covers part of the detector)
        assert np.abs(x[inside] - kit['direct'][k][inside]).mean() < 0.03, (name, view)
        assert 'resampled to the detector\'s 6.25 mm pixels' in how, how
    if name == 'dcm':
        assert "ImagerPixelSpacing 1.6 mm at the detector" in how and 'rows cropped 480→400 mm, columns padded 384→400 mm with air' in how, how
        assert 'on the 250×240 px that land on the detector' in how, how   # the percentiles: the rows that land only
    else:
        assert f"no pixel size in a {'PNG' if name == 'png' else 'JPEG'} file" in how and 'padded' in how and 'cropped' not in how, how


def test_the_window_is_applied_as_pydicom_applies_it(kit, tmp_path):
    "A narrow window saturates the lungs and the bone: the image read is pydicom's windowed image, not the raw pixels."
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    from progressive_ct.radiographs import place_on_detector, read_radiograph
    f = dx_file(tmp_path / 'narrow.dcm', np.asarray(Image.open(kit['files']['ap.png']), np.float64), (2.0, 2.0), window=(2500, 1500))
    ref = kit['reference']['ap']
    x, _ = read_radiograph(f, S, ref, geometry=kit['geometry'])
    ds = pydicom.dcmread(f)
    shown = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    bright = shown.max() - shown                                          # MONOCHROME1
    lo, hi = np.percentile(bright, (1, 99))
    expected, _ = place_on_detector(ref[0] + (bright - lo) * (ref[1] - ref[0]) / (hi - lo), 2.0, S, DET_MM)
    assert np.abs(x.numpy() - expected).max() < 1e-5
    raw = ds.pixel_array.max() - ds.pixel_array.astype(np.float64)        # the same without the window: another image
    lo, hi = np.percentile(raw, (1, 99))
    unwindowed, _ = place_on_detector(ref[0] + (raw - lo) * (ref[1] - ref[0]) / (hi - lo), 2.0, S, DET_MM)
    assert np.abs(x.numpy() - unwindowed).max() > 0.1 * (ref[1] - ref[0])


@pytest.mark.parametrize('ap, lateral', [('ap.dcm', 'lateral.png'), ('ap.jpg', 'lateral.dcm')])
def test_infer_files_reconstructs_from_clinical_files(kit, cli, tmp_path, ap, lateral):
    out = tmp_path / 'out'
    r = cli('infer', '--checkpoint', kit['model'], '--mode', 'files', '--xray-ap', kit['files'][ap], '--xray-lat', kit['files'][lateral],
            '--output-dir', out, '--save-nifti', '--device', 'cpu')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'real radiographs are not DRRs' in r.stdout and 'ImagerPixelSpacing 1.6 mm' in r.stdout, r.stdout
    summary = json.loads((out / 'summary.json').read_text())
    folder = Path(summary['outputs'][0])
    assert folder.name == Path(ap).stem and (folder / 'figure.png').exists()
    img = nib.load(folder / 'stage3.nii.gz')
    assert img.shape == (64,) * 3 and np.allclose(img.header.get_zooms(), FOV / 64) and np.isfinite(img.get_fdata()).all()
    said = summary['radiographs']
    assert said['ap']['file'] == str(kit['files'][ap]) and said['lateral']['file'] == str(kit['files'][lateral])
    dcm = said['ap' if ap.endswith('.dcm') else 'lateral']['description']
    other = said['lateral' if ap.endswith('.dcm') else 'ap']['description']
    assert 'rows cropped 480→400 mm, columns padded 384→400 mm with air' in dcm, dcm
    assert 'no pixel size' in other and 'square pixels assumed, the longer side spanning the detector' in other, other


def test_bad_clinical_files_are_one_line(kit, cli, tmp_path):
    from progressive_ct.errors import InputError
    from progressive_ct.radiographs import read_radiograph
    bright = np.asarray(Image.open(kit['files']['ap.png']), np.float64)
    nan = bright.astype(np.float32)
    nan[3, 4] = np.nan
    Image.fromarray(nan).save(tmp_path / 'nan.tif')
    colour = np.stack([bright, bright, bright[::-1]], axis=-1)
    Image.fromarray(np.round(colour / colour.max() * 255).astype(np.uint8)).save(tmp_path / 'colour.jpg')
    cases = [(dx_file(tmp_path / 'zero.dcm', bright, (0, 0)), 'ImagerPixelSpacing 0\\0: a pixel size must be two positive numbers'),
             (dx_file(tmp_path / 'frames.dcm', bright, (2, 2), frames=2), 'multi-frame DICOM (2 frames)'),
             (dx_file(tmp_path / 'mag.dcm', bright, (2, 2), EstimatedRadiographicMagnificationFactor=0.8), 'EstimatedRadiographicMagnificationFactor 0.8'),
             (dx_file(tmp_path / 'huge.dcm', bright, (40, 40)), 'not to scale'),
             (tmp_path / 'nan.tif', 'NaN'), (tmp_path / 'colour.jpg', 'a colour image')]
    for f, words in cases:
        with pytest.raises(InputError) as e: read_radiograph(f, S, kit['reference']['ap'], geometry=kit['geometry'])
        msg = str(e.value)
        assert msg.startswith(str(f)) and words in msg and '\n' not in msg, msg
    out = tmp_path / 'out'
    r = cli('infer', '--checkpoint', kit['model'], '--mode', 'files', '--xray-ap', tmp_path / 'zero.dcm', '--xray-lat',
            kit['files']['lateral.png'], '--output-dir', out, '--device', 'cpu')
    err = r.stderr.strip()
    assert r.returncode == 2 and 'zero.dcm' in err and len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert not out.exists()
