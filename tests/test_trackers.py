"""The run's trackers record its configuration: `init_trackers` gets the whole configuration as hyper-parameters, and
the logged numbers land in TensorBoard's event files (where tensorboard is installed; it is in the dev requirements)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_tensorboard_records_the_configuration_and_the_metrics(tmp_path):
    pytest.importorskip('tensorboard', reason='tensorboard is not installed: the run logs to metrics.csv only')
    from progressive_ct.config import load_config
    from progressive_ct.runs import MetricLog, make_accelerator
    from progressive_ct.train import tracker_config
    cfg = load_config(ROOT / 'configs' / 'tiny.json')
    cfg.training.stage1.learning_rate = 0.000123
    acc = make_accelerator(cfg, cpu=True, project_dir=tmp_path)
    assert acc.log_with, 'TensorBoard is installed, so the run must log to it'
    hparams = tracker_config(cfg)
    assert hparams['training.stage1.learning_rate'] == 0.000123 and hparams['model.stage2_widths'] == '[8, 16]'
    acc.init_trackers('progressive_ct', config=hparams)
    MetricLog(tmp_path / 'metrics.csv', acc)(2, 1, 7, {'val_psnr': 21.5})
    acc.end_training()
    events = b''.join(p.read_bytes() for p in tmp_path.rglob('events.out.tfevents*'))
    assert b'training.stage1.learning_rate' in events and b'model.stage2_widths' in events   # the hyper-parameters
    assert b'stage2/val_psnr' in events                                                       # the logged number
    assert (tmp_path / 'metrics.csv').read_text().splitlines()[1].split(',')[1:] == ['2', '1', '7', 'val_psnr', '21.5']
