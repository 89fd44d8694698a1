"""SSIM3D's separable Gaussian: banded matrix products (the kit's `SSIM3D._filter`) against the grouped `conv3d` they
replaced, on the CPU, in float64 (the metrics: `ssim3d` works in float64) and float32 with the backward pass (the loss).

    python benchmarks/ssim.py [--size 64] [--batch 4] [--repeats 5]

Both filter the five maps SSIM needs (x, y, x², y², xy) of `--batch` volumes of `--size`³, valid part only, and must agree
to rounding (the largest difference is printed). Then the whole `ssim3d` of a batch, as the quickstart's evaluation
and every validation call it. Time: median of `--repeats` calls after one warm-up. Writes benchmarks/results/ssim.json.
"""
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def grouped_conv(x, w):
    "The filter as it was: three depthwise 1D convolutions, one per axis."
    C, k = x.shape[1], w.numel()
    for shape in ((k, 1, 1), (1, k, 1), (1, 1, k)):
        x = F.conv3d(x, w.view(1, 1, *shape).expand(C, 1, *shape), groups=C)
    return x


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results' / 'ssim.json')
    args = p.parse_args()
    from progressive_ct.losses import SSIM3D
    from progressive_ct.metrics import ssim3d
    torch.manual_seed(0)
    shape = (args.batch, 5, args.size, args.size, args.size)
    rows = []
    for dtype, backward in ((torch.float64, False), (torch.float32, False), (torch.float32, True)):
        s = SSIM3D().to(dtype)
        w = s.window
        x = torch.rand(*shape, dtype=dtype, requires_grad=backward)
        def run(f):
            def go():
                y = f(x)
                if backward: y.sum().backward()
            return go
        old, new = median_time(run(lambda v: grouped_conv(v, w)), args.repeats), median_time(run(s._filter), args.repeats)
        with torch.no_grad(): diff = float((grouped_conv(x, w) - s._filter(x)).abs().max())
        rows.append({'what': 'filter', 'dtype': str(dtype).replace('torch.', ''), 'backward': backward, 'grouped_conv3d_s': round(old, 4),
                     'banded_matmul_s': round(new, 4), 'speedup': round(old / new, 2), 'max_abs_difference': diff})
    a, b = torch.rand(args.batch, 1, args.size, args.size, args.size), torch.rand(args.batch, 1, args.size, args.size, args.size)
    rows.append({'what': 'ssim3d (float64, banded)', 'seconds': round(median_time(lambda: ssim3d(a, b), args.repeats), 4)})
    result = {'benchmark': 'SSIM3D separable Gaussian filter: banded matrix products vs grouped conv3d', 'shape': list(shape),
              'command': 'python benchmarks/ssim.py', 'machine': platform.processor() or platform.machine(),
              'threads': torch.get_num_threads(), 'torch': torch.__version__, 'rows': rows}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"five maps of {args.batch} volumes of {args.size}³, median of {args.repeats}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for r in rows:
        if r['what'] == 'filter':
            print(f"  filter {r['dtype']:8s} {'fwd+bwd' if r['backward'] else 'fwd    '}  grouped conv3d {r['grouped_conv3d_s']:.4f} s  "
                  f"banded matmul {r['banded_matmul_s']:.4f} s  ×{r['speedup']:.2f}  max |diff| {r['max_abs_difference']:.1e}")
        else:
            print(f"  {r['what']}: {r['seconds']:.4f} s for {args.batch} pairs")
    print(f"wrote {args.out}")


if __name__ == '__main__':
    main()
