"""What `main.py` runs: distributed start-up, then train / eval / detect."""

from __future__ import annotations

import os

from absl import logging
import jax
import ml_collections

from smallssd_jax import evaluation as eval_lib
from smallssd_jax import train as train_lib


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


def run(config: ml_collections.ConfigDict, workdir: str, mode: str) -> dict:
  initialize_distributed()
  train_lib.dump_config(config, workdir)
  if mode == 'train':
    results = train_lib.train_and_evaluate(config, workdir)
    if config.detect.max_images:
      detector, state, _, mesh = eval_lib.restore_for_inference(config, workdir)
      out = eval_lib.detect_eval_examples(config, workdir, detector, state, mesh,
                                          config.detect.max_images)
      if jax.process_index() == 0:
        print(f'Detections drawn on {config.detect.max_images} test images in {out}', flush=True)
  elif mode == 'eval':
    results = eval_lib.evaluate_checkpoint(config, workdir)
  elif mode == 'detect':
    return {'detections': eval_lib.detect(config, workdir)}
  else:
    raise ValueError(f'unknown mode {mode!r}')
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
