"""launch/ablation.py: the sweep resumes without re-running recorded runs, and its report's
statistics equal a direct computation."""

import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('ablation', REPO / 'launch' / 'ablation.py')
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)

T95_DF2 = 4.302652729911275   # two-sided 95% quantile of Student's t with 2 degrees of freedom


def _record(model, variant, seed, mAP, APs, steps=200, dataset='tiny'):
  label = model + (f'[{variant}]' if variant else '')
  tag = f'{model}{"-" + variant if variant else ""}_seed{seed}'
  return dict(dataset=dataset, model=model, variant=variant, label=label, seed=seed, tag=tag,
              overrides={}, steps=steps, width=0.125, images_per_sec=10.0, seconds=1.0,
              commit='x', date='2026-01-01', command='',
              results={'mAP': mAP, 'APs': APs, 'APm': None})


def _row(lines, name):
  row = next(l for l in lines if l.startswith(f'| {name} |'))
  return [c.strip() for c in row.strip('|').split('|')[1:]]


def _cell_numbers(cell):
  return [float(x) for x in re.findall(r'[-+]?\d+\.\d+', cell)]


def test_the_report_equals_a_direct_computation():
  rng = np.random.default_rng(0)
  ssd = rng.uniform(0.1, 0.2, (3, 2))
  full = ssd - np.array([0.04, 0.05]) + rng.normal(0, 0.005, (3, 2))   # clearly below SSD
  off = full + rng.normal(0, 0.03, (3, 2))                               # within the noise
  records = []
  for seed in range(3):
    records.append(_record('ssd', '', seed, *ssd[seed]))
    records.append(_record('dfssd', '', seed, *full[seed]))
    records.append(_record('dfssd', 'fusion_off', seed, *off[seed]))
  lines = ablation.report_dataset('tiny', records)

  def expect(a, b):
    d = 100 * (a - b)
    return d.mean(axis=0), T95_DF2 * d.std(axis=0, ddof=1) / np.sqrt(3)

  # Mean ± sd per model.
  mean_sd = _cell_numbers(_row(lines, 'dfssd')[1])
  np.testing.assert_allclose(mean_sd, [100 * full[:, 0].mean(), 100 * full[:, 0].std(ddof=1)],
                             atol=0.051)
  # Paired to SSD300, in the table that follows the first header.
  first = lines.index(next(l for l in lines if l.startswith('Paired difference to SSD300')))
  second = lines.index(next(l for l in lines if l.startswith('Each switch')))
  mean, half = expect(full, ssd)
  cells = _row(lines[first:second], 'dfssd')
  for k in range(2):
    np.testing.assert_allclose(_cell_numbers(cells[k]), [mean[k], half[k]], atol=0.051)
    assert cells[k].startswith('**') == (abs(mean[k]) > half[k])
  assert cells[0].startswith('**')                     # 4 points below, 0.5 of noise
  # Each switch against its own full detector, not against SSD300.
  mean, half = expect(off, full)
  cells = _row(lines[second:], 'dfssd[fusion_off] - dfssd')
  for k in range(2):
    np.testing.assert_allclose(_cell_numbers(cells[k]), [mean[k], half[k]], atol=0.051)
    assert cells[k].startswith('**') == (abs(mean[k]) > half[k])


def test_recorded_runs_are_skipped_and_the_rest_resume(tmp_path, monkeypatch):
  trained = []

  def fake_train(args, run):
    trained.append(run['tag'])
    rec = _record(run['model'], run['variant'], run['seed'], 0.5, 0.4, steps=args.steps,
                  dataset=run['dataset'])
    path = ablation.record_path(args, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return rec

  monkeypatch.setattr(ablation, 'train', fake_train)
  argv = ['--datasets=tiny', '--models=ssd,dfssd', '--variants=dfssd:fusion_off', '--seeds=0,1',
          '--steps=7', f'--records={tmp_path / "records"}', f'--workdir={tmp_path / "runs"}',
          f'--out={tmp_path / "results.md"}']
  # A sweep interrupted after two runs left their records ...
  done = _record('ssd', '', 0, 0.5, 0.4, steps=7)
  for tag in ('ssd_seed0', 'dfssd_seed0'):
    path = tmp_path / 'records' / '7steps' / 'tiny' / f'{tag}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(done, tag=tag)))
  # ... so running it again trains only the other four, seed-major.
  ablation.main(argv)
  assert trained == ['dfssd-fusion_off_seed0', 'ssd_seed1', 'dfssd_seed1',
                     'dfssd-fusion_off_seed1']
  # A third time trains nothing and rewrites the report between its markers.
  ablation.main(argv)
  assert len(trained) == 4
  text = (tmp_path / 'results.md').read_text()
  assert text.count('<!-- ablation:7:begin -->') == 1
  assert '| dfssd[fusion_off] - dfssd |' in text


def test_a_run_that_stops_before_its_evaluation_is_not_recorded(tmp_path, monkeypatch):
  monkeypatch.setattr(ablation.subprocess, 'run', lambda *a, **k: None)   # "killed" at once
  args = ablation.parse_args(['--steps=7', f'--records={tmp_path / "records"}',
                              f'--workdir={tmp_path / "runs"}'])
  run = ablation.plan(ablation.parse_args(['--datasets=tiny', '--models=ssd', '--seeds=0']))[0]
  with pytest.raises(RuntimeError, match='without evaluating step 7'):
    ablation.train(args, run)
  assert ablation.read_record(args, run) is None
