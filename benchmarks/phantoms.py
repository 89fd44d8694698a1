"""Time to build one chest phantom (`chest_phantom`) at 128³ and 256³.

    python benchmarks/phantoms.py [--sizes 128 256] [--runs 5] [--threads 0 1]

For each torch thread count (0: torch's default, all cores) and size: one warm-up build, then `--runs` timed builds of
different patients (seeds 0, 1, ...), reporting the median and every run, and the machine's load average when the
runs started; and the process's peak resident memory. The generator is CPU-only. On a shared machine other
processes slow torch's multi-threaded kernels badly (threads wait for each other), which is why one thread is timed
too: it is the fair number when the cores are busy. Writes benchmarks/results/phantoms.json.
Goal on this project's 2-core CPU: under 2 s per 256³ phantom.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from progressive_ct.phantoms import chest_phantom

GOAL_S = {256: 2.0}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sizes', type=int, nargs='+', default=[128, 256])
    ap.add_argument('--runs', type=int, default=5)
    ap.add_argument('--threads', type=int, nargs='+', default=[0, 1], help="torch thread counts to time (0: torch's default)")
    ap.add_argument('--out', type=Path, default=Path(__file__).parent / 'results' / 'phantoms.json')
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        for n in args.sizes:
            chest_phantom(seed=1000, size=n)                               # warm-up (allocator, thread pool)
            load = os.getloadavg()[0]
            times = []
            for seed in range(args.runs):
                t0 = time.perf_counter()
                vol = chest_phantom(seed=seed, size=n)
                times.append(time.perf_counter() - t0)
                assert vol.shape == (n, n, n)
            med = statistics.median(times)
            row = {'size': n, 'threads': torch.get_num_threads(), 'median_s': round(med, 3), 'runs_s': [round(t, 3) for t in times],
                   'voxels_per_s': round(n**3 / med), 'load_average_1min': round(load, 2)}
            if n in GOAL_S: row.update(goal_s=GOAL_S[n], goal_met=med < GOAL_S[n])
            rows.append(row)
            print(f"{n}³, {torch.get_num_threads()} thread(s): median {med:6.3f} s per phantom  "
                  f"(runs {', '.join(f'{t:.3f}' for t in times)}; load {load:.1f})"
                  + (f"  goal < {GOAL_S[n]} s: {'met' if med < GOAL_S[n] else 'NOT met'}" if n in GOAL_S else ''))
    result = {'benchmark': 'chest_phantom build time', 'fov_mm': 400.0, 'torch': torch.__version__,
              'default_threads': default_threads, 'cpus': os.cpu_count(), 'cpu': platform.processor() or platform.machine(),
              'peak_memory_mb': round(peak_rss_mb(), 1), 'peak_memory_kind': 'process peak RSS', 'results': rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"peak RSS {peak_rss_mb():.0f} MB; wrote {args.out}")


if __name__ == '__main__':
    main()
