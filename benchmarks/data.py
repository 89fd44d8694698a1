"""Speed of the data pipeline: `prepare` time per patient, and samples/s loaded from disk.

    python benchmarks/data.py [--patients 16] [--workers 2] [--sizes 128 256] [--epochs 3] [--skip-nifti]
    python benchmarks/data.py --stage-rates configs/quickstart.json configs/config_progressive.json   # section 4 only

1. prepare: built-in phantoms at each size N (radiographs 2N x 2N, as the seed's tiers), `--patients` of them with
   `--workers` processes: wall time per patient, and the mean time one patient takes in a worker (phantom generation,
   int16 rounding, two DRRs, writing). Then the real-CT path: NIfTI files of 300 x 512 x 512 int16 voxels
   (1.25 x 0.78 x 0.78 mm, a phantom resampled to a typical chest CT grid) ingested to 256³ (read, resample, render).
2. loading: samples/s through `make_loader(..., num_workers=2, batch_size=1)` over the train split, for each stored
   size, at the full resolution and at the stage resolutions N/2 and N/4 (area downsampling on load). The first epoch
   reads from disk (the dataset's files are dropped from the page cache with posix_fadvise(DONTNEED) first); the
   later epochs are from the page cache.
3. storage at 128³: ms per sample in one process for the column encodings the issue compared: binary int16 HU (what
   `prepare` stores), binary float16, and datasets' `Array3D` float16 read with the numpy and the torch formats.

4. stage rates (`--stage-rates CONFIG ...`): for each stage of a config, on phantoms built at its data settings, the
   trainer's loader (`stage_loader`: its batch size, `data.num_workers` workers, the stage grids stored by `cache_grids`)
   in samples/s from the page cache, beside the same loader pooling the stored grid per sample (no stored grids), and
   beside that stage's training step in samples/s on this machine (`measure_step`: forward, loss, backward, AdamW).
   The loader must run at least 5x the step. Both are measured alone: in training they share the cores.

Writes benchmarks/results/data.json (section 4 alone updates its `stage_rates` and keeps the rest). Run by hand, never in CI.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import datasets
from progressive_ct.dataset import CTDataset, make_loader, prepare, stored_ct_to_unit
from progressive_ct.geometry import hu_to_unit
from progressive_ct.phantoms import chest_phantom
from progressive_ct.volumes import save_nifti


def evict(folder: Path):
    "Drop a folder's files from the page cache (so the next read comes from disk)."
    for f in folder.rglob('*'):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally: os.close(fd)


def bench_prepare(root: Path, n: int, patients: int, workers: int) -> dict:
    cfg = {'resolution': n, 'xray_size': 2 * n, 'train_split': 1.0, 'val_split': 0.0, 'test_split': 0.0, 'num_workers': workers}
    out = root / f'phantoms_{n}'
    t0 = time.perf_counter()
    s = prepare('phantoms', out, num_patients=patients, config=cfg, progress=False, log=lambda *a: None)
    wall = time.perf_counter() - t0
    size_mb = sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20
    row = {'source': 'phantoms', 'resolution': n, 'xray_size': 2 * n, 'patients': patients, 'workers': workers,
           'wall_s': round(wall, 2), 'wall_s_per_patient': round(wall / patients, 3),
           'worker_s_per_patient': s['seconds_per_patient'], 'dataset_mb': round(size_mb, 1)}
    print(f"prepare phantoms {n}³ / {2 * n}²: {patients} patients, {workers} workers: {wall:.1f} s, {wall / patients:.2f} s per patient "
          f"(one patient in a worker: {s['seconds_per_patient']:.2f} s); {size_mb:.0f} MB")
    return row


def bench_prepare_nifti(root: Path, patients: int, workers: int) -> dict:
    src = root / 'nifti_src'
    shape, sp = (300, 512, 512), (1.25, 400 / 512, 400 / 512)
    for k in range(patients):
        ph = chest_phantom(seed=100 + k, size=256, fov_mm=400.0)
        ct = F.interpolate(ph[None, None], size=shape, mode='trilinear', align_corners=False)[0, 0]
        save_nifti(ct, sp, src / f'ct_{k}.nii.gz', dtype=np.int16)
    cfg = {'resolution': 256, 'xray_size': 512, 'train_split': 1.0, 'val_split': 0.0, 'test_split': 0.0, 'num_workers': workers}
    t0 = time.perf_counter()
    s = prepare('nifti', root / 'nifti_256', input_dir=src, config=cfg, progress=False, log=lambda *a: None)
    wall = time.perf_counter() - t0
    print(f"prepare NIfTI 300x512x512 int16 -> 256³ / 512²: {patients} patients, {workers} workers: {wall:.1f} s, "
          f"{wall / patients:.2f} s per patient (one patient in a worker: {s['seconds_per_patient']:.2f} s)")
    return {'source': 'nifti 300x512x512 int16 (1.25 x 0.78 x 0.78 mm)', 'resolution': 256, 'xray_size': 512, 'patients': patients,
            'workers': workers, 'wall_s': round(wall, 2), 'wall_s_per_patient': round(wall / patients, 3),
            'worker_s_per_patient': s['seconds_per_patient']}


def bench_loading(folder: Path, n: int, epochs: int, workers: int = 2) -> list:
    rows = []
    for res in (n, n // 2, n // 4):
        loader = make_loader(folder, 'train', resolution=res, batch_size=1, num_workers=workers, shuffle=False)
        evict(folder)
        rates = []
        for e in range(epochs):
            t0 = time.perf_counter(); count = 0
            for batch in loader: count += batch['ct'].shape[0]
            rates.append(count / (time.perf_counter() - t0))
        del loader
        row = {'stored': n, 'resolution': res, 'workers': workers, 'batch_size': 1, 'samples': count,
               'first_epoch_from_disk_samples_per_s': round(rates[0], 2),
               'cached_samples_per_s': round(statistics.median(rates[1:]), 2) if len(rates) > 1 else None}
        rows.append(row)
        print(f"load {n}³ stored -> {res}³, {workers} workers: first epoch (disk) {rates[0]:.1f} samples/s, "
              f"page cache {row['cached_samples_per_s']} samples/s")
    return rows


def bench_storage(root: Path, n: int = 128, rows: int = 8, reps: int = 3) -> list:
    from datasets import Array3D, Dataset, Features, Sequence, Value
    rng = np.random.default_rng(0)
    vols = [chest_phantom(seed=k, size=n, fov_mm=400.0).numpy() for k in range(2)]
    hu = [np.clip(np.round(vols[k % 2] + rng.normal(0, 5, vols[0].shape)), -1024, 3071).astype(np.int16) for k in range(rows)]
    unit16 = [hu_to_unit(h.astype(np.float32)).astype(np.float16) for h in hu]
    binary = Features({'ct': Value('binary'), 'ct_shape': Sequence(Value('int32')), 'ct_dtype': Value('string')})
    variants = {
        'binary int16 HU (prepare)': (binary, lambda: ({'ct': h.tobytes(), 'ct_shape': list(h.shape), 'ct_dtype': 'int16'} for h in hu)),
        'binary float16 unit': (binary, lambda: ({'ct': u.tobytes(), 'ct_shape': list(u.shape), 'ct_dtype': 'float16'} for u in unit16)),
        'Array3D float16 unit': (Features({'ct': Array3D((n, n, n), 'float16')}), lambda: ({'ct': u} for u in unit16)),
    }
    out = []
    for name, (features, gen) in variants.items():
        path = root / f'storage_{len(out)}'
        Dataset.from_list(list(gen()), features=features).save_to_disk(str(path))
        ds = datasets.load_from_disk(str(path))
        if name.startswith('binary'):
            arrow = ds.with_format('arrow')
            def read(i, arrow=arrow):
                row = arrow[i]
                cell = lambda k: row.column(k)[0]
                a = np.frombuffer(cell('ct').as_buffer(), dtype=cell('ct_dtype').as_py()).reshape(cell('ct_shape').as_py())
                return stored_ct_to_unit(a) if a.dtype == np.int16 else torch.from_numpy(a.astype(np.float32))
            readers = {'arrow + np.frombuffer': read}
        else:
            npds, tds = ds.with_format('numpy'), ds.with_format('torch')
            readers = {"with_format('numpy')": lambda i, d=npds: torch.from_numpy(np.asarray(d[i]['ct'])),
                       "with_format('torch')": lambda i, d=tds: d[i]['ct']}
        for how, read in readers.items():
            dtype = str(read(0).dtype)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for i in range(rows): read(i)
                times.append((time.perf_counter() - t0) / rows * 1e3)
            ms = statistics.median(times)
            out.append({'storage': name, 'read': how, 'ms_per_sample': round(ms, 2), 'returned_dtype': dtype,
                        'bytes_per_voxel_on_disk': 2})
            print(f"storage {n}³ {name:28s} {how:24s}: {ms:7.2f} ms per sample, returns {dtype}")
        shutil.rmtree(path)
    return out


def loader_rate(path: Path, n: int, batch_size: int, workers: int, epochs: int) -> float:
    "Samples/s of the trainer's loader over the train split: median over the epochs after the first (workers started, page cache warm)."
    from progressive_ct.train_step import stage_loader
    loader = stage_loader(path, 'train', n, batch_size, seed=0, num_workers=workers)
    rates = []
    for e in range(epochs):
        loader.sampler.set_epoch(e)
        t0, count = time.perf_counter(), 0
        for batch in loader: count += batch['ct'].shape[0]
        rates.append(count / (time.perf_counter() - t0))
    del loader
    return statistics.median(rates[1:])


def bench_stage_rates(root: Path, config: str, patients: int, workers: int, epochs: int = 4, steps: int = 3) -> list:
    from dataclasses import asdict
    from progressive_ct.config import load_config
    from progressive_ct.dataset import GRIDS_DIR, cache_grids, load_metadata
    from progressive_ct.runs import make_accelerator
    from progressive_ct.preflight import measure_step
    from progressive_ct.runs import Phase
    cfg = load_config(config)
    cfg.loss.allow_random_vgg = True                                   # offline here; the same cost
    cfg.training.mixed_precision = 'no'                                # the CPU's step in float32 (one precision per process)
    tier, path = Path(config).stem, root / f'rates_{Path(config).stem}'
    data = {**asdict(cfg.data), 'train_split': 1.0, 'val_split': 0.0, 'test_split': 0.0, 'num_workers': workers}
    prepare('phantoms', path, num_patients=patients, config=data, progress=False, log=lambda *a: None)
    cache_grids(path, cfg.voxel_dims, log=lambda *a: None)
    meta, acc, rows = load_metadata(path), make_accelerator(cfg, cpu=True), []
    for k in (1, 2, 3):
        n, B = Phase(k).grid(cfg), cfg.stage(k).batch_size
        cached = loader_rate(path, n, B, workers, epochs)
        pooled = None
        if n < meta['resolution']:                                     # the same loader without the stored grids
            (path / GRIDS_DIR).rename(path / 'grids_hidden')
            try: pooled = loader_rate(path, n, B, workers, epochs)
            finally: (path / 'grids_hidden').rename(path / GRIDS_DIR)
        step = measure_step(cfg, k, meta, acc, steps)
        row = {'config': Path(config).name, 'stage': k, 'grid': n, 'stored': meta['resolution'], 'xray': meta['xray_size'],
               'batch_size': B, 'workers': workers, 'patients': patients,
               'loader_samples_per_s': round(cached, 2), 'loader_pooling_per_sample_samples_per_s': None if pooled is None else round(pooled, 2),
               'step_samples_per_s': step['samples_per_s'], 'step_s': step['step_s'], 'crop': step['crop'], 'step_device': step['device'],
               'step_precision': step['mixed_precision'],
               'loader_over_step': round(cached / step['samples_per_s'], 1)}
        rows.append(row)
        print(f"{tier} stage {k}: {n}³ (stored {meta['resolution']}³), batch {B}: loader {cached:.1f} samples/s with {workers} workers "
              f"(pooling per sample: {'-' if pooled is None else f'{pooled:.1f}'}) | training step {step['samples_per_s']:.2f} samples/s "
              f"({step['step_s']:.2f} s/step) -> loader {row['loader_over_step']:.1f}x the step")
    shutil.rmtree(path, ignore_errors=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--patients', type=int, default=16)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--sizes', type=int, nargs='+', default=[128, 256])
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--nifti-patients', type=int, default=2)
    ap.add_argument('--skip-nifti', action='store_true')
    ap.add_argument('--stage-rates', nargs='+', metavar='CONFIG', help='only section 4, for these configs')
    ap.add_argument('--workdir', type=Path, default=None, help='scratch folder (default: a temporary one, deleted)')
    ap.add_argument('--out', type=Path, default=Path(__file__).parent / 'results' / 'data.json')
    args = ap.parse_args()
    datasets.disable_progress_bars()
    root = Path(args.workdir or tempfile.mkdtemp(prefix='pct_data_bench_'))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if args.stage_rates:
            result = json.loads(args.out.read_text()) if args.out.is_file() else {'benchmark': 'data pipeline: prepare and loading'}
            result['stage_rates'] = {'machine': platform.platform(), 'cpu_count': os.cpu_count(), 'torch': torch.__version__,
                                     'load_average_at_start': [round(v, 2) for v in os.getloadavg()],
                                     'rows': [r for c in args.stage_rates for r in bench_stage_rates(root, c, args.patients, args.workers)]}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + '\n')
            print(f"wrote {args.out}")
            return
        result = {'benchmark': 'data pipeline: prepare and loading', 'machine': platform.platform(), 'cpu_count': os.cpu_count(),
                  'load_average_at_start': [round(v, 2) for v in os.getloadavg()],
                  'torch': torch.__version__, 'datasets': datasets.__version__, 'prepare': [], 'loading': [], 'storage': []}
        for n in args.sizes:
            result['prepare'].append(bench_prepare(root, n, args.patients, args.workers))
            result['loading'] += bench_loading(root / f'phantoms_{n}', n, args.epochs)
        if not args.skip_nifti: result['prepare'].append(bench_prepare_nifti(root, args.nifti_patients, args.workers))
        result['storage'] = bench_storage(root)
        result['load_average_at_end'] = [round(v, 2) for v in os.getloadavg()]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + '\n')
        print(f"wrote {args.out}")
    finally:
        if args.workdir is None: shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
