"""Training steps of the full tier per stage on a GPU: step time, samples/s and peak memory, with and without gradient
checkpointing, torch.compile and channels-last; the seed's goal for stage 3 checked beside them.

    python benchmarks/gpu.py                              # the seed's config on the GPU (at most ~8 minutes on one)
    python benchmarks/gpu.py --device cpu --tiny          # the same code path on the tiny config, on the CPU (CI runs it)
    python benchmarks/gpu.py --config C [--steps 6] [--variants base,no_checkpointing,compile,channels_last] [--budget 420]

Each (stage, variant) runs in a fresh process (peak memory is that step's alone: `torch.cuda.max_memory_allocated`
on a GPU, the process's peak RSS on the CPU) through the trainer's own `measure_step`: the stage's real loss (the VGG
term with random weights where ImageNet's cannot be had: same cost), the fused AdamW step, the configured mixed
precision (the seed's bf16), batch size and crop, on random inputs (a step costs the same whatever the voxels hold).
The first step (cuDNN's search, compilation) is reported apart from the median of the rest. Variants past `--budget`
seconds are skipped and recorded as such. Writes benchmarks/results/gpu.json (gpu_cpu.json on the CPU; or --out).
"""
import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {                      # name: changes to the config
    'base': {},                                                   # the config as it is (the seed's: checkpointing on)
    'no_checkpointing': {'model.use_gradient_checkpointing': False},
    'compile': {'training.compile': True},
    'channels_last': {'training.channels_last': True},
}
GOAL = {'stage': 3, 'samples_per_s': 5.0, 'peak_memory_gb': 20.0}   # per GPU, at 256³ batch 2 (the goal)


def child(config, stage, variant, steps, device, tiny):
    import torch
    from progressive_ct.config import load_config
    from progressive_ct.runs import config_meta, make_accelerator
    from progressive_ct.preflight import measure_step
    cfg = load_config(config)
    cfg.loss.allow_random_vgg = True                 # the benchmark machine may be offline: same cost
    for key, value in VARIANTS[variant].items():
        section, name = key.split('.')
        setattr(getattr(cfg, section), name, value)
    meta = config_meta(cfg)
    acc = make_accelerator(cfg, cpu=device == 'cpu')
    row = measure_step(cfg, stage, meta, acc, steps)
    row['variant'] = variant
    if device == 'cuda': row['gpu'] = torch.cuda.get_device_name()
    print(json.dumps(row))


def run_child(args, stage, variant, timeout):
    cmd = [sys.executable, __file__, '--config', args.config, '--steps', str(args.steps), '--device', args.device,
           '--stage', str(stage), '--variant', variant]
    try: r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired: return {'stage': stage, 'variant': variant, 'error': f'over {timeout:.0f} s'}
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ['?'])[-1]
        return {'stage': stage, 'variant': variant, 'error': last[:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--config', default=None, help='default: configs/config_progressive.json (configs/tiny.json with --tiny)')
    ap.add_argument('--tiny', action='store_true', help='the tiny test config (16/32/64 from 64²): the CPU check of this script')
    ap.add_argument('--device', default=None, help="'cuda' (default where there is one) or 'cpu'")
    ap.add_argument('--steps', type=int, default=6, help='steps per measurement, the first apart')
    ap.add_argument('--variants', default=','.join(VARIANTS), help=f"from {', '.join(VARIANTS)}")
    ap.add_argument('--budget', type=float, default=420, help='seconds; later measurements are skipped')
    ap.add_argument('--out', type=Path, help='default: benchmarks/results/gpu.json (gpu_cpu.json for --device cpu)')
    ap.add_argument('--stage', type=int, help=argparse.SUPPRESS)
    ap.add_argument('--variant', help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    args.config = args.config or str(ROOT / 'configs' / ('tiny.json' if args.tiny else 'config_progressive.json'))
    args.out = args.out or ROOT / 'benchmarks' / 'results' / ('gpu.json' if args.device == 'cuda' else 'gpu_cpu.json')
    if args.stage: return child(args.config, args.stage, args.variant, args.steps, args.device, args.tiny)
    if args.device == 'cuda' and not torch.cuda.is_available(): raise SystemExit('gpu.py: --device cuda, but torch sees no GPU')
    variants = [v.strip() for v in args.variants.split(',') if v.strip()]
    if unknown := [v for v in variants if v not in VARIANTS]: raise SystemExit(f"gpu.py: unknown variants {unknown}; from {list(VARIANTS)}")
    start, rows = time.perf_counter(), []
    for variant in variants:                          # every stage's base first: the figures that matter most
        for stage in (1, 2, 3):
            left = args.budget - (time.perf_counter() - start)
            if left <= 0:
                rows.append({'stage': stage, 'variant': variant, 'skipped': f'past the {args.budget:.0f} s budget'}); continue
            row = run_child(args, stage, variant, timeout=max(60.0, left))
            rows.append(row)
            if 'error' in row: print(f"stage {stage}, {variant}: failed: {row['error']}"); continue
            print(f"stage {stage}, {variant:>16}: {row['grid']}³ (crop {row['crop']}³) from {row['xray']}², batch {row['batch_size']}, "
                  f"{row['mixed_precision']}: first step {row['first_step_s']:.2f} s, then {row['step_s']:.3f} s/step = "
                  f"{row['samples_per_s']:.2f} samples/s; peak {row['peak_memory_mb'] / 1024:.2f} GB ({row['peak_memory_kind']})")
    base3 = next((r for r in rows if r.get('stage') == 3 and r.get('variant') == 'base' and 'step_s' in r), None)
    goal = None
    if base3 and not args.tiny and args.device == 'cuda':
        goal = {**GOAL, 'measured_samples_per_s': base3['samples_per_s'], 'measured_peak_memory_gb': round(base3['peak_memory_mb'] / 1024, 2),
                'met': base3['samples_per_s'] >= GOAL['samples_per_s'] and base3['peak_memory_mb'] / 1024 < GOAL['peak_memory_gb']}
        print(f"goal, stage 3 per GPU: >= {GOAL['samples_per_s']} samples/s and < {GOAL['peak_memory_gb']} GB: "
              f"{goal['measured_samples_per_s']} samples/s, {goal['measured_peak_memory_gb']} GB -> {'met' if goal['met'] else 'NOT met'}")
    result = {'benchmark': 'training step per stage and variant', 'config': Path(args.config).name, 'device': args.device,
              'gpu': torch.cuda.get_device_name() if args.device == 'cuda' else None, 'torch': torch.__version__,
              'machine': platform.platform(), 'steps': args.steps, 'seconds': round(time.perf_counter() - start, 1),
              'goal': goal, 'results': rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f'wrote {args.out} ({result["seconds"]:.0f} s)')
    if any('error' in r for r in rows): raise SystemExit('gpu.py: some measurements failed (see above)')


if __name__ == '__main__':
    main()
