"""Robustness to real radiographs: models trained on ideal DRRs and on randomised X-ray systems, scored on test phantoms
whose radiographs come from X-ray systems.

    python benchmarks/robustness.py [--work DIR] [--patients 320] [--diffdrr-python PATH]
    python benchmarks/robustness.py --run RUN_FOLDER --dataset DATASET --out FILE.json    # score one trained run

Two models are trained with the quickstart's configuration on the same phantom cohort (256 / 24 / 40 patients): one
with `training.randomize_xray` false (ideal DRRs only), one with it true (the default). Each is scored on the test split
(stage 3 at 64³; PSNR with data range 1 on the [0, 1] scale = HU -1000..1500; 95% bootstrap intervals over the test
patients) with radiographs that come

  (a) ideal: the stored line integrals;
  (b) with each factor of the X-ray image model alone, at two strengths (a log image read as a file of line integrals,
      `normalize_radiograph`): a polychromatic beam, scatter without a grid, quantum noise, detector blur; and the
      clinical processing alone, through a 16-bit PNG read with percentile calibration;
  (c) through the kit's named chest system and its console (`progressive_ct.xray.SYSTEMS['chest']`: 120 kV, 3 mm Al +
      0.1 mm Cu, 12:1 grid, SPR20 5; sources in nbs/05_xray.ipynb), written as a 16-bit PNG without the kit's
      calibration and read back by `read_radiograph` (percentiles to the checkpoint's reference); and the bedside
      system (90 kV, no grid, harder processing, collimated), a second chain, neither drawn as such in training;
  (d) the chest system through an 8-bit PNG;
  (e) rendered by another projector: DiffDRR 0.6.1 (Siddon ray tracing of the same CT and geometry), run in its own
      virtualenv given by --diffdrr-python (skipped when not given).

Every row has the mean volume and the oracles (perfect 16³ and 32³ volumes upsampled) beside it. Writes
benchmarks/results/robustness.json. Measured here (2-core CPU): 29 min 37 s, training the ideal arm (366 s) and
scoring 15 conditions × 2 arms (1409 s), the randomised arm reused from a quickstart run.
"""
import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

def log_condition(imaging, pixel_mm):
    "Inputs: the system's log image on the network's scale (as a .npy of line integrals is read)."
    from progressive_ct.xray import xray_log_image
    from progressive_ct.drr import normalize_radiograph
    def make(ideal, mass, key=0):
        g = torch.Generator().manual_seed(1000 + int(key))
        return normalize_radiograph(xray_log_image(mass[None].float(), imaging, pixel_mm, g)[0]).float()
    return make


def file_condition(imaging, chain, pixel_mm, size, reference, percentiles, bits_file):
    "Inputs: the processed picture written as a PNG of `bits_file` bits (no calibration chunk), read by `read_radiograph`."
    from PIL import Image
    from progressive_ct.xray import xray_log_image, clinical_image
    from progressive_ct.radiographs import read_radiograph
    from progressive_ct.drr import denormalize_radiograph
    views = list(reference)
    tmp = Path(tempfile.mkdtemp(prefix='robustness_'))
    def make(ideal, mass, key=0):
        g = torch.Generator().manual_seed(1000 + int(key))
        log = (xray_log_image(mass[None].float(), imaging, pixel_mm, g) if imaging is not None else
               denormalize_radiograph(ideal[None].float()))                 # no system: the ideal line integrals
        img = clinical_image(log, chain, pixel_mm)[0]
        out = []
        for v, view in enumerate(views):
            q = 255 if bits_file == 8 else 65535
            a = np.round(img[v].numpy().astype(np.float64) * q).astype(np.uint8 if bits_file == 8 else np.uint16)
            f = tmp / f'{key}_{view}.png'
            Image.fromarray(a).save(f)
            x, _ = read_radiograph(f, size, reference[view], percentiles)
            out.append(x)
        return torch.stack(out).float()
    return make


def conditions(meta, reference):
    from progressive_ct.geometry import Geometry
    from progressive_ct.xray import SYSTEMS, XrayImaging, photons_per_mm2, tube_spectrum
    from dataclasses import replace
    geo = Geometry.from_dict(meta['geometry'])
    px, size = geo.pixel_spacing, geo.detector[0]
    pct = tuple(reference['percentiles'])
    ref = {v: reference[v] for v in meta['views']}
    none = dict(spr_20cm=0.0, kerma_ugy=0.0, blur_mm=0.0, grid=False)
    chest, chest_chain = SYSTEMS['chest']
    per_pixel = lambda n, kvp=120.0: n / (photons_per_mm2(tube_spectrum(kvp, 3.0, 0.1), 1.0) * px ** 2)  # µGy for n photons/pixel
    c = {'(a) ideal': None,
         '(b) polychromatic 120 kV': log_condition(XrayImaging(**none), px),
         '(b) polychromatic 70 kV': log_condition(XrayImaging(**none, kvp=70.0, al_mm=2.5, cu_mm=0.0), px),
         '(b) scatter SPR20 2, no grid': log_condition(XrayImaging(**(none | dict(spr_20cm=2.0))), px),
         '(b) scatter SPR20 6, no grid': log_condition(XrayImaging(**(none | dict(spr_20cm=6.0))), px),
         '(b) noise 1e4 photons/pixel': log_condition(XrayImaging(**(none | dict(kerma_ugy=per_pixel(1e4)))), px),
         '(b) noise 1e3 photons/pixel': log_condition(XrayImaging(**(none | dict(kerma_ugy=per_pixel(1e3)))), px),
         '(b) blur 0.5 pixel': log_condition(XrayImaging(**(none | dict(blur_mm=0.5 * px))), px),
         '(b) blur 1 pixel': log_condition(XrayImaging(**(none | dict(blur_mm=1.0 * px))), px),
         '(b) processing alone, 16-bit PNG': file_condition(None, chest_chain, px, size, ref, pct, 16),
         '(c) chest system, 16-bit PNG': file_condition(chest, chest_chain, px, size, ref, pct, 16),
         '(c) bedside system, 16-bit PNG': file_condition(*SYSTEMS['bedside'], px, size, ref, pct, 16),
         '(d) chest system, 8-bit PNG': file_condition(chest, replace(chest_chain, bits=8), px, size, ref, pct, 8)}
    return c


def diffdrr_condition(dataset, split, python, work, mapping, reference):
    """Inputs rendered by DiffDRR 0.6.1 in its own virtualenv (`benchmarks/diffdrr_render.py`). With the kit's HU mapping
    they are line integrals, read as a .npy is; with DiffDRR's own (densities rescaled per volume: another unit) they are
    an image of unknown scale, calibrated by percentiles to the checkpoint's reference as a PNG would be."""
    from progressive_ct.xray import match_percentiles
    from progressive_ct.dataset import CTDataset, load_metadata, _row_array
    from progressive_ct.drr import normalize_radiograph
    ds, meta = CTDataset(dataset, split), load_metadata(dataset)
    name = lambda i: str(ds.patient_ids[i]).replace('/', '_')
    src, out = work / 'diffdrr_in', work / f'diffdrr_{mapping}'
    (src / 'cts').mkdir(parents=True, exist_ok=True)
    (src / 'geometry.json').write_text(json.dumps({'spacing_mm': meta['spacing_mm'], 'geometry': meta['geometry']}))
    for i in range(len(ds)):
        f = src / 'cts' / f'{name(i)}.npy'
        if not f.is_file(): np.save(f, _row_array(ds.rows()[i], 'ct').astype(np.float32))
    t = time.time()
    r = subprocess.run([python, str(ROOT / 'benchmarks' / 'diffdrr_render.py'), str(src), str(out), '--mapping', mapping],
                       capture_output=True, text=True)
    if r.returncode != 0: raise SystemExit(f"DiffDRR rendering failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    print(f"DiffDRR ({mapping} mapping) rendered {len(ds)} CTs in {time.time() - t:.0f} s", flush=True)
    ref = [reference[v] for v in meta['views']]
    def make(ideal, mass, key=0):
        x = torch.from_numpy(np.load(out / f'{name(int(key) % len(ds))}.npy')).float()
        return normalize_radiograph(x) if mapping == 'kit' else match_percentiles(x, ref, tuple(reference['percentiles'])).float()
    return make


def train(work, patients, randomize):
    from progressive_ct.config import default_quickstart_config
    c = default_quickstart_config()
    c['data'].update(dataset_path=str(work / 'dataset'), max_patients=patients)
    c['training']['randomize_xray'] = randomize
    run = work / ('randomized' if randomize else 'ideal')
    c['checkpoints']['save_dir'] = str(run)
    cfg = work / f"{run.name}.json"
    cfg.write_text(json.dumps(c, indent=1))
    if not (run / 'stage3_best.safetensors').is_file():
        t = time.time()
        subprocess.run([sys.executable, '-m', 'progressive_ct.train', '--config', str(cfg), '--no-progress'], check=True)
        print(f"trained {run.name} in {time.time() - t:.0f} s", flush=True)
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--work', type=Path, default=ROOT / 'benchmarks' / 'work' / 'robustness')
    p.add_argument('--patients', type=int, default=320)
    p.add_argument('--diffdrr-python', help="python of a virtualenv with diffdrr==0.6.1 (pip install --no-deps diffdrr==0.6.1 "
                                            "einops fastcore scipy torchio matplotlib pandas, and torch)")
    p.add_argument('--only', help='comma-separated arms: ideal,randomized')
    p.add_argument('--run', type=Path, help="score this trained run (e.g. a quickstart's checkpoints folder) on --dataset, no training")
    p.add_argument('--dataset', type=Path, help='the dataset of --run')
    p.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results' / 'robustness.json')
    p.add_argument('--conditions', help='score only the conditions whose names contain one of these comma-separated words')
    args = p.parse_args()
    torch.set_num_threads(2)
    from progressive_ct.runs import load_checkpoint
    from progressive_ct.dataset import load_metadata
    from progressive_ct.quickstart import evaluate_stages
    from progressive_ct.xray import SYSTEMS
    args.work.mkdir(parents=True, exist_ok=True)
    if args.run:
        runs, dataset = {'given': args.run}, args.dataset
    else:
        arms = (args.only or 'ideal,randomized').split(',')
        runs = {a: train(args.work, args.patients, a == 'randomized') for a in arms}
        dataset = args.work / 'dataset'
    meta = load_metadata(dataset)
    results = {'benchmark': 'benchmarks/robustness.py: stage 3 on test phantoms whose radiographs come from X-ray systems, models trained on ideal DRRs and on random systems',
               'data_range': 'PSNR: 3D, data range 1 on the [0, 1] scale = HU window -1000..1500; [95% bootstrap interval over test patients]',
               'systems': {k: {'imaging': i.to_dict(), 'chain': c.to_dict()} for k, (i, c) in SYSTEMS.items()},
               'machine': f"{platform.processor() or platform.machine()}, torch {torch.__version__}", 'arms': {}}
    t0 = time.time()
    for arm, run in runs.items():
        model, record = load_checkpoint(run / 'stage3_best.safetensors')
        ref = record['radiograph_reference']
        conds = conditions(meta, ref)
        if args.diffdrr_python:
            for mapping in ('kit', 'diffdrr'):
                conds[f'(e) DiffDRR 0.6.1, {mapping} HU mapping'] = diffdrr_condition(dataset, 'test', args.diffdrr_python, args.work, mapping, ref)
        if args.conditions: conds = {k: v for k, v in conds.items() if any(w in k for w in args.conditions.split(','))}
        rows = {}
        for name, make in conds.items():
            res = evaluate_stages(model, dataset, 'test', inputs=make)
            rows[name] = {k: {'psnr': res[k]['psnr'], 'psnr_ci': res[k]['psnr_ci']} for k in ('mean_volume', 'stage1', 'stage2', 'stage3', 'oracle16', 'oracle32')}
            r = rows[name]
            print(f"{arm:10s} {name:42s} stage3 {r['stage3']['psnr']:6.2f} [{r['stage3']['psnr_ci'][0]:.2f}, {r['stage3']['psnr_ci'][1]:.2f}]"
                  f"  stage1 {r['stage1']['psnr']:6.2f} stage2 {r['stage2']['psnr']:6.2f}  mean {r['mean_volume']['psnr']:.2f}"
                  f"  oracle16 {r['oracle16']['psnr']:.2f} oracle32 {r['oracle32']['psnr']:.2f}", flush=True)
        results['arms'][arm] = rows
    results['scoring_seconds'] = round(time.time() - t0, 1)
    out = args.out
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == '__main__':
    main()
