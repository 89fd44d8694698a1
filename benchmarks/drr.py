"""Speed and memory of `render_drr`: AP + lateral of a 256³ volume onto two 512² detectors.

    python benchmarks/drr.py [--size 256] [--detector 512] [--runs 7] [--device cpu|cuda]
    python benchmarks/drr.py --whole-process [--ct CT.nii.gz] [--runs 3]

Parallel and cone beam (x2ct preset, detector fitted to the volume), forward and forward + backward, median of
`--runs` timed runs after one warm-up, and peak memory (CUDA: max allocated; CPU: peak resident set of this
process, which includes the ~1 GB baseline of torch itself). Writes benchmarks/results/drr.json.
Goals on a 2-core CPU: cone forward < 1 s, parallel forward < 0.2 s.

`--whole-process`: the `progressive-ct drr` command as a user runs it, on a chest CT of a clinical grid (by default a
chest phantom resampled to 133 x 512 x 512 voxels of 2.5 x 0.703 x 0.703 mm, written as int16 NIfTI; `--ct` for a real
one), both views at 512² in the x2ct cone beam: the wall time of the whole process (start-up, imports, reading, HU to
attenuation, rendering, writing), median of `--runs`, beside the rendering alone in a warm process and the import of
torch alone, so the note can say where the time goes. Updates the `whole_process` entry of drr.json.
"""
import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
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


def clinical_chest_ct(path):
    "A chest phantom on a clinical CT grid: 133 slices of 2.5 mm, 512 x 512 pixels of 0.703 mm, int16 NIfTI."
    import nibabel as nib
    import numpy as np
    import torch.nn.functional as F
    from progressive_ct.phantoms import chest_phantom
    from progressive_ct.volumes import ipl_affine
    ph = chest_phantom(seed=0, size=256, fov_mm=360.0)[None, None]
    hu = F.interpolate(ph, size=(133, 512, 512), mode='trilinear', align_corners=False)[0, 0].numpy().astype(np.int16)
    nib.save(nib.Nifti1Image(hu, ipl_affine(hu.shape, (2.5, 360 / 512, 360 / 512))), str(path))
    return path


def whole_process(args):
    "`progressive-ct drr` end to end, beside its rendering alone and the import of torch alone."
    from progressive_ct.cli import drr_geometry
    from progressive_ct.drr import render_drr
    from progressive_ct.geometry import hu_to_mu
    from progressive_ct.volumes import load_nifti
    work = Path(tempfile.mkdtemp())
    ct = args.ct or clinical_chest_ct(work / 'chest.nii.gz')
    exe = Path(sys.executable).with_name('progressive-ct')
    cmd = ([str(exe)] if exe.exists() else [sys.executable, '-m', 'progressive_ct.cli']) + [
        'drr', '--ct', str(ct), '--out', str(work / 'out'), '--detector', str(args.detector)]
    def wall(c):
        t0 = time.perf_counter()
        subprocess.run(c, check=True, capture_output=True)
        return time.perf_counter() - t0
    wall(cmd)                                                       # page cache warm, as on a second run
    walls = [wall(cmd) for _ in range(args.runs)]
    imports = [wall([sys.executable, '-c', 'import torch']) for _ in range(args.runs)]
    vol = load_nifti(ct)
    g = drr_geometry(vol, 'x2ct', args.detector, None, ('ap', 'lateral'))
    mu = hu_to_mu(torch.from_numpy(vol.hu))[None, None]
    with torch.no_grad(): render, _ = timed(lambda: render_drr(mu, vol.spacing, g), args.runs, 'cpu')
    whole, torch_import = statistics.median(walls), statistics.median(imports)
    row = {'ct': str(args.ct) if args.ct else 'chest phantom on a clinical grid', 'shape': list(vol.shape), 'spacing_mm': list(vol.spacing),
           'views': ['ap', 'lateral'], 'detector': args.detector, 'geometry': 'x2ct', 'runs': args.runs,
           'whole_process_s': round(whole, 3), 'runs_s': [round(w, 3) for w in walls], 'render_s': round(render, 3),
           'python_import_torch_s': round(torch_import, 3), 'whole_over_render': round(whole / render, 2),
           'threads': torch.get_num_threads(), 'cpu': platform.processor() or platform.machine(), 'torch': torch.__version__}
    print(f"progressive-ct drr, {tuple(vol.shape)} at {tuple(round(s, 3) for s in vol.spacing)} mm, AP + lateral at {args.detector}², x2ct: "
          f"whole process {whole:.2f} s (runs {', '.join(f'{w:.2f}' for w in walls)}); rendering alone {render:.2f} s; "
          f"python -c 'import torch' alone {torch_import:.2f} s; whole / render {whole / render:.1f}x")
    out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    out['whole_process'] = row
    args.out.write_text(json.dumps(out, indent=2))
    shutil.rmtree(work)
    print(f'wrote {args.out}')


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--size', type=int, default=256)
    ap.add_argument('--detector', type=int, default=512)
    ap.add_argument('--runs', type=int, default=7)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--out', type=Path, default=Path(__file__).parent / 'results' / 'drr.json')
    ap.add_argument('--whole-process', action='store_true', help='time the progressive-ct drr command end to end (see above)')
    ap.add_argument('--ct', type=Path, help='with --whole-process: a real CT (NIfTI) instead of the phantom on a clinical grid')
    args = ap.parse_args()
    if args.whole_process: return whole_process(args)
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
    if args.out.is_file() and 'whole_process' in json.loads(args.out.read_text()):
        result['whole_process'] = json.loads(args.out.read_text())['whole_process']      # measured by --whole-process
    args.out.write_text(json.dumps(result, indent=2))
    print(f"volume {volume_mb:.0f} MB float32; two views read it at least twice: "
          + ', '.join(f"{r['beam']} {r['volume_reads_per_s']} GB/s" for r in rows if r['mode'] == 'forward'))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
