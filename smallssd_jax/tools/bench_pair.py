"""Two models' train steps (and inference) timed in turns, for a steady ratio.

  python -m smallssd_jax.tools.bench_pair --config=configs/ssd300_voc0712.py \
      --other=configs/dfssd300_voc0712.py --batch=8 --rounds=5

Both models are built in one process on synthetic batches (`bench.synthetic_batch`),
then `timing.paired_seconds` alternates them: each timed call follows an
untimed one of the same model. Reports each model's median seconds and the
median of the per-round ratios other / config (> 1: the other is slower).
"""

from __future__ import annotations

import statistics

from absl import app
from absl import flags
from ml_collections import config_flags

from smallssd_jax import _xla
from smallssd_jax import console
from smallssd_jax.tools import bench
from smallssd_jax.tools import timing


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'The reference model (path.py[:arg]).',
                                  lock_config=False)
  config_flags.DEFINE_config_file('other', None, 'The model compared with it.',
                                  lock_config=False)
  flags.DEFINE_integer('batch', 8, 'Images per batch.')
  flags.DEFINE_integer('rounds', 5, 'Timed calls of each model (they alternate).')
  flags.DEFINE_string('json', '', 'Also write the results here.')


def run(reference, other, batch: int, rounds: int) -> dict:
  timed, described = {}, {}
  for name, config in (('reference', reference), ('other', other)):
    config = config.copy_and_resolve_references()
    config.batch_size = batch
    out = bench.bench_model(config, bench.synthetic_batch(config), steps=1, warmup=1)
    timed[name] = out.pop(bench.TIMED)
    described[name] = {'model': str(config.model.name), 'size': int(config.model.input_size),
                       'gflops_per_image': out['gflops_per_image']['value'],
                       'train_gflops_per_image': out['train_gflops_per_image']['value']}
  results = {'batch': batch, 'rounds': rounds, 'models': described}
  for key, label in (('train_images_per_sec', 'train'), ('inference_images_per_sec', 'inference')):
    times = timing.paired_seconds({k: timed[k][key] for k in timed}, rounds)
    ratios = [o / r for r, o in zip(times['reference'], times['other'])]
    results[label] = {'reference_median_seconds': statistics.median(times['reference']),
                      'other_median_seconds': statistics.median(times['other']),
                      'other_over_reference': statistics.median(ratios),
                      'per_round': ratios}
  return results


def format_report(results: dict) -> str:
  m = results['models']
  lines = [f'batch {results["batch"]}, {results["rounds"]} alternated rounds; '
           f'reference {m["reference"]["model"]}{m["reference"]["size"]} '
           f'({m["reference"]["gflops_per_image"]:.1f} GFLOPs/image), other '
           f'{m["other"]["model"]}{m["other"]["size"]} ({m["other"]["gflops_per_image"]:.1f})']
  for label in ('train', 'inference'):
    r = results[label]
    lines.append(f'{label:<9} reference {r["reference_median_seconds"]:.2f} s, other '
                 f'{r["other_median_seconds"]:.2f} s: other / reference = '
                 f'{r["other_over_reference"]:.2f}x (per round '
                 f'{min(r["per_round"]):.2f}-{max(r["per_round"]):.2f})')
  return '\n'.join(lines)


def main(argv) -> None:
  bench.check_command_line(argv)
  f = flags.FLAGS
  results = run(f.config, f.other, f.batch, f.rounds)
  bench.print_and_save(format_report(results), results, f.json)


if __name__ == '__main__':
  _xla.apply_cpu_xla_defaults()
  console.quiet_library_logs(True)
  define_flags()
  app.run(main)
