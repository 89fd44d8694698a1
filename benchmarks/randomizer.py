"""Cost of the randomised X-ray inputs (`RadiographRandomizer`, the X-ray image model) per item: on one CPU thread (what a
loader worker would pay) and on the GPU (where the training step runs it), at the kit's radiograph sizes.

    python benchmarks/randomizer.py [--device cpu|cuda] [--sizes 128,256,512] [--items 16]

Each item is two views of chest-like mass thicknesses (up to 30 g/cm² of water and 4 of bone), drawn through a random
system with shares p_ideal 0.3, p_clinical 0.4 (fixed here so that figures stay comparable; the ideal share costs
nothing). On the GPU the items of a batch are run one after another as `randomize_inputs` does,
timed with the device synchronised. It also checks that an item's draws repeat for its key on the device, and that a
GPU item matches the CPU one of the same key (the same system and chain; the noise comes from another generator).
Writes benchmarks/results/randomizer_<device>.json.
"""
import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--sizes', default='128,256,512')
    p.add_argument('--items', type=int, default=16)
    args = p.parse_args()
    from progressive_ct.xray import RadiographRandomizer
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    rows = []
    for S in [int(s) for s in args.sizes.split(',')]:
        g = torch.Generator().manual_seed(S)
        mass = torch.rand(args.items, 2, 2, S, S, generator=g) * torch.tensor([30.0, 4.0])[:, None, None, None]
        ideal = torch.rand(args.items, 2, S, S, generator=g) * 0.6
        r = RadiographRandomizer(400.0 * 1.754 / S, [[0.02, 0.6]] * 2, p_ideal=0.3, p_clinical=0.4)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)                                          # as a loader worker runs
        t0 = time.perf_counter()
        cpu = [r(ideal[i], mass[i], key=i) for i in range(args.items)]
        cpu_s = (time.perf_counter() - t0) / args.items
        torch.set_num_threads(threads)
        row = {'size': S, 'items': args.items, 'cpu_1_thread_s_per_item': round(cpu_s, 4)}
        if dev.type != 'cpu':
            m, x = mass.to(dev), ideal.to(dev)
            r(x[0], m[0], key=0); sync()                                  # warm-up (kernels, FFT plans)
            t0 = time.perf_counter()
            out = [r(x[i], m[i], key=i) for i in range(args.items)]
            sync()
            dev_s = (time.perf_counter() - t0) / args.items
            again = r(x[1], m[1], key=1)
            corr = min(float(torch.corrcoef(torch.stack([a.flatten().cpu().double(), b.flatten().double()]))[0, 1])
                       for a, b in zip(out, cpu) if not torch.equal(a.cpu(), b))
            row |= {f'{dev.type}_s_per_item': round(dev_s, 5), 'speedup': round(cpu_s / dev_s, 1),
                    'repeats_for_its_key': bool(torch.equal(again, out[1])), 'min_corr_gpu_vs_cpu_same_key': round(corr, 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {'benchmark': f'benchmarks/randomizer.py --device {dev.type}: the randomised X-ray inputs per item, one CPU thread against the {dev.type}',
           'device': torch.cuda.get_device_name() if dev.type == 'cuda' else platform.processor() or platform.machine(),
           'torch': torch.__version__, 'rows': rows}
    f = ROOT / 'benchmarks' / 'results' / f'randomizer_{dev.type}.json'
    f.write_text(json.dumps(out, indent=1))
    print(f"wrote {f}")


if __name__ == '__main__':
    main()
