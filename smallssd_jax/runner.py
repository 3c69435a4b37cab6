"""What `main.py` runs: checks, distributed start-up, then train / eval / detect.

Records: a training run owns `WORKDIR/config.json`, `metrics.jsonl`,
`checkpoints/`, `eval/step_N/` (its own evaluations) and `detect/` (pictures
drawn after training). `--mode=eval` and `--mode=detect` never write there:
each writes its own folder, `eval/<name>/` or `detect/<name>/`
(`--config.eval.name` / `--config.detect.name`, by default the start time),
with the config it ran with.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
import jax
import ml_collections

from smallssd_jax import checkpoints as ckpt_lib
from smallssd_jax import config_check
from smallssd_jax import detect as detect_lib
from smallssd_jax import errors
from smallssd_jax import evaluation
from smallssd_jax import predictor
from smallssd_jax import task as task_lib
from smallssd_jax import train as train_lib
from smallssd_jax import video


def _cluster_detected() -> bool:
  """True when JAX's own cluster detection will find more than one process."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ:
    return True
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return ',' in hosts


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """`jax.distributed.initialize()` when this is one process of several.

  Explicit arguments (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID) win; otherwise SLURM and multi-host TPU VMs are detected by
  JAX itself. A single process on one machine starts nothing, and a second
  call (a second `run` in the same processes) does nothing.
  """
  if jax.distributed.is_initialized():
    return
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if num_processes is None and 'JAX_NUM_PROCESSES' in os.environ:
    num_processes = int(os.environ['JAX_NUM_PROCESSES'])
  if process_id is None and 'JAX_PROCESS_ID' in os.environ:
    process_id = int(os.environ['JAX_PROCESS_ID'])
  if coordinator_address:
    if jax.config.jax_platforms in (None, '', 'cpu') and not os.environ.get('JAX_CPU_COLLECTIVES_IMPLEMENTATION'):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _cluster_detected():
    jax.distributed.initialize()
  else:
    return
  logging.info('Process %d of %d, %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def record_dir(workdir: str, kind: str, name: str) -> str:
  """A new folder `workdir/<kind>/<name>` for an eval or detect record; never an existing one."""
  base = os.path.join(workdir, kind)
  if name:
    if name.startswith('step_') or '/' in name:
      raise errors.ConfigError(f'{kind}.name {name!r}: names with "/" or starting with "step_" '
                               'are reserved for the training run\'s records')
    path = os.path.join(base, name)
    if os.path.exists(path):
      raise errors.ConfigError(f'{path} exists: choose another --config.{kind}.name')
    return path
  stamp = time.strftime('%Y%m%d-%H%M%S')
  path, n = os.path.join(base, stamp), 1
  while os.path.exists(path):
    n += 1
    path = os.path.join(base, f'{stamp}-{n}')
  return path


def _write_config(config: ml_collections.ConfigDict, path: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(config.to_dict(), f, indent=2, default=str)


def run(config: ml_collections.ConfigDict, workdir: str, mode: str) -> dict:
  """Validates the config for `mode`, then trains / evaluates / detects.

  Raises an `errors.RunError` (with its exit status) for every expected failure.
  """
  initialize_distributed()
  config_check.validate(config, mode=mode, workdir=workdir)
  if mode == 'train':
    with ckpt_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0):
      config_check.check_resume(config, workdir)
      train_lib.dump_config(config, workdir)
      results = train_lib.train_and_evaluate(config, workdir)
      if config.detect.max_images:
        out = os.path.join(workdir, 'detect')
        detect_lib.detect_images(predictor.Predictor.from_checkpoint(config, workdir),
                                 detect_lib.eval_examples(config, config.detect.max_images), out)
        if jax.process_index() == 0:
          print(f'Detections drawn on {config.detect.max_images} test images in {out}', flush=True)
  elif mode == 'eval':
    out = record_dir(workdir, 'eval', config.eval.name)
    task, state, step, mesh = predictor.restore_for_inference(
        config, config.eval.checkpoint or workdir)
    _write_config(config, os.path.join(out, 'config.json'))
    evaluator = evaluation.Evaluator(config, task_lib.make_predict_fn(task, config, mesh), mesh)
    results = evaluator.run(task_lib.variables_of(state), step=step,
                            out_dir=os.path.join(out, f'step_{step}'))
  elif mode == 'detect':
    out = record_dir(workdir, 'detect', config.detect.name)
    model = predictor.Predictor.from_checkpoint(config, config.eval.checkpoint or workdir)
    _write_config(config, os.path.join(out, 'config.json'))
    if video.is_video(config.detect.input):
      summary = video.detect_video(model, config.detect.input, out,
                                   max_frames=config.detect.max_frames)
      return {'video': summary, 'out_dir': out}
    records = detect_lib.detect_images(model, detect_lib.folder_images(config.detect.input), out)
    print(f'Wrote {len(records)} images with detections to {out}', flush=True)
    return {'detections': records, 'out_dir': out}
  else:
    raise errors.ConfigError(f'unknown mode {mode!r}: train, eval or detect')
  if jax.process_index() == 0 and results:
    print(headline(results, config.eval.metric), flush=True)
  return results


def headline(results: dict[str, float], metric: str) -> str:
  """The one line a user looks for: `mAP 0.xxx (...)`."""
  parts = [f'mAP {results["mAP"]:.4f} ({metric})']
  for key in ('APs', 'APm', 'APl', 'mAP_small_classes'):
    if key in results:
      parts.append(f'{key} {results[key]:.4f}')
  return '  '.join(parts)
