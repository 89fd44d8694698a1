"""Learning rate per stage and warm-up, chosen by a measured sweep at the quickstart tier, on the validation split.

    python benchmarks/lr_sweep.py [--patients 96] [--epochs 3] [--warmups 0,0.05,0.2] [--workdir DIR]

The quickstart tier (16³ → 32³ → 64³ from 128², the refiners on 32³ crops) on `--patients` built-in phantoms split
80 / 20 by patient into training and validation (no test split: nothing here is a reported result). Stage by stage:
each learning rate of the stage's grid trains the stage for `--epochs` epochs from the chosen previous stage; the best
validation PSNR (data range 1) picks the rate, and that arm's weights feed the next stage. Each grid holds the seed's
full-tier rate (1e-4 / 5e-5 / 2e-5) beside larger ones. Then the warm-up fraction (`training.warmup_fraction`, shared by
the stages) is swept at stages 2 and 3 with their chosen rates. A value replaces the incumbent (the seed's rate, the
config's warm-up) only where it beats it by more than `--min-gain` dB (0.05): differences below that are noise at this
size. `--rechoose` applies that rule again to the arms recorded in the results file, without training.
Writes benchmarks/results/lr_sweep.json.
"""
import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = {1: [1e-4, 5e-4, 1e-3, 2e-3, 4e-3],           # the seed's rate first
        2: [5e-5, 2e-4, 5e-4, 1e-3, 2e-3, 4e-3],
        3: [2e-5, 2e-4, 5e-4, 1e-3, 2e-3, 4e-3]}


def arm(cfg, k, lr, warmup, epochs, folder: Path, prev: Path | None) -> dict:
    "Train stage k alone into `folder` (the previous stage's best copied in); its validation PSNR per epoch."
    from progressive_ct.train import train
    c = json.loads(json.dumps(cfg.to_dict()))
    c['training'][f'stage{k}'].update(learning_rate=lr, num_epochs=epochs)
    c['training']['warmup_fraction'] = warmup
    c['checkpoints']['save_dir'] = str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if prev is not None:
        for suffix in ('.safetensors', '.json'): shutil.copy(prev.with_suffix(suffix), folder / f'stage{k - 1}_best{suffix}')
    from progressive_ct.config import config_from_dict
    t0 = time.perf_counter()
    res = train(config_from_dict(c), (k,), progress_bar=False, log=lambda *a: None)[f'stage{k}']
    curve = [float(l.split(',')[-1]) for l in (folder / 'metrics.csv').read_text().splitlines() if ',val_psnr,' in l]
    return {'stage': k, 'learning_rate': lr, 'warmup_fraction': warmup, 'epochs': epochs, 'best_val_psnr': round(res['psnr'], 3),
            'best_epoch': res['epoch'], 'val_psnr_per_epoch': [round(v, 3) for v in curve], 'seconds': round(time.perf_counter() - t0, 1)}


def choose(values: dict, incumbent, min_gain: float):
    "The value with the best score, unless it beats the incumbent's score by `min_gain` dB or less: then the incumbent."
    best = max(values, key=values.get)
    return best if incumbent not in values or values[best] > values[incumbent] + min_gain else incumbent


def rechoose(path: Path, min_gain: float):
    "Apply the choice rule to the arms recorded in a results file (no training)."
    result = json.loads(path.read_text())
    base = result['arms'][0]['warmup_fraction']
    lr = {}
    for k in (1, 2, 3):
        arms = [a for a in result['arms'] if a['stage'] == k and a['warmup_fraction'] == base]
        lr[k] = choose({a['learning_rate']: a['best_val_psnr'] for a in arms}, GRID[k][0], min_gain)
    warm = {}
    for a in result['arms']:
        if a['stage'] in (2, 3) and a['learning_rate'] == lr[a['stage']]: warm.setdefault(a['warmup_fraction'], []).append(a['best_val_psnr'])
    warm = {w: sum(v) / len(v) for w, v in warm.items() if len(v) == 2}
    result['chosen_learning_rate'] = {f'stage{k}': v for k, v in lr.items()}
    result['chosen_warmup_fraction'] = choose(warm, base, min_gain)
    result['choice_rule'] = f'best validation PSNR; the incumbent (the seed\'s rate, warm-up {base:g}) kept unless beaten by more than {min_gain} dB'
    result['warmup_mean_val_psnr'] = {f'{w:g}': round(v, 3) for w, v in warm.items()}
    path.write_text(json.dumps(result, indent=2) + '\n')
    print(f"chosen: {result['chosen_learning_rate']}, warm-up {result['chosen_warmup_fraction']:g} "
          f"(mean over stages 2 and 3: {result['warmup_mean_val_psnr']}); wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--patients', type=int, default=96)
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--warmups', default='0,0.05,0.2')
    ap.add_argument('--workdir', type=Path)
    ap.add_argument('--min-gain', type=float, default=0.05, help='dB a value must gain over the incumbent to replace it')
    ap.add_argument('--rechoose', action='store_true', help='only apply the choice rule to the arms already in --out')
    ap.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results' / 'lr_sweep.json')
    args = ap.parse_args()
    if args.rechoose: return rechoose(args.out, args.min_gain)
    import torch
    from progressive_ct.config import load_config
    cfg = load_config(ROOT / 'configs' / 'quickstart.json')
    work = Path(args.workdir or tempfile.mkdtemp(prefix='pct_lr_sweep_'))
    cfg.data.dataset_path, cfg.data.max_patients = str(work / 'dataset'), args.patients
    cfg.data.train_split, cfg.data.val_split, cfg.data.test_split = 0.8, 0.2, 0.0
    base_warmup = cfg.training.warmup_fraction
    start, rows, chosen, prev = time.perf_counter(), [], {}, None
    for k in (1, 2, 3):
        arms = []
        for lr in GRID[k]:
            r = arm(cfg, k, lr, base_warmup, args.epochs, work / f'stage{k}_lr{lr:g}', prev)
            arms.append(r); rows.append(r)
            print(f"stage {k}, lr {lr:g}, warm-up {base_warmup:g}: val PSNR per epoch {r['val_psnr_per_epoch']} dB (range 1), "
                  f"best {r['best_val_psnr']:.2f} ({r['seconds']:.0f} s)", flush=True)
        chosen[k] = choose({r['learning_rate']: r['best_val_psnr'] for r in arms}, GRID[k][0], args.min_gain)
        best = next(r for r in arms if r['learning_rate'] == chosen[k])
        prev = work / f"stage{k}_lr{best['learning_rate']:g}" / f'stage{k}_best.safetensors'
        print(f"stage {k}: chosen lr {chosen[k]:g} (val PSNR {best['best_val_psnr']:.2f} dB; the seed's {GRID[k][0]:g}: "
              f"{arms[0]['best_val_psnr']:.2f} dB)", flush=True)
    warm = {}
    for k in (2, 3):
        src = work / f"stage{k - 1}_lr{chosen[k - 1]:g}" / f'stage{k - 1}_best.safetensors'
        for w in (float(x) for x in args.warmups.split(',')):
            if w == base_warmup:
                r = next(r for r in rows if r['stage'] == k and r['learning_rate'] == chosen[k] and r['warmup_fraction'] == w)
            else:
                r = arm(cfg, k, chosen[k], w, args.epochs, work / f'stage{k}_warm{w:g}', src); rows.append(r)
            warm.setdefault(w, []).append(r['best_val_psnr'])
            print(f"stage {k}, lr {chosen[k]:g}, warm-up {w:g}: best val PSNR {r['best_val_psnr']:.2f} dB", flush=True)
    chosen_warmup = choose({w: sum(v) / len(v) for w, v in warm.items()}, base_warmup, args.min_gain)
    print(f"warm-up: chosen {chosen_warmup:g} (mean over stages 2 and 3: "
          + ', '.join(f"{w:g}: {sum(v) / len(v):.2f} dB" for w, v in warm.items()) + ")")
    result = {'benchmark': 'learning rate and warm-up sweep', 'tier': 'quickstart (16/32/64 from 128², refiners on 32³ crops)',
              'patients': {'train': len(json.loads((work / 'dataset' / 'progressive_ct.json').read_text())['splits']['train']),
                           'val': len(json.loads((work / 'dataset' / 'progressive_ct.json').read_text())['splits']['val'])},
              'epochs_per_arm': args.epochs, 'batch_size': [cfg.stage(k).batch_size for k in (1, 2, 3)],
              'metric': 'best validation PSNR over the epochs, dB, data range 1 (HU -1000..1500)',
              'chosen_learning_rate': {f'stage{k}': v for k, v in chosen.items()}, 'chosen_warmup_fraction': chosen_warmup,
              'torch': torch.__version__, 'seconds': round(time.perf_counter() - start, 1), 'arms': rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + '\n')
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    rechoose(args.out, args.min_gain)                     # the rule's record in the file
    if args.workdir is None: shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
