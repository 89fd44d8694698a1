"""Training throughput and peak memory per stage: samples/s of full training steps (forward, the stage's loss,
backward, AdamW step) and the peak memory of the process, at the quickstart tier on the CPU, or any config.

    python benchmarks/train.py [--config configs/quickstart.json] [--steps 6] [--device cpu|cuda]

Each stage runs in a fresh process (so peak memory is that stage's alone: CPU peak RSS, which includes torch's own
~0.3-0.5 GB; CUDA max allocated), on random radiographs and volumes of the configured sizes (throughput does not
depend on the data). The VGG term uses random weights here if ImageNet's cannot be loaded (same cost).
Writes benchmarks/results/train.json.
"""
import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def child(config, stage, steps, device):
    from progressive_ct.config import load_config
    from progressive_ct.ops import paste_crop, random_crop, resize_volume
    from progressive_ct.cascade import ProgressiveCascadeModel
    from progressive_ct.geometry import geometry_preset
    from progressive_ct.losses import STAGE_LOSSES
    cfg = load_config(config)
    torch.manual_seed(0)
    dims, S, fov = cfg.voxel_dims, cfg.model.xray_img_size, cfg.data.fov_mm
    g = geometry_preset(cfg.data.geometry, detector=S).fit_to_volume((cfg.data.resolution,) * 3, fov / cfg.data.resolution)
    model = ProgressiveCascadeModel(cfg.model_config(), g, fov).to(device)
    model.set_stage(stage)
    w = cfg.stage_loss(stage)
    loss_fn = STAGE_LOSSES[stage](w.l1_weight, w.ssim_weight, w.vgg_weight, w.gradient_weight, w.drr_weight, geometry=g, fov_mm=fov,
                                  vgg_weights=cfg.loss.vgg_weights, allow_random_weights=True, vgg_download=False).to(device)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    B, n = cfg.stage(stage).batch_size, dims[stage - 1]
    xray = torch.rand(B, 2, 1, S, S, device=device) * 0.5
    c = min(cfg.stage(stage).crop_size or n, n)          # a refiner trains on crop_size³ sub-volumes, as the trainer does
    ct = torch.rand(B, 1, c, c, c, device=device)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):
        if device == 'cuda': torch.cuda.synchronize()
        t0 = time.perf_counter()
        crop = random_crop(n, c, gen) if c < n else None
        vols = model(xray, upto=stage, crop=crop)
        full = paste_crop(resize_volume(vols[-2].detach().float(), n), vols[-1], crop) if crop and loss_fn.drr is not None else None
        loss, _ = loss_fn(vols[-1], ct, xray, full=full)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        if device == 'cuda': torch.cuda.synchronize()
        if i: times.append(time.perf_counter() - t0)          # the first step warms up
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == 'cuda' else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({'stage': stage, 'grid': n, 'crop': c, 'xray': S, 'batch_size': B, 'step_s_median': round(med, 4),
                      'samples_per_s': round(B / med, 3), 'peak_memory_mb': round(peak, 1),
                      'peak_memory_kind': 'cuda max allocated' if device == 'cuda' else 'process peak RSS',
                      'trainable_parameters': sum(p.numel() for p in model.trainable_parameters())}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--config', default=str(ROOT / 'configs' / 'quickstart.json'))
    ap.add_argument('--steps', type=int, default=6)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--stage', type=int, help=argparse.SUPPRESS)
    ap.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results' / 'train.json')
    args = ap.parse_args()
    if args.stage: return child(args.config, args.stage, args.steps, args.device)
    rows = []
    for k in (1, 2, 3):
        r = subprocess.run([sys.executable, __file__, '--config', args.config, '--steps', str(args.steps), '--device', args.device,
                            '--stage', str(k)], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-2000:]); raise SystemExit(f'stage {k} failed')
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"stage {k}: {row['grid']}³ from {row['xray']}², batch {row['batch_size']}: {row['step_s_median']:.3f} s/step, "
              f"{row['samples_per_s']:.2f} samples/s, peak {row['peak_memory_mb']:.0f} MB ({row['peak_memory_kind']})")
    result = {'benchmark': 'training step per stage', 'config': str(Path(args.config).name), 'device': args.device,
              'torch': torch.__version__, 'threads': torch.get_num_threads(), 'cpu': platform.processor() or platform.machine(),
              'results': rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
