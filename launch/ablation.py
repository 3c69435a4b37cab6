"""The detectors (and the switches that isolate each neck) under one budget, resumable.

Every run trains and evaluates one (dataset, model, variant, seed) with the
built-in recipe (`configs/default.py` / `configs/tiny.py`: same width, steps,
batch and schedule for every model), in its own workdir. A finished run
writes a small record, its results and nothing else, to
`--records/<steps>steps/<dataset>/<run>.json` (tracked in git under `docs/ablation/`):
run the same command again and recorded runs are skipped, an interrupted
run resumes from its last checkpoint (`--checkpoint-every`), and the report
is rewritten from whatever records exist. So a sweep of hours can be done
over several sittings.

  python launch/ablation.py --datasets=small,tiny --models=ssd,dfssd,skipfpn \\
      --seeds=0,1,2 --steps=1000
  python launch/ablation.py --datasets=tiny --models=dfssd,skipfpn \\
      --variants=dfssd:fusion_off,dfssd:fuse_all,skipfpn:no_grf,skipfpn:no_skip
  python launch/ablation.py ... --report-only      # rewrite docs/results.md only

The report (between markers of its step budget in `--out`, by default docs/results.md): per
dataset, mAP / APs / APm as mean ± standard deviation over seeds, and each
model's per-seed paired difference to SSD300 (same seed, same data order)
with a 95% t interval, and each switch's paired difference to its own full
detector (what the part switched off contributes); a difference whose
interval excludes zero is marked as beyond the seed-to-seed noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

DATASETS = {
    'small': 'configs/default.py',   # the main job's data: 6-64 px objects
    'tiny': 'configs/tiny.py',       # 4-24 px objects, crowded, distractors
}

# Switches that isolate a neck's parts: (model, name) -> config overrides.
VARIANTS = {
    ('dfssd', 'fusion_off'): {'model.dfssd.fusion_sources': "['nconv4_3']",
                              'model.dfssd.fusion_weights': '[0.3]'},
    ('dfssd', 'fuse_all'): {'model.dfssd.fuse_levels': 'all'},
    ('dfssd', 'paper_literal'): {'model.dfssd.deconv_kernel': '4', 'model.dfssd.deconv_padding': '1',
                                 'model.dfssd.source_norm': 'none', 'model.dfssd.context_init': '1.0'},
    ('dfssd', 'equal_context'): {'model.dfssd.context_init': '1.0'},
    ('skipfpn', 'no_grf'): {'model.skipfpn.grf_levels': '[]'},
    ('skipfpn', 'no_skip'): {'model.skipfpn.skip_depth': '0'},
}

# Two-sided 95% quantiles of Student's t, by degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}

METRICS = ('mAP', 'APs', 'APm')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--datasets', default='small,tiny', help=f'of {sorted(DATASETS)}')
  p.add_argument('--models', default='ssd,dfssd,skipfpn')
  p.add_argument('--variants', default='',
                 help='MODEL:NAME,...: also run these switches, of ' +
                 ', '.join(f'{m}:{n}' for m, n in VARIANTS))
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--steps', type=int, default=1000)
  p.add_argument('--width', type=float, default=0.125)
  p.add_argument('--checkpoint-every', type=int, default=250,
                 help='checkpoint interval: what an interrupted run loses at most')
  p.add_argument('--set', action='append', default=[], help='KEY=VALUE for every run')
  p.add_argument('--workdir', default='runs/ablation', help='checkpoints (not kept)')
  p.add_argument('--records', default='docs/ablation', help='one small JSON per finished run')
  p.add_argument('--out', default='docs/results.md')
  p.add_argument('--dry-run', action='store_true', help='print the commands only')
  p.add_argument('--report-only', action='store_true',
                 help='rewrite the report from the records; train nothing')
  return p.parse_args(argv)


# ------------------------------------------------------------------ runs ---


def plan(args) -> list[dict]:
  """Every run, seed-major: an unfinished sweep has every model at the first seeds."""
  models = [m for m in args.models.split(',') if m]
  chosen = [v for v in args.variants.split(',') if v]
  for spec in chosen:
    model, _, name = spec.partition(':')
    if (model, name) not in VARIANTS:
      raise SystemExit(f'unknown variant {spec!r}; known: '
                       + ', '.join(f'{m}:{n}' for m, n in VARIANTS))
  runs = []
  for dataset in [d for d in args.datasets.split(',') if d]:
    if dataset not in DATASETS:
      raise SystemExit(f'unknown dataset {dataset!r}; known: {sorted(DATASETS)}')
    for seed in [int(s) for s in args.seeds.split(',')]:
      for model in models + sorted({m for m, _ in (v.split(':') for v in chosen)} - set(models)):
        names = ([''] if model in models else []) + [
            v.partition(':')[2] for v in chosen if v.partition(':')[0] == model]
        for variant in names:
          overrides = dict(VARIANTS.get((model, variant), {}))
          label = model + (f'[{variant}]' if variant else '')
          tag = f'{model}{"-" + variant if variant else ""}_seed{seed}'
          runs.append(dict(dataset=dataset, model=model, variant=variant, label=label,
                           seed=seed, tag=tag, overrides=overrides))
  return runs


def command(args, run: dict, workdir: str) -> list[str]:
  arg = f'model={run["model"]},seed={run["seed"]},steps={args.steps},width={args.width}'
  flags = [f'--config.{k}={v}' for k, v in run['overrides'].items()]
  flags += [f'--config.{s}' for s in args.set]
  return ([sys.executable, '-m', 'smallssd_jax.main',
           f'--config={DATASETS[run["dataset"]]}:{arg}', f'--workdir={workdir}',
           f'--config.checkpoint_every_steps={args.checkpoint_every}',
           '--config.detect.max_images=1'] + flags)


def record_path(args, run: dict) -> pathlib.Path:
  return pathlib.Path(args.records, f'{args.steps}steps', run['dataset'], run['tag'] + '.json')


def read_record(args, run: dict) -> dict | None:
  path = record_path(args, run)
  if not path.exists():
    return None
  rec = json.loads(path.read_text())
  if rec['steps'] != args.steps or rec['width'] != args.width:
    return None           # another budget: not this sweep's run
  return rec


def final_results(workdir: str, steps: int) -> dict | None:
  """The training run's own evaluation at `steps`, if it got there."""
  path = pathlib.Path(workdir, 'eval', f'step_{steps}', 'results.json')
  return json.loads(path.read_text()) if path.exists() else None


def images_per_second(workdir: str) -> float | None:
  rows = [json.loads(l) for l in pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  rates = [r['images_per_sec'] for r in rows if 'images_per_sec' in r][1:]  # first: compile
  return statistics.median(rates) if rates else None


def git_commit() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def train(args, run: dict) -> dict:
  workdir = os.path.join(args.workdir, run['dataset'], run['tag'])
  cmd = command(args, run, workdir)
  print('+ ' + ' '.join(shlex.quote(c) for c in cmd), flush=True)
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True, cwd=REPO)
  seconds = time.perf_counter() - t0
  result = final_results(workdir, args.steps)
  if result is None:
    raise RuntimeError(f'{workdir}: the run ended without evaluating step {args.steps} '
                       '(stopped early?); run the sweep again to resume it')
  keep = {k: v for k, v in result['results'].items() if not k.startswith('APs/')
          and not k.startswith('APm/') and not k.startswith('APl/')}
  rec = dict(run, steps=args.steps, width=args.width, results=keep, seconds=seconds,
             images_per_sec=images_per_second(workdir), commit=git_commit(),
             date=datetime.date.today().isoformat(), command=' '.join(shlex.quote(c) for c in cmd))
  path = record_path(args, run)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(rec, indent=1, sort_keys=True) + '\n')
  return rec


# ---------------------------------------------------------------- report ---


def mean_sd(values: list[float]) -> str:
  if not values:
    return '-'
  if len(values) == 1:
    return f'{100 * values[0]:.1f}'
  return f'{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}'


def paired_interval(diffs: list[float]) -> tuple[float, float] | None:
  """Mean and 95% half-width (Student's t) of per-seed differences; None for < 2 seeds."""
  if len(diffs) < 2:
    return None
  df = len(diffs) - 1
  t = _T95[max(k for k in _T95 if k <= df)]
  return statistics.mean(diffs), t * statistics.stdev(diffs) / math.sqrt(len(diffs))


def _value(rec: dict, key: str) -> float | None:
  v = rec['results'].get(key)
  return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def report_dataset(dataset: str, records: list[dict]) -> list[str]:
  labels = list(dict.fromkeys(r['label'] for r in records))
  by = {(r['label'], r['seed']): r for r in records}
  seeds = sorted({r['seed'] for r in records})
  lines = [f'#### {dataset} (`{DATASETS[dataset]}`)', '',
           '| model | seeds | ' + ' | '.join(METRICS) + ' | train images/s | train minutes |',
           '|---|---|' + '---|' * (len(METRICS) + 2)]
  for label in labels:
    rs = [by[(label, s)] for s in seeds if (label, s) in by]
    cells = [mean_sd([v for v in (_value(r, k) for r in rs) if v is not None]) for k in METRICS]
    rate = statistics.median([r['images_per_sec'] for r in rs if r.get('images_per_sec')] or [0])
    # From the images/s the run logged: its wall time also holds evaluation, start-up and
    # any pause of the sweep.
    minutes = rs[0]['steps'] * 8 / rate / 60 if rate else float('nan')   # batch 8
    lines.append(f'| {label} | {",".join(str(r["seed"]) for r in rs)} | ' + ' | '.join(cells)
                 + f' | {rate:.1f} | {minutes:.1f} |')
  if 'ssd' in labels:
    lines += ['', 'Paired difference to SSD300 (same seed), mean with its 95% interval, in '
              'points; **bold**: the interval excludes 0 (beyond the seed-to-seed noise):', '']
    lines += _paired_table(by, seeds, [(label, 'ssd') for label in labels if label != 'ssd'])
  switched = list(dict.fromkeys((r['label'], r['model']) for r in records
                                if r['variant'] and r['model'] in labels))
  if switched:
    lines += ['', "Each switch against its own full detector (same seed): what the switched-off "
              "part contributes with the sign flipped; **bold** beyond the seed-to-seed noise:", '']
    lines += _paired_table(by, seeds, switched)
  return lines + ['']


def _paired_table(by: dict, seeds: list[int], pairs: list[tuple[str, str]]) -> list[str]:
  """Rows of `label - base` per seed, as mean ± 95% half-width in points."""
  lines = ['| model | ' + ' | '.join(f'Δ{k}' for k in METRICS) + ' |',
           '|---|' + '---|' * len(METRICS)]
  for label, base in pairs:
    cells = []
    for key in METRICS:
      values = [(_value(by[(label, s)], key), _value(by[(base, s)], key)) for s in seeds
                if (label, s) in by and (base, s) in by]
      diffs = [a - b for a, b in values if a is not None and b is not None]
      interval = paired_interval(diffs)
      if interval is None:
        cells.append(f'{100 * diffs[0]:+.1f} (1 seed)' if diffs else '-')
        continue
      mean, half = interval
      text = f'{100 * mean:+.1f} ± {100 * half:.1f}'
      cells.append(f'**{text}**' if abs(mean) > half else text)
    name = label if base == 'ssd' else f'{label} - {base}'
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return lines


def write_report(args, records: list[dict]) -> None:
  datasets = [d for d in DATASETS if any(r['dataset'] == d for r in records)]
  steps = sorted({r['steps'] for r in records})
  lines = [
      f'### {steps[0]} steps', '',
      f'Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python '
      f'{platform.python_version()}. Every run: width {args.width}, {", ".join(map(str, steps))} '
      'steps of batch 8 from scratch, the recipe of `configs/default.py`; VOC07 11-point AP at '
      'IoU 0.5 over the test split; APs / APm: AP of objects under 32² / 32²-96² pixels. Mean ± '
      'standard deviation over seeds, in points. Records (one JSON per run, with its command '
      f'and commit): `{args.records}/`. Regenerate with `python launch/ablation.py '
      '--report-only` and the same arguments.', '']
  for dataset in datasets:
    lines += report_dataset(dataset, [r for r in records if r['dataset'] == dataset])
  begin, end = f'<!-- ablation:{steps[0]}:begin -->', f'<!-- ablation:{steps[0]}:end -->'
  block = begin + '\n' + '\n'.join(lines) + end
  out = pathlib.Path(args.out)
  text = out.read_text() if out.exists() else ''
  if begin in text and end in text:
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
  else:
    text = text + ('\n' if text else '') + block + '\n'
  out.write_text(text)
  print(f'wrote {out}')


def load_records(args) -> list[dict]:
  """Every record of this budget (steps, width), whichever sweep command wrote it."""
  out = []
  for path in sorted(pathlib.Path(args.records, f'{args.steps}steps').glob('*/*.json')):
    rec = json.loads(path.read_text())
    if rec['steps'] == args.steps and rec['width'] == args.width:
      out.append(rec)
  order = {label: i for i, label in enumerate(['ssd', 'dfssd', 'skipfpn'])}
  return sorted(out, key=lambda r: (order.get(r['model'], 9), r['label'], r['seed']))


def main(argv=None):
  args = parse_args(argv)
  runs = plan(args)
  for run in runs:
    rec = read_record(args, run)
    if args.dry_run:
      state = 'recorded' if rec else 'to run'
      workdir = os.path.join(args.workdir, run['dataset'], run['tag'])
      print(f'[{state}] ' + ' '.join(shlex.quote(c) for c in command(args, run, workdir)))
    elif rec is None and not args.report_only:
      train(args, run)
      write_report(args, load_records(args))
  if not args.dry_run:
    records = load_records(args)
    if records:
      write_report(args, records)


if __name__ == '__main__':
  main()
