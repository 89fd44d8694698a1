"""Peak memory and time of one stage-3 training step, with and without gradient checkpointing.

    python benchmarks/memory.py [--grids 128 192 256] [--batch 1 2] [--crop 128] [--device cpu|cuda] [--limit-gb 20] [--all-stages]
    python benchmarks/memory.py --table-only      # print the table of benchmarks/results/memory.json again

One step = the cascade's forward up to stage 3 (stages 1 and 2 frozen, as `set_stage(3)` leaves them), `Stage3Loss`
(L1, SSIM, tri-planar VGG, gradient, DRR; VGG with random weights if torchvision's file is not cached: the cost is the
same), backward, AdamW step. Full-tier widths and 512² radiographs; stages 1 and 2 at 64³ and 128³; stage 3 at each of
`--grids` (256 is the full tier; 192 and 320 are the seed's alternatives), batch 1 and 2, each with and without
checkpointing. Stage 3 trains on a `--crop`³ sub-volume of its grid (default 128, `training.stage3.crop_size` of
`configs/config_progressive.json`; 0: the whole grid), as the trainer does; the DRR term renders the crop pasted into
the upsampled stage-2 volume. Goals at 256³: with checkpointing at most half the memory without it; batch 2 under 20 GB.

How memory is measured:
- CUDA: `torch.cuda.max_memory_allocated` over the step (after a warm-up step), minus what was allocated before it.
- CPU: each configuration runs in a fresh subprocess. The model is built and its projection grids cached, then the
  peak resident set is reset (`/proc/self/clear_refs`) and the step runs; the step's memory is the peak RSS (VmHWM)
  minus the RSS before the step. It includes what glibc's allocator keeps after tensors are freed, as a real run would.
  A configuration is skipped, with a note, when its memory predicted from the same configuration on the next smaller
  grid (its step memory scaled by the voxel count, which overestimates a little: the encoder and stages 1-2 do not
  grow, plus the memory before the step) exceeds
  `--limit-gb` (default: the smaller of 20 GB and the memory available, less 2 GB for the other processes on this
  machine); a watchdog also stops any run whose RSS passes the limit. For a skipped configuration without
  checkpointing the ratio is then bounded (checkpointed / limit) and estimated (checkpointed / predicted).

`--all-stages` also times one forward + backward of stages 1 and 2 (the full-tier check of the cascade notebook).
Writes benchmarks/results/memory.json.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

GB = 1024 ** 3
RESULTS = Path(__file__).parent / 'results' / 'memory.json'


def _status_kb(field, pid='self'):
    for line in open(f'/proc/{pid}/status'):
        if line.startswith(field + ':'): return int(line.split()[1])
    return 0


def _mem_available():
    for line in open('/proc/meminfo'):
        if line.startswith('MemAvailable:'): return int(line.split()[1]) * 1024
    return 0


def step(args):
    "One configuration, in this process: prints one JSON line."
    import warnings
    from progressive_ct.ops import paste_crop, resize_volume
    from progressive_ct.cascade import ProgressiveCascadeModel
    from progressive_ct.losses import Stage3Loss
    torch.manual_seed(0)
    dev = torch.device(args.device)
    changes = dict(use_gradient_checkpointing=bool(args.checkpointing))
    if args.voxel_dims: changes['voxel_dims'] = tuple(args.voxel_dims)
    if args.xray: changes['xray_img_size'] = args.xray
    model = ProgressiveCascadeModel.from_tier(args.tier, **changes).to(dev)
    stages = [1, 2, 3] if args.all_stages else [3]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        loss_fn = Stage3Loss(geometry=model.geometry, fov_mm=model.fov_mm, allow_random_weights=True, vgg_download=False).to(dev)
    S, N, B = model.encoder.xray_img_size, model.voxel_dims[-1], args.batch
    xray = 0.5 * torch.rand(B, 2, 1, S, S, device=dev)
    c = args.crop if 0 < args.crop < N else N
    crop = (((N - c) // 4 * 2),) * 3 + (c,) if c < N else None     # the centre sub-volume, even offsets
    target = torch.rand(B, 1, c, c, c, device=dev)
    for s in model.stages: s.lifter.grid(dev)                      # the cached projection grids are part of the model
    out = dict(batch=B, checkpointing=bool(args.checkpointing), device=args.device, tier=args.tier,
               voxel_dims=list(model.voxel_dims), xray=S, crop=c, vgg_pretrained=bool(loss_fn.vgg.pretrained))
    for k in stages:
        model.set_stage(k).train()
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

        def one_step():
            opt.zero_grad(set_to_none=True)
            vols = model(xray, upto=k, crop=crop if k == 3 else None)
            if k == 3:
                full = paste_crop(resize_volume(vols[-2].detach().float(), N), vols[-1], crop) if crop else None
                loss = loss_fn(vols[-1], target, xray, full=full)[0]
            else: loss = vols[-1].float().mean()
            loss.backward()
            opt.step()
            return float(loss)

        if dev.type == 'cuda':
            one_step(); torch.cuda.synchronize()                     # warm-up: kernels, allocator
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter(); one_step(); torch.cuda.synchronize()
            res = dict(step_s=time.perf_counter() - t0, peak_gb=torch.cuda.max_memory_allocated() / GB,
                       step_peak_gb=(torch.cuda.max_memory_allocated() - base) / GB)
        else:
            base = _status_kb('VmRSS') * 1024
            with open('/proc/self/clear_refs', 'w') as f: f.write('5')   # reset the peak RSS to the current RSS
            t0 = time.perf_counter(); one_step()
            res = dict(step_s=time.perf_counter() - t0, peak_gb=_status_kb('VmHWM') * 1024 / GB,
                       step_peak_gb=(_status_kb('VmHWM') * 1024 - base) / GB)
        out[f'stage{k}'] = res
        model.zero_grad(set_to_none=True); del opt
    print(json.dumps(out), flush=True)


def run_child(args, batch, ckpt, limit_gb):
    "Run one configuration in a fresh interpreter; kill it if its RSS passes limit_gb."
    cmd = [sys.executable, __file__, '--child', '--batch', str(batch), '--checkpointing', str(int(ckpt)),
           '--tier', args.tier, '--device', args.device, '--crop', str(args.crop)] + (['--all-stages'] if args.all_stages else [])
    if args.voxel_dims: cmd += ['--voxel-dims', *map(str, args.voxel_dims)]
    if args.xray: cmd += ['--xray', str(args.xray)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, high = False, 0
    while p.poll() is None:
        try: rss = _status_kb('VmRSS', p.pid) * 1024
        except (FileNotFoundError, ProcessLookupError): break
        high = max(high, rss)
        if rss > limit_gb * GB and args.device == 'cpu':
            p.kill(); killed = True; break
        time.sleep(0.1)
    stdout, stderr = p.communicate()
    if killed:
        return dict(batch=batch, checkpointing=ckpt, skipped=True,
                    note=f"stopped at {high / GB:.1f} GB resident: would exceed the {limit_gb:.1f} GB limit of this machine")
    if p.returncode != 0:
        return dict(batch=batch, checkpointing=ckpt, skipped=True, note=f"failed (exit {p.returncode}): {stderr.strip().splitlines()[-1:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--tier', default='full')
    ap.add_argument('--grids', type=int, nargs='+', default=[128, 192, 256], help="stage-3 grids (the seed's voxel_dim)")
    ap.add_argument('--batch', type=int, nargs='+', default=[1, 2])
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--limit-gb', type=float, default=None)
    ap.add_argument('--voxel-dims', type=int, nargs=3, default=None)
    ap.add_argument('--xray', type=int, default=None)
    ap.add_argument('--crop', type=int, default=128, help="stage 3 trains on a crop³ sub-volume (0: the whole grid)")
    ap.add_argument('--all-stages', action='store_true')
    ap.add_argument('--checkpointing', type=int, default=1)
    ap.add_argument('--child', action='store_true')
    ap.add_argument('--out', default=str(RESULTS))
    ap.add_argument('--table-only', action='store_true', help='print the table of the results file again, run nothing')
    ap.add_argument('--note', default='', help='stored with the results (e.g. what else ran on the machine)')
    args = ap.parse_args()
    if args.child:
        args.batch = args.batch[0]
        return step(args)
    if args.table_only:
        rows = json.loads(Path(args.out).read_text())['runs']
        args.grids = sorted({r['voxel_dims'][-1] for r in rows}); args.batch = sorted({r['batch'] for r in rows})
        return report(args, rows)
    from progressive_ct.config import CASCADE_TIERS
    base_dims = CASCADE_TIERS[args.tier].dims
    rows = []
    for grid in sorted(args.grids):
        for batch in args.batch:
            for ckpt in (False, True):
                args.voxel_dims = list(base_dims[:2]) + [grid]
                limit = args.limit_gb or min(20.0, _mem_available() / GB - 2.0)
                smaller = [r for r in rows if r['batch'] == batch and r['checkpointing'] == ckpt and not r.get('skipped')]
                if smaller:
                    ref = smaller[-1]
                    st = ref['stage3']                # the step's memory scales with the voxels, the rest does not
                    predicted = st['peak_gb'] - st['step_peak_gb'] + st['step_peak_gb'] * (grid / ref['voxel_dims'][-1]) ** 3
                    if predicted > limit:
                        rows.append(dict(batch=batch, checkpointing=ckpt, voxel_dims=args.voxel_dims, skipped=True,
                                         predicted_gb=predicted, limit_gb=limit,
                                         predicted_step_gb=st['step_peak_gb'] * (grid / ref['voxel_dims'][-1]) ** 3,
                                         note=f"skipped: predicted {predicted:.1f} GB in all (the {ref['voxel_dims'][-1]}³ step × "
                                              f"{(grid / ref['voxel_dims'][-1]) ** 3:.2f}) exceeds the {limit:.1f} GB this machine can give"))
                        print(f"{grid}³ batch {batch}, checkpointing {'on' if ckpt else 'off'}: {rows[-1]['note']}", flush=True)
                        continue
                print(f"{grid}³ batch {batch}, checkpointing {'on' if ckpt else 'off'}: running (limit {limit:.1f} GB) ...", flush=True)
                r = run_child(args, batch, ckpt, limit)
                r.setdefault('voxel_dims', args.voxel_dims)
                r['limit_gb'] = limit
                rows.append(r)
    report(args, rows)


def report(args, rows):
    "Print the table and write the results."
    print(f"\nstage-3 training step, {args.tier} widths, {args.device}: step memory (total peak) and time")
    print(f"{'grid':>5s} {'batch':>5s} | {'no checkpointing':>30s} | {'checkpointing':>30s} | ratio")
    table = []
    for grid in sorted(args.grids):
        for batch in args.batch:
            off, on = [next(r for r in rows if r['batch'] == batch and r['checkpointing'] == c and r['voxel_dims'][-1] == grid)
                       for c in (False, True)]
            cell = lambda r: (f"{r['stage3']['step_peak_gb']:6.2f} GB ({r['stage3']['peak_gb']:5.2f}) {r['stage3']['step_s']:6.1f} s"
                              if not r.get('skipped') else f"> {r['limit_gb']:.1f} GB: skipped")
            if not on.get('skipped') and not off.get('skipped'):
                ratio, text = on['stage3']['step_peak_gb'] / off['stage3']['step_peak_gb'], None
                text = f"{ratio:.2f}"
            elif not on.get('skipped'):
                ratio = on['stage3']['step_peak_gb'] / off['limit_gb']
                text = f"<{ratio:.2f}, ~{on['stage3']['step_peak_gb'] / off['predicted_step_gb']:.2f} predicted"
            else: ratio, text = None, '-'
            print(f"{grid:>4d}³ {batch:>5d} | {cell(off):>30s} | {cell(on):>30s} | {text}")
            table.append(dict(grid=grid, batch=batch, ratio_checkpointing_vs_not=ratio,
                              ratio_is_upper_bound=bool(off.get('skipped')) and not on.get('skipped'),
                              ratio_vs_predicted=(on['stage3']['step_peak_gb'] / off['predicted_step_gb']
                                                  if off.get('skipped') and not on.get('skipped') else None),
                              checkpointing_step_gb=None if on.get('skipped') else on['stage3']['step_peak_gb'],
                              checkpointing_peak_gb=None if on.get('skipped') else on['stage3']['peak_gb']))
    for r in rows:
        if r.get('note'): print(f"  note: {r['voxel_dims'][-1]}³ batch {r['batch']} checkpointing {r['checkpointing']}: {r['note']}")
        for k in (1, 2):
            if f'stage{k}' in r: print(f"  batch {r['batch']}: stage {k} forward + backward {r[f'stage{k}']['step_s']:.1f} s, "
                                       f"step memory {r[f'stage{k}']['step_peak_gb']:.2f} GB")
    result = dict(benchmark='stage-3 training step memory', machine=platform.processor() or platform.machine(),
                  cpu_threads=torch.get_num_threads(), torch=torch.__version__, device=args.device,
                  measured=('CPU: step_peak_gb = peak RSS of the step (VmHWM after clear_refs) minus RSS before it; '
                            'peak_gb = total peak RSS of the process' if args.device == 'cpu'
                            else 'CUDA: max_memory_allocated over the step minus allocated before; peak_gb = max allocated'),
                  goals=dict(checkpointing_ratio_max=0.5, batch2_checkpointing_max_gb=20.0, at_grid=256),
                  load_average=os.getloadavg(), note=args.note, runs=rows, table=table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + '\n')
    print(f"wrote {args.out}")


if __name__ == '__main__':
    main()
