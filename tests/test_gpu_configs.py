"""The GPU side that CI can check without a GPU: accelerate's own loader reads every launch configuration in
configs/accelerate/, and benchmarks/gpu.py runs its CPU path on the tiny config."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = sorted((ROOT / 'configs' / 'accelerate').glob('*.yaml'))
EXPECTED = {   # file: (distributed type, processes, machines)
    'one_gpu.yaml': ('NO', 1, 1),
    'four_gpus_ddp_bf16.yaml': ('MULTI_GPU', 4, 1),
    'two_nodes_ddp_bf16.yaml': ('MULTI_GPU', 8, 2),
    'four_gpus_fsdp_stage3.yaml': ('FSDP', 4, 1),
}


def test_every_launch_configuration_is_listed():
    assert sorted(f.name for f in LAUNCH) == sorted(EXPECTED)


@pytest.mark.parametrize('path', LAUNCH, ids=lambda p: p.name)
def test_accelerate_reads_it(path):
    "accelerate's own loader (the one `accelerate launch --config_file` uses), and its launch validation."
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    cfg = load_config_from_file(str(path))
    kind, processes, machines = EXPECTED[path.name]
    assert (cfg.distributed_type.value, cfg.num_processes, cfg.num_machines) == (kind, processes, machines)
    assert cfg.mixed_precision == 'bf16' and not cfg.use_cpu
    if kind == 'FSDP': assert cfg.fsdp_config['fsdp_use_orig_params'] is True   # frozen stages beside trained ones
    args = launch_command_parser().parse_args(['--config_file', str(path), '-m', 'progressive_ct.train', '--config', 'C'])
    assert args.config_file == str(path) and args.module


def test_gpu_benchmark_cpu_path(tmp_path):
    "benchmarks/gpu.py --device cpu --tiny: every stage measured through the trainer's own step, written as JSON."
    out = tmp_path / 'gpu.json'
    r = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu.py'), '--device', 'cpu', '--tiny', '--steps', '2',
                        '--variants', 'base,no_checkpointing,channels_last', '--out', str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = res['results']
    assert [(x['stage'], x['variant']) for x in rows] == [(k, v) for v in ('base', 'no_checkpointing', 'channels_last') for k in (1, 2, 3)]
    for x in rows:
        assert x['loss_finite'] and x['step_s'] > 0 and x['peak_memory_mb'] > 0, x
        assert x['grid'] == {1: 16, 2: 32, 3: 64}[x['stage']] and x['batch_size'] == 2
    assert rows[1]['checkpointing'] != rows[4]['checkpointing']
    assert 'samples/s' in r.stdout and res['goal'] is None        # the goal is a GPU figure
