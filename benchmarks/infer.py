"""Inference speed per volume: the full cascade (encoder + stages 1-3) through `progressive_ct.inference.reconstruct`,
with the per-stage split, the DRR reprojection of the stage-3 volume and the NIfTI write that `progressive-ct infer`
also does per patient, at the quickstart (16³→32³→64³ from 128² radiographs) and full (64³→128³→256³ from 512²) tiers.

    python benchmarks/infer.py [--tiers quickstart full] [--devices cpu [cuda]] [--repeats N] [--warmup 1] [--threads N]

- Models are `ProgressiveCascadeModel.from_tier(tier)` with random weights (seed 0): the cost of a forward pass does not
  depend on the weight values (the same convolutions, attention and sampling run whatever the numbers are), so no
  checkpoint is needed. Batch 1, one random radiograph pair on the network's scale.
- CPU: float32. CUDA (run by default when `torch.cuda.is_available()`): bf16 autocast around `reconstruct`
  (`--cuda-precision fp32` to turn it off), `torch.cuda.synchronize()` before every clock read.
- Each (tier, device) runs in a fresh process, so its peak memory is its own: CPU, the peak resident set (VmHWM) during
  the timed `reconstruct` calls, reset after model build and warm-up through /proc/self/clear_refs (falling back to the
  process's ru_maxrss where that is refused), which includes torch's own few hundred MB; CUDA, torch.cuda.max_memory_allocated
  over the timed calls.
- Time per volume: median of `--repeats` timed calls after `--warmup` untimed ones (default repeats: 10 at quickstart,
  3 at full, whose stage 3 alone takes about a minute on a 2-core CPU). The split comes from forward hooks on the encoder
  parts and stage modules in those same calls (stage k = its encoder part + its stage module, as `stage_modules(k)`);
  "other" is the rest of `reconstruct` (input checks, clamp, copy to the CPU).
- Reprojection: `reproject(model, volume)`, both views, on the CPU volume that `reconstruct` returns (as `infer` does);
  on CUDA also with the volume on the GPU. NIfTI: `save_nifti` of the volume in HU as int16 .nii.gz, as `infer
  --save-nifti` writes it. Both use a chest phantom at the stage-3 grid instead of the model's output: a random-weight
  cascade outputs a constant volume (its heads start at zero), which gzip would compress unrealistically fast; the DRR
  cost does not depend on the content.
- The load average before and after is recorded: on a shared machine other jobs slow the CPU numbers down, and
  torch's threads then wait for each other (`--threads 1` gives the fairer number when the cores are busy).
Writes benchmarks/results/infer.json.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPEATS = {'quickstart': 10, 'full': 3}


def _status_mb(field):
    try:
        for line in open('/proc/self/status'):
            if line.startswith(field + ':'): return int(line.split()[1]) / 1024
    except OSError: pass
    return None


def _reset_peak_rss():
    "Reset VmHWM to the current RSS (Linux); False where the kernel refuses."
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')
        return True
    except OSError: return False


def _cpu_name():
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


class StageClock:
    "Forward hooks that add up the time spent in the encoder parts and stage modules of one `reconstruct` call."
    def __init__(self, model, sync):
        self.sync, self.seconds, self.handles, self.t0 = sync, {}, [], {}
        parts = {'encoder1': model.encoder.trunk, 'encoder2': model.encoder.heads[0], 'encoder3': model.encoder.heads[1],
                 'stage1': model.stage1, 'stage2': model.stage2, 'stage3': model.stage3}
        for name, m in parts.items():
            self.handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: self._start(name)))
            self.handles.append(m.register_forward_hook(lambda mod, args, out, name=name: self._stop(name)))

    def _start(self, name):
        self.sync(); self.t0[name] = time.perf_counter()

    def _stop(self, name):
        self.sync(); self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self.t0.pop(name)

    def take(self):
        s, self.seconds = self.seconds, {}
        return s

    def remove(self):
        for h in self.handles: h.remove()


def timed_runs(fn, warmup, repeats, sync):
    for _ in range(warmup): fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def summary(times):
    return {'median_s': round(statistics.median(times), 4), 'min_s': round(min(times), 4), 'max_s': round(max(times), 4),
            'runs_s': [round(t, 4) for t in times]}


def child(tier, device, precision, warmup, repeats, threads=0):
    "One tier on one device, in this process: prints one JSON line."
    if threads: torch.set_num_threads(threads)
    import numpy as np
    from progressive_ct.cascade import ProgressiveCascadeModel
    from progressive_ct.geometry import hu_to_unit, unit_to_hu
    from progressive_ct.inference import reconstruct, reproject
    from progressive_ct.phantoms import chest_phantom
    from progressive_ct.volumes import save_nifti
    torch.manual_seed(0)
    cuda = device.startswith('cuda')
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    model = ProgressiveCascadeModel.from_tier(tier).to(device).eval()      # random weights: same cost as trained ones
    build_s = time.perf_counter() - t0
    rows = model.summary(show=False)                                       # parameters and FLOPs per stage (meta device)
    S, dims = model.encoder.xray_img_size, list(model.voxel_dims)
    xray = 0.5 * torch.rand(1, len(model.geometry.views), 1, S, S)          # one patient, on the network's scale
    autocast = cuda and precision == 'bf16'

    def run():
        if autocast:
            with torch.autocast('cuda', dtype=torch.bfloat16): return reconstruct(model, xray, upto=3)
        return reconstruct(model, xray, upto=3)

    for _ in range(warmup): out = run()                                    # lazily built grids, allocator, kernels
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        mem_before = torch.cuda.memory_allocated() / 2**20
    else:
        reset = _reset_peak_rss()
        mem_before = _status_mb('VmRSS')
    clock = StageClock(model, sync)
    times, splits = [], []
    for _ in range(repeats):
        sync(); t0 = time.perf_counter()
        out = run()
        sync(); times.append(time.perf_counter() - t0)
        splits.append(clock.take())
    clock.remove()
    if cuda:
        peak, peak_kind = torch.cuda.max_memory_allocated() / 2**20, 'cuda max allocated during reconstruct'
    elif reset and _status_mb('VmHWM') is not None:
        peak, peak_kind = _status_mb('VmHWM'), 'process peak RSS during reconstruct (VmHWM reset after warm-up)'
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'process peak RSS (ru_maxrss, whole run)'
    assert [tuple(v.shape[-3:]) for v in out] == [(n,) * 3 for n in dims] and all(v.device.type == 'cpu' for v in out)

    med = statistics.median(times)
    split = {}
    for k in (1, 2, 3):
        enc = statistics.median(s.get(f'encoder{k}', 0.0) for s in splits)
        stg = statistics.median(s.get(f'stage{k}', 0.0) for s in splits)
        split[f'stage{k}'] = {'grid': dims[k - 1], 'encoder_s': round(enc, 4), 'stage_s': round(stg, 4), 'total_s': round(enc + stg, 4),
                              'gflops': round(rows[k - 1]['gflops'], 2),
                              'params': rows[k - 1]['params'] + rows[k - 1]['encoder_params']}
    split['other_s'] = round(statistics.median(t - sum(s.values()) for t, s in zip(times, splits)), 4)

    # what `infer` does next with the volume: reproject it (for the figure) and write it as NIfTI
    n = dims[-1]
    hu = chest_phantom(0, n, model.fov_mm)                                 # CT-like content (see the docstring)
    vol = hu_to_unit(hu).clamp(0, 1)[None, None].float()
    re_times = timed_runs(lambda: reproject(model, vol), 1, repeats, sync)
    drr_shape = list(reproject(model, vol).shape)
    reproject_res = {'on': 'cpu volume (as infer)', 'shape': drr_shape, **summary(re_times)}
    if cuda:
        vg = vol.to(device)
        reproject_res['gpu_volume'] = summary(timed_runs(lambda: reproject(model, vg), 1, repeats, sync))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'stage3.nii.gz'
        write = lambda: save_nifti(unit_to_hu(vol[0, 0]).numpy(), (model.fov_mm / n,) * 3, path, dtype=np.int16)
        nifti_times = timed_runs(write, 1, repeats, lambda: None)
        nifti_mb = path.stat().st_size / 2**20

    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({
        'tier': tier, 'device': device, 'device_name': torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        'precision': 'bf16 autocast' if autocast else 'float32', 'threads': torch.get_num_threads(),
        'xray': S, 'voxel_dims': dims, 'batch': 1, 'warmup': warmup, 'repeats': repeats,
        'parameters': params, 'model_build_s': round(build_s, 3),
        'reconstruct': {**summary(times), 'volumes_per_s': round(1 / med, 4)}, 'split_median': split,
        'reproject_stage3': reproject_res,
        'nifti_stage3': {'dtype': 'int16', 'file_mb': round(nifti_mb, 2), **summary(nifti_times)},
        'per_patient_s': round(med + statistics.median(re_times) + statistics.median(nifti_times), 4),
        'memory_before_mb': round(mem_before, 1) if mem_before is not None else None,
        'peak_memory_mb': round(peak, 1), 'peak_memory_kind': peak_kind,
        'process_peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def table(rows):
    lines = [f"{'tier':10s} {'device':18s} {'grid':>15s} {'xray':>5s} {'params':>10s} {'s/volume':>9s} {'(min-max)':>17s} "
             f"{'st1':>7s} {'st2':>7s} {'st3':>7s} {'other':>6s} {'DRR':>7s} {'NIfTI':>6s} {'peak MB':>8s}"]
    for r in rows:
        rc, sp = r['reconstruct'], r['split_median']
        dev = r['device'] + (' bf16' if r['precision'].startswith('bf16') else ' fp32')
        lines.append(f"{r['tier']:10s} {dev:18s} {'→'.join(str(d) for d in r['voxel_dims']) + '³':>15s} {r['xray']:>5d} "
                     f"{r['parameters']:>10,d} {rc['median_s']:>9.3f} {'(' + format(rc['min_s'], '.3f') + '-' + format(rc['max_s'], '.3f') + ')':>17s} "
                     f"{sp['stage1']['total_s']:>7.3f} {sp['stage2']['total_s']:>7.3f} {sp['stage3']['total_s']:>7.3f} {sp['other_s']:>6.3f} "
                     f"{r['reproject_stage3']['median_s']:>7.3f} {r['nifti_stage3']['median_s']:>6.3f} {r['peak_memory_mb']:>8.0f}")
    return '\n'.join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--tiers', nargs='+', default=['quickstart', 'full'], choices=['quickstart', 'full', 'test'])
    ap.add_argument('--devices', nargs='+', default=['cpu'] + (['cuda'] if torch.cuda.is_available() else []))
    ap.add_argument('--cuda-precision', choices=['bf16', 'fp32'], default='bf16')
    ap.add_argument('--repeats', type=int, help='timed calls per tier (default: 10 quickstart, 3 full)')
    ap.add_argument('--warmup', type=int, default=1)
    ap.add_argument('--threads', type=int, default=0, help="torch CPU threads (default 0: torch's default, all cores)")
    ap.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results' / 'infer.json')
    ap.add_argument('--child', nargs=2, metavar=('TIER', 'DEVICE'), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        tier, device = args.child
        return child(tier, device, args.cuda_precision, args.warmup, args.repeats or DEFAULT_REPEATS.get(tier, 5),
                     args.threads)
    if any(d.startswith('cuda') for d in args.devices) and not torch.cuda.is_available():
        raise SystemExit('--devices cuda: CUDA is not available here')
    load_before, t_start = os.getloadavg(), time.perf_counter()
    rows = []
    for tier in args.tiers:
        for device in args.devices:
            cmd = [sys.executable, __file__, '--child', tier, device, '--cuda-precision', args.cuda_precision, '--warmup', str(args.warmup),
                   '--threads', str(args.threads)]
            if args.repeats: cmd += ['--repeats', str(args.repeats)]
            la = os.getloadavg()
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr[-3000:]); raise SystemExit(f'{tier} on {device} failed')
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row['load_average_at_start'] = [round(x, 2) for x in la]
            rows.append(row)
            sp = row['split_median']
            print(f"{tier} on {device} ({row['precision']}): {row['reconstruct']['median_s']:.3f} s/volume "
                  f"(stage 1 {sp['stage1']['total_s']:.3f}, 2 {sp['stage2']['total_s']:.3f}, 3 {sp['stage3']['total_s']:.3f} s), "
                  f"reproject {row['reproject_stage3']['median_s']:.3f} s, NIfTI {row['nifti_stage3']['median_s']:.3f} s, "
                  f"peak {row['peak_memory_mb']:.0f} MB; load average {la[0]:.2f}", flush=True)
    load_after = os.getloadavg()
    result = {
        'benchmark': 'inference seconds per volume: reconstruct (encoder + stages 1-3), reproject, NIfTI',
        'weights': 'random (seed 0): inference cost does not depend on the weight values',
        'batch': 1, 'torch': torch.__version__, 'cuda_available': torch.cuda.is_available(),
        'cpu': _cpu_name(), 'machine': platform.machine(), 'cpu_count': os.cpu_count(),
        'threads': args.threads or torch.get_num_threads(),
        'load_average_before': [round(x, 2) for x in load_before], 'load_average_after': [round(x, 2) for x in load_after],
        'wall_s': round(time.perf_counter() - t_start, 1),
        'notes': ['times are medians of the timed calls after warm-up; split from forward hooks in the same calls '
                  '(stage k = its encoder part + its stage module; other = input checks, clamp, copy to the CPU)',
                  'reproject and NIfTI use a chest phantom at the stage-3 grid (a random-weight cascade outputs a constant volume)',
                  'per_patient_s = reconstruct + reproject of stage 3 + NIfTI of stage 3 (infer also reprojects stages 1-2 for its figure '
                  'and writes PNGs and the figure)',
                  'CPU timings on a shared machine: see the load averages; memory is unaffected by the load'],
        'results': rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(rows))
    print(f"load average before {', '.join(f'{x:.2f}' for x in load_before)}; after {', '.join(f'{x:.2f}' for x in load_after)}")
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
