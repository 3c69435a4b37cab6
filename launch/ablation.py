"""Trains and evaluates several detectors (or config switches) under one budget.

The same width, input size, steps, data and seeds for every model, on the
built-in small-object dataset by default; then a table of AP / APs / APm / APl
(mean and spread over seeds), the per-class table, a figure of AP by object
size, and one test image with each model's detections, written to
`docs/results.md` (or --out).

  python launch/ablation.py --models=ssd,dfssd,skipfpn --seeds=0,1,2 --steps=200 \
      --width=0.125 --workdir=runs/ablation

Sweep any config switch instead of (or as well as) the model:

  python launch/ablation.py --models=dfssd --sweep=model.dfssd.fusion=fixed,learned
  python launch/ablation.py --models=skipfpn --sweep=loss.negative_anchor_filter=True,False

Each run is `python -m smallssd_jax.main --config=configs/default.py:...`
in its own workdir, so a finished run is skipped when the script is run again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default='ssd,dfssd,skipfpn')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--steps', type=int, default=200)
  p.add_argument('--width', type=float, default=0.125)
  p.add_argument('--config', default='configs/default.py')
  p.add_argument('--sweep', action='append', default=[],
                 help='KEY=V1,V2,...: also vary this config entry (repeatable)')
  p.add_argument('--set', action='append', default=[], help='KEY=VALUE for every run')
  p.add_argument('--workdir', default='runs/ablation')
  p.add_argument('--out', default='docs/results.md')
  p.add_argument('--dry-run', action='store_true', help='print the commands only')
  p.add_argument('--report-only', action='store_true',
                 help='write the report from the runs that have finished; train nothing')
  return p.parse_args(argv)


def variants(args) -> list[tuple[str, list[str]]]:
  """(name, extra --config flags) for every combination of the sweeps."""
  out = [('', [])]
  for sweep in args.sweep:
    key, _, values = sweep.partition('=')
    out = [(f'{name}{"," if name else ""}{key.split(".")[-1]}={v}', flags + [f'--config.{key}={v}'])
           for name, flags in out for v in values.split(',')]
  return out


def command(args, model: str, seed: int, flags: list[str], workdir: str) -> list[str]:
  arg = f'model={model},seed={seed},steps={args.steps},width={args.width}'
  return ([sys.executable, '-m', 'smallssd_jax.main', f'--config={args.config}:{arg}',
           f'--workdir={workdir}'] + [f'--config.{s}' for s in args.set] + flags)


def final_results(workdir: str) -> dict | None:
  evals = sorted(pathlib.Path(workdir, 'eval').glob('step_*/results.json'),
                 key=lambda p: int(p.parent.name.split('_')[1]))
  return json.loads(evals[-1].read_text()) if evals else None


def mean_spread(values: list[float]) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return '-'
  if len(values) == 1:
    return f'{100 * values[0]:.1f}'
  return f'{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}'


def write_report(args, runs: dict, first_workdirs: dict, seconds: dict) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig_path = out.with_name(out.stem + '_ap_by_size.png')
  names = list(runs)
  keys = ['mAP', 'APs', 'APm', 'APl']
  lines = [
      '## Ablation on the built-in small-object dataset', '',
      f'Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, '
      f'{platform.python_version()}; {datetime.date.today().isoformat()}.',
      f'Every model: width {args.width}, {args.steps} steps, seeds {args.seeds}, '
      f'config `{args.config}`; VOC07 11-point AP at IoU 0.5, AP by COCO size bucket '
      '(small < 32², medium < 96² pixels). Mean ± standard deviation over seeds, in points.', '',
      'Command:', '', '```', 'python ' + ' '.join(shlex.quote(a) for a in sys.argv), '```', '',
      '| model | ' + ' | '.join(keys) + ' | minutes per run (train + eval) |',
      '|---|' + '---|' * (len(keys) + 1),
  ]
  for name in names:
    rs = runs[name]
    cells = [mean_spread([r['results'].get(k) for r in rs]) for k in keys]
    minutes = f'{statistics.mean(seconds[name]) / 60:.1f}' if seconds[name] else '-'
    lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {minutes} |')
  # Per-class AP (mean over seeds).
  class_keys = sorted({k for rs in runs.values() for r in rs for k in r['results']
                       if k.startswith('AP/') and not k[3:].isdigit()})
  if class_keys:
    lines += ['', 'Per-class AP (mean over seeds):', '',
              '| model | ' + ' | '.join(k[3:] for k in class_keys) + ' |',
              '|---|' + '---|' * len(class_keys)]
    for name in names:
      cells = [mean_spread([r['results'].get(k) for r in runs[name]]) for k in class_keys]
      lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  lines += ['', f'![AP by object size]({fig_path.name})', '']

  # Figure: AP by size bucket, mean with the seed spread as error bars.
  fig, ax = plt.subplots(figsize=(7, 4))
  width = 0.8 / max(1, len(names))
  for i, name in enumerate(names):
    vals = [[r['results'].get(k) or 0.0 for r in runs[name]] for k in keys]
    ax.bar(np.arange(len(keys)) + i * width, [100 * np.mean(v) for v in vals], width,
           yerr=[100 * np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals], label=name, capsize=3)
  ax.set_xticks(np.arange(len(keys)) + width * (len(names) - 1) / 2, ['AP (all)', 'APs', 'APm', 'APl'])
  ax.set_ylabel('AP (points)')
  ax.set_title('AP by object size, built-in small-object dataset')
  ax.legend()
  fig.tight_layout()
  fig.savefig(fig_path, dpi=120)
  plt.close(fig)

  # One test image, each model's detections (first seed), side by side.
  pictures = []
  for name in names:
    picture = pathlib.Path(first_workdirs[name], 'detect', 'builtin_small_test_0.png')
    if picture.exists():
      pictures.append((name, picture))
  if pictures:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    images = [Image.open(p).convert('RGB') for _, p in pictures]
    h = max(im.height for im in images)
    canvas = Image.new('RGB', (sum(im.width for im in images) + 10 * (len(images) - 1), h + 20), 'white')
    x = 0
    from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
    draw = ImageDraw.Draw(canvas)
    for (name, _), im in zip(pictures, images):
      canvas.paste(im, (x, 20))
      draw.text((x + 4, 4), name, fill='black')
      x += im.width + 10
    side = out.with_name(out.stem + '_detections.png')
    canvas.save(side)
    lines += [f'The same test image, each model\'s detections (seed {args.seeds.split(",")[0]}, '
              'score >= detect.score_threshold):', '', f'![detections]({side.name})', '']

  marker_begin, marker_end = '<!-- ablation:begin -->', '<!-- ablation:end -->'
  block = marker_begin + '\n' + '\n'.join(lines) + '\n' + marker_end
  text = out.read_text() if out.exists() else ''
  if marker_begin in text and marker_end in text:
    text = text[:text.index(marker_begin)] + block + text[text.index(marker_end) + len(marker_end):]
  else:
    text = text + ('\n' if text else '') + block + '\n'
  out.write_text(text)
  print(f'wrote {out} and {fig_path}')


def run_seconds(workdir: str) -> float | None:
  path = pathlib.Path(workdir, 'ablation_seconds.json')
  return json.loads(path.read_text())['seconds'] if path.exists() else None


def main(argv=None):
  args = parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(',')]
  names = {}
  for model in args.models.split(','):
    for vname, flags in variants(args):
      names[model + (f' [{vname}]' if vname else '')] = (model, vname, flags)
  runs = {name: [] for name in names}
  seconds = {name: [] for name in names}
  first_workdirs = {}
  # Seed-major order: an interrupted sweep still has every model at the first seeds.
  for seed in seeds:
    for name, (model, vname, flags) in names.items():
      tag = (model + ('_' + vname.replace('=', '-').replace(',', '_') if vname else '')
             + f'_seed{seed}')
      workdir = os.path.join(args.workdir, tag)
      first_workdirs.setdefault(name, workdir)
      cmd = command(args, model, seed, flags, workdir)
      if args.dry_run:
        print(' '.join(shlex.quote(c) for c in cmd))
        continue
      result = final_results(workdir)
      if not args.report_only and (result is None or result['step'] < args.steps):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO)
        pathlib.Path(workdir, 'ablation_seconds.json').write_text(
            json.dumps({'seconds': time.perf_counter() - t0}))
        result = final_results(workdir)
        if result is None:
          raise RuntimeError(f'{workdir}: the run finished without evaluation results')
      if result is not None and result['step'] >= args.steps:
        runs[name].append(result)
        if run_seconds(workdir) is not None:
          seconds[name].append(run_seconds(workdir))
  runs = {k: v for k, v in runs.items() if v}
  if not args.dry_run and runs:
    write_report(args, runs, first_workdirs, seconds)


if __name__ == '__main__':
  main()
