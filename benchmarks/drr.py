"""Speed and memory of `render_drr`: AP + lateral of a 256³ volume onto two 512² detectors.

    python benchmarks/drr.py [--size 256] [--detector 512] [--runs 7] [--device cpu|cuda]

Parallel and cone beam (x2ct preset, detector fitted to the volume), forward and forward + backward, median of
`--runs` timed runs after one warm-up, and peak memory (CUDA: max allocated; CPU: peak resident set of this
process, which includes the ~1 GB baseline of torch itself). Writes benchmarks/results/drr.json.
Goals on a 2-core CPU: cone forward < 1 s, parallel forward < 0.2 s.
"""
import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from progressive_ct.drr import render_drr
from progressive_ct.geometry import geometry_preset

GOALS_S = {'parallel': 0.2, 'cone': 1.0}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, runs, device):
    fn()                                                  # warm-up (allocator, kernels, thread pool)
    if device == 'cuda': torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        if device == 'cuda': torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--size', type=int, default=256)
    ap.add_argument('--detector', type=int, default=512)
    ap.add_argument('--runs', type=int, default=7)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--out', type=Path, default=Path(__file__).parent / 'results' / 'drr.json')
    args = ap.parse_args()
    n, dev = args.size, args.device
    spacing = 384.0 / n                                  # a 384 mm field of view
    torch.manual_seed(0)
    vol = (torch.rand(1, 1, n, n, n, device=dev) * 0.03).contiguous()
    volume_mb = vol.numel() * vol.element_size() / 2**20
    rows = []
    for kind, preset in [('parallel', 'parallel'), ('cone', 'x2ct')]:
        g = geometry_preset(preset, detector=args.detector).fit_to_volume((n,) * 3, spacing)
        for mode in ('forward', 'forward+backward'):
            x = vol.clone().requires_grad_(mode != 'forward')
            def step():
                if mode == 'forward':
                    with torch.no_grad(): return render_drr(x, spacing, g)
                x.grad = None
                render_drr(x, spacing, g).sum().backward()
            if dev == 'cuda': torch.cuda.reset_peak_memory_stats()
            med, times = timed(step, args.runs, dev)
            peak = torch.cuda.max_memory_allocated() / 2**20 if dev == 'cuda' else peak_rss_mb()
            row = {'beam': kind, 'mode': mode, 'median_s': round(med, 4), 'runs_s': [round(t, 4) for t in times],
                   'peak_memory_mb': round(peak, 1), 'peak_memory_kind': 'cuda max allocated' if dev == 'cuda' else 'process peak RSS'}
            if mode == 'forward':
                row['goal_s'] = GOALS_S[kind]
                row['goal_met'] = med < GOALS_S[kind]
            rows.append(row)
            print(f"{kind:8s} {mode:17s} median {med:7.3f} s  (runs {', '.join(f'{t:.3f}' for t in times)})  peak {peak:8.1f} MB"
                  + (f"  goal < {GOALS_S[kind]} s: {'met' if med < GOALS_S[kind] else 'NOT met'}" if mode == 'forward' else ''))
    # what bounds it: bytes the projector must read at least (the volume once per view) against the time taken
    for r in rows:
        if r['mode'] == 'forward':
            r['volume_reads_per_s'] = round(2 * volume_mb / 1024 / r['median_s'], 2)
    result = {'benchmark': 'render_drr AP + lateral', 'volume': [n] * 3, 'volume_mb': round(volume_mb, 1),
              'detector': [args.detector] * 2, 'device': dev, 'torch': torch.__version__, 'threads': torch.get_num_threads(),
              'cpu': platform.processor() or platform.machine(), 'results': rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"volume {volume_mb:.0f} MB float32; two views read it at least twice: "
          + ', '.join(f"{r['beam']} {r['volume_reads_per_s']} GB/s" for r in rows if r['mode'] == 'forward'))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
