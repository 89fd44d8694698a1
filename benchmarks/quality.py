"""Reconstruction quality on a phantom cohort: the cascade beside the yardsticks, four arms at an equal wall-clock budget.

    python benchmarks/quality.py [--patients 320] [--work DIR] [--arms a,b,c,d]

The cohort is the quickstart's (built-in phantoms at its tier: 16³ -> 32³ -> 64³ from 128² radiographs), split by
patient (80% / 7.5% / 12.5%: 256 / 24 / 40 of 320). Every arm trains on the training split, picks each stage's epoch on
the validation split (the trainer keeps the best validation PSNR) and is scored once on the test split:

  a  the seed's schedule: stage 1, then 2 with 1 frozen, then 3 with 1 and 2 frozen (the quickstart's configuration);
  b  the same, one stage-3 epoch shorter, then one epoch of the end-to-end phase (every stage together, each with its
     own loss, at a quarter of stage 3's learning rate);
  c  direct: one stage predicts the 64³ volume from the radiographs (stages 1 and 2 left at zero epochs, so stage 3
     refines the training mean volume upsampled) for the whole budget of arm a;
  d  arm a's stages 1 and 2 with stage 3 retrained without the DRR and gradient terms (stage 3's budget of arm a).

Arm c is sized from arm a's measured stage-3 epoch time so that its training time matches arm a's; an end-to-end epoch
costs more than the stage-3 epoch it replaces in arm b (it trains stages 1 and 2 too). Each arm's measured training
seconds are in the results and the table. Every stage is scored at its own grid and at the top grid (PSNR with data range 1 on the
[0, 1] scale = HU -1000..1500, SSIM3D, MAE in HU), with 95% bootstrap intervals over the test patients, beside the
training split's mean volume and the oracles (the ground truth area-averaged to 16³ and 32³ and upsampled back).
Writes benchmarks/results/quality.json, quality_sample.png (arm a on the first test patient: each stage upsampled
beside the oracles) and quality_overview.png (the same patient: the two radiographs in, the three stages out, the
front page's figure). At most 60 minutes on a 2-core CPU.

    python benchmarks/quality.py --figures-only [--work DIR]

draws the two figures again from arm a's saved run in --work, without training: it scores that run on the test split
first and refuses unless its stage-3 PSNR is the one quality.json records (the figures show the model the table scores).
"""
import argparse
import csv
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def base_config(work, patients):
    from progressive_ct.config import default_quickstart_config
    c = default_quickstart_config()
    c['data'].update(dataset_path=str(work / 'dataset'), max_patients=patients)
    return c


def epoch_seconds(run):
    "Seconds per epoch of each step of the schedule, from the run's metrics log (time between validation rows)."
    rows = [r for r in csv.DictReader(open(run / 'metrics.csv')) if r['name'] == 'val_psnr']
    per, prev = {}, None
    for r in rows:
        t = float(r['time'])
        if prev is not None and r['stage'] == prev[0]: per.setdefault(int(r['stage']), []).append(t - prev[1])
        prev = (r['stage'], t)
    return {k: sum(v) / len(v) for k, v in per.items()}


def run_arm(name, data, work, stages=None, copy_from=None):
    from progressive_ct.config import config_from_dict
    from progressive_ct.train import train
    run = work / name
    data['checkpoints'] = {'save_dir': str(run), 'save_every': 100}
    if copy_from is not None:
        run.mkdir(parents=True, exist_ok=True)
        for f in copy_from.glob('stage[12]_best.*'): shutil.copy(f, run / f.name)
    cfg = config_from_dict(data, f'quality arm {name}')
    t0 = time.perf_counter()
    train(cfg, stages, progress_bar=False, log=lambda *a: None)
    seconds = time.perf_counter() - t0
    print(f"arm {name}: trained in {seconds:.0f} s", flush=True)
    return cfg, run, seconds


def score(cfg, run):
    from progressive_ct.dataset import load_metadata
    from progressive_ct.quickstart import evaluate_stages
    from progressive_ct.ops import load_weights
    from progressive_ct.runs import build_model, final_weights
    from progressive_ct.config import resolve_path
    path = resolve_path(cfg.data.dataset_path)
    model = build_model(cfg, load_metadata(path))
    load_weights(model, final_weights(run))
    return evaluate_stages(model, path, 'test'), model


def sample_figure(model, path, out):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from progressive_ct.dataset import CTDataset
    from progressive_ct.metrics import oracles
    from progressive_ct.ops import resize_volume
    item = CTDataset(path, 'test', model.voxel_dims[-1])[0]
    with torch.no_grad():
        outs = [o.float().clamp(0, 1) for o in model.eval()(item['xray'][None], upto=3)]
    gt = item['ct'][None]
    top = model.voxel_dims[-1]
    vols = {f'stage {k} ({o.shape[-1]}³)': resize_volume(o, top) for k, o in enumerate(outs, 1)}
    vols |= {f'perfect {n}³': v for n, v in zip(model.voxel_dims[:-1], oracles(gt, model.voxel_dims).values())}
    vols['ground truth'] = gt
    fig, ax = plt.subplots(2, len(vols), figsize=(2.1 * len(vols), 4.4))
    n = top
    for j, (name, v) in enumerate(vols.items()):
        v = v[0, 0].numpy()
        ax[0, j].imshow(v[:, :, n // 2 + n // 8], cmap='gray', vmin=0, vmax=0.65)   # sagittal, beside the midline: ribs
        ax[1, j].imshow(v[:, n // 2 + n // 16], cmap='gray', vmin=0, vmax=0.65)     # coronal, through the spine
        ax[0, j].set_title(name, fontsize=8)
        for a in ax[:, j]: a.set_xticks([]); a.set_yticks([])
    ax[0, 0].set_ylabel('sagittal', fontsize=8); ax[1, 0].set_ylabel('coronal', fontsize=8)
    fig.suptitle(f"test patient {item['patient_id']}: each stage upsampled to {top}³ beside the perfect coarser volumes", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def overview_figure(model, path, out):
    "The front page's figure: a test patient's AP and lateral radiographs in, each stage's volume out at its own grid."
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from progressive_ct.dataset import CTDataset
    item = CTDataset(path, 'test', model.voxel_dims[-1])[0]
    with torch.no_grad():
        outs = [o.float().clamp(0, 1)[0, 0].numpy() for o in model.eval()(item['xray'][None], upto=3)]
    vols = {f'stage {k}: {o.shape[-1]}³': o for k, o in enumerate(outs, 1)} | {'ground truth': item['ct'][0].numpy()}
    fig, ax = plt.subplots(2, 1 + len(vols), figsize=(1.55 * (1 + len(vols)), 3.5))
    for r, (view, image) in enumerate(zip(('AP', 'lateral'), item['xray'][:, 0].numpy())):
        ax[r, 0].imshow(image, cmap='gray')
        ax[r, 0].set_title(f'in: {view}', fontsize=8)
    for j, (name, v) in enumerate(vols.items(), 1):
        n = v.shape[0]
        ax[0, j].imshow(v[:, n // 2 + n // 16], cmap='gray', vmin=0, vmax=0.65)       # coronal, through the spine
        ax[1, j].imshow(v[:, :, n // 2 + n // 8], cmap='gray', vmin=0, vmax=0.65)     # sagittal, beside the midline: ribs
        ax[0, j].set_title(('out, ' if j < len(vols) else '') + name, fontsize=8)
    for a in ax.flat: a.set_xticks([]); a.set_yticks([])
    ax[0, 1].set_ylabel('coronal', fontsize=8); ax[1, 1].set_ylabel('sagittal', fontsize=8)
    fig.tight_layout(pad=0.3)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def figures(run, out, expected_psnr):
    "Both figures from a saved arm-a run, after checking it is the run quality.json scored."
    from progressive_ct.config import load_config
    cfg = load_config(run / 'config.json')
    res, model = score(cfg, run)
    if abs(res['stage3']['psnr'] - expected_psnr) > 1e-6:
        sys.exit(f"quality: {run} scores stage 3 at {res['stage3']['psnr']:.4f} dB, but {out} records {expected_psnr:.4f} dB: "
                 'not the run the results hold; run the whole benchmark instead')
    path = Path(cfg.data.dataset_path)
    sample_figure(model, path, out.with_name('quality_sample.png'))
    overview_figure(model, path, out.with_name('quality_overview.png'))
    print(f"stage 3 scores {res['stage3']['psnr']:.4f} dB, as recorded; wrote {out.with_name('quality_sample.png')} "
          f"and {out.with_name('quality_overview.png')}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--patients', type=int, default=320)
    p.add_argument('--work', type=Path, default=ROOT / 'runs' / 'quality')
    p.add_argument('--arms', default='a,b,c,d')
    p.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results' / 'quality.json')
    p.add_argument('--figures-only', action='store_true', help="draw the figures again from arm a's run in --work")
    args = p.parse_args()
    if args.figures_only:
        recorded = json.loads(args.out.read_text())['arms']['a']['stage3']['psnr']
        return figures(args.work.resolve() / 'a', args.out, recorded)
    arms = args.arms.split(',')
    t_start = time.perf_counter()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = {'benchmark': 'reconstruction quality, four arms at an equal wall-clock budget', 'patients': args.patients,
               'machine': f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               'command': 'python benchmarks/quality.py ' + ' '.join(sys.argv[1:]), 'arms': {}}
    base = base_config(work, args.patients)

    cfg_a, run_a, sec_a = run_arm('a', json.loads(json.dumps(base)), work)
    ep = epoch_seconds(run_a)
    res_a, model_a = score(cfg_a, run_a)
    results['arms']['a'] = {'what': "the seed's schedule: stages 1, 2, 3 in turn, earlier ones frozen", 'train_seconds': sec_a,
                            'epochs': [cfg_a.stage(k).num_epochs for k in (1, 2, 3)], 'epoch_seconds': ep, **res_a}
    results['yardsticks'] = {k: res_a[k] for k in res_a if k == 'mean_volume' or k.startswith('oracle')}
    results['n_test'], results['dims'], results['data_range'] = res_a['n'], res_a['dims'], res_a['data_range']
    sample_figure(model_a, Path(cfg_a.data.dataset_path), args.out.with_name('quality_sample.png'))
    overview_figure(model_a, Path(cfg_a.data.dataset_path), args.out.with_name('quality_overview.png'))
    print(f"arm a: stage 3 {res_a['stage3']['psnr']:.2f} dB at {res_a['dims'][-1]}³", flush=True)

    if 'b' in arms:
        b = json.loads(json.dumps(base))
        s3 = b['training']['stage3']
        s3['num_epochs'] -= 1
        b['training']['end_to_end'] = {'num_epochs': 1, 'batch_size': s3['batch_size'], 'learning_rate': s3['learning_rate'] / 4,
                                       'crop_size': s3['crop_size']}   # one end-to-end epoch for the stage-3 epoch it replaces
        cfg, run, sec = run_arm('b', b, work)
        res, _ = score(cfg, run)
        results['arms']['b'] = {'what': 'arm a with one stage-3 epoch less, then the end-to-end phase (every stage, each its own loss)',
                                'train_seconds': sec, 'epochs': [cfg.stage(k).num_epochs for k in (1, 2, 3)] + [cfg.training.end_to_end.num_epochs],
                                'epoch_seconds': epoch_seconds(run), **res}
    if 'c' in arms:
        c = json.loads(json.dumps(base))
        for k in (1, 2): c['training'][f'stage{k}']['num_epochs'] = 0
        c['training']['stage3']['num_epochs'] = max(1, round((sec_a - 20) / ep[3]))
        cfg, run, sec = run_arm('c', c, work)
        res, _ = score(cfg, run)
        results['arms']['c'] = {'what': 'direct: one stage predicts 64³ (stages 1 and 2 untrained: stage 3 refines the mean volume), arm a\'s whole budget',
                                'train_seconds': sec, 'epochs': [0, 0, cfg.stage(3).num_epochs], 'epoch_seconds': epoch_seconds(run), **res}
    if 'd' in arms:
        d = json.loads(json.dumps(base))
        d['loss']['stage3'].update(drr_weight=0.0, gradient_weight=0.0)
        cfg, run, sec = run_arm('d', d, work, stages=(3,), copy_from=run_a)
        res, _ = score(cfg, run)
        results['arms']['d'] = {'what': "arm a's stages 1 and 2; stage 3 retrained without the DRR and gradient terms",
                                'train_seconds': sec, 'epochs': [cfg_a.stage(1).num_epochs, cfg_a.stage(2).num_epochs, cfg.stage(3).num_epochs],
                                'epoch_seconds': epoch_seconds(run), **res}
    results['seconds'] = round(time.perf_counter() - t_start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"wrote {args.out} in {results['seconds']} s")


def report(results) -> str:
    "The benchmark's tables: each arm's stages beside the yardsticks (the quickstart's table), with its training time."
    from progressive_ct.quickstart import format_table
    return '\n\n'.join(f"arm {arm}: {a['what']}; trained {a['train_seconds']:.0f} s, epochs {a['epochs']}\n{format_table(a)}"
                        for arm, a in results['arms'].items())


if __name__ == '__main__':
    main()
