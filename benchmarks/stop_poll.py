"""What the trainer's per-step stop check costs in a distributed run.

    python benchmarks/stop_poll.py [--processes 2] [--polls 2000]

After every optimiser step, `StopSignals.poll` agrees over processes on whether one of them received SIGTERM / SIGINT
(and whether a save inside the epoch is due): one all-reduce of two int64 over a CPU (gloo) group, so no device sync.
In one process it costs nothing (no communication). This measures the all-reduce with `--processes` processes on this
machine (loopback TCP, as on one node), the median and 99th percentile per poll, and sets it beside the training step
of each stage of the tiny config measured on this machine's CPU (`benchmarks/results/gpu_cpu.json`) and,
where a GPU has run `benchmarks/gpu.py`, on the GPU (`benchmarks/results/gpu.json`).

Writes benchmarks/results/stop_poll.json. Run by hand, never in CI.
"""
import argparse
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from progressive_ct.saving import StopSignals

RESULTS = Path(__file__).resolve().parent / 'results'


def worker(rank, world, port, polls, queue):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    stop = StopSignals()                      # the trainer's object: its group is the default one under gloo
    for _ in range(50): stop.poll()           # warm-up
    times = []
    for _ in range(polls):
        t0 = time.perf_counter()
        stop.poll(save_due=False)
        times.append(time.perf_counter() - t0)
    if rank == 0: queue.put(times)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def step_times():
    "Training step times already measured on this machine (and on a GPU, where one ran benchmarks/gpu.py)."
    rows = []
    for name in ('gpu_cpu.json', 'gpu.json'):
        f = RESULTS / name
        if not f.is_file(): continue
        r = json.loads(f.read_text())
        for x in r['results']:
            if x.get('variant', 'base') == 'base':
                rows.append({'source': name, 'config': r['config'], 'device': r.get('gpu') or r.get('device'), 'stage': x['stage'],
                             'step_s': x['step_s']})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--processes', type=int, default=2)
    p.add_argument('--polls', type=int, default=2000)
    a = p.parse_args()
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, a.processes, port, a.polls, queue)) for r in range(a.processes)]
    for pr in procs: pr.start()
    times = queue.get(timeout=600)
    for pr in procs: pr.join()
    med, p99 = statistics.median(times), sorted(times)[int(0.99 * len(times))]
    print(f"stop poll over gloo, {a.processes} processes on {platform.node() or 'this machine'} ({os.cpu_count()} cores): "
          f"median {med * 1e6:.0f} µs, 99th percentile {p99 * 1e6:.0f} µs per step ({a.polls} polls)")
    rows = step_times()
    for r in rows:
        r['poll_fraction_of_step'] = med / r['step_s']
        print(f"  beside {r['config']} stage {r['stage']} on {r['device']} ({r['source']}): step {r['step_s']:.3f} s, "
              f"poll {100 * med / r['step_s']:.3f}% of it")
    out = {'what': 'StopSignals.poll: all-reduce (MAX) of two int64 over gloo, once per optimiser step',
           'machine': f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", 'torch': torch.__version__,
           'processes': a.processes, 'polls': a.polls, 'median_us': round(med * 1e6, 1), 'p99_us': round(p99 * 1e6, 1),
           'beside_steps': rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'stop_poll.json').write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'stop_poll.json'}")


if __name__ == '__main__':
    main()
