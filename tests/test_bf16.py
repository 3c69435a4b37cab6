"""Mixed precision: `model.dtype='bfloat16'` computes in bf16 with float32 parameters and loss.

The tiny DF-SSD (it has BatchNorm and the L2Norm of conv4_3) overfits two
built-in images in bf16, and the evaluator scores it: finite detections, a
metric in [0, 1].
"""

import pytest
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from smallssd_jax import evaluation as eval_lib
from smallssd_jax import train
from smallssd_jax.config_blocks import load_config
from smallssd_jax.datasets import pipeline
from smallssd_jax import sharding
from smallssd_jax import task as task_lib

# End-to-end runs: left out of the fast subset (pytest -m "not slow").
pytestmark = pytest.mark.slow

CONFIG = str(pathlib.Path(__file__).parents[1] / 'configs' / 'default.py') + ':runlocal'
FAST_COMPILE = {'xla_backend_optimization_level': 1, 'xla_llvm_disable_expensive_passes': True}
STEPS = 30


def bf16_config():
  cfg = load_config(CONFIG)
  cfg.model.dtype = 'bfloat16'
  cfg.data.augment = []
  cfg.data.builtin.num_train = 2         # the same two images at every step
  cfg.batch_size = 2
  cfg.num_train_steps = STEPS
  cfg.optim.boundaries = [1000, 2000]
  cfg.optim.warmup_steps = 0
  cfg.data.builtin.num_test = 2
  cfg.eval.num_examples = 2
  cfg.eval.batch_size = 2
  cfg.eval.pr_curves = False
  return cfg


def test_bfloat16_forward_is_close_to_float32():
  cfg = bf16_config()
  mesh = sharding.make_mesh()
  bf16 = task_lib.build_task(cfg)
  cfg32 = bf16_config()
  cfg32.model.dtype = 'float32'
  fp32 = task_lib.build_task(cfg32)
  state = task_lib.create_train_state(fp32, cfg32, task_lib.init_rng(0), mesh)
  variables = task_lib.variables_of(state)
  image = next(pipeline.make_train_iterator(cfg))['image'][:1]

  def forward(detector):
    fn = jax.jit(lambda v, x: detector.module.apply(v, x, train=False))
    lowered = fn.lower(variables, image)
    return lowered.as_text(), lowered.compile(compiler_options=FAST_COMPILE)(variables, image)

  text16, out16 = forward(bf16)
  text32, out32 = forward(fp32)
  assert 'xbf16>' in text16 and 'xbf16>' not in text32   # the convolutions really run in bf16
  for key in ('cls_logits', 'box_deltas'):
    assert out16[key].dtype == jnp.float32                # heads hand float32 to loss and NMS
    a, b = np.asarray(out16[key]), np.asarray(out32[key])
    assert np.all(np.isfinite(a))
    # bf16 keeps 8 bits of mantissa: ~1% of the output's scale through ~20 layers.
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max(), key


def test_bfloat16_trains_and_evaluates(tmp_path):
  cfg = bf16_config()
  mesh = sharding.make_mesh()
  detector = task_lib.build_task(cfg)
  state = task_lib.create_train_state(detector, cfg, task_lib.init_rng(cfg.seed), mesh)
  assert {x.dtype for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
          if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}

  it = pipeline.make_train_iterator(cfg)
  first = sharding.to_global_batch(next(it), mesh)
  step_fn = train.jit_train_step(detector, cfg, mesh, state).lower(
      state, first, jax.random.key(0)).compile(compiler_options=FAST_COMPILE)
  losses = []
  batch = first
  for step in range(STEPS):
    state, metrics = step_fn(state, batch, jax.random.key(step))
    assert metrics['loss'].dtype == jnp.float32
    losses.append(float(metrics['loss']))
    batch = sharding.to_global_batch(next(it), mesh)
  assert np.all(np.isfinite(losses)) and int(state.bad_step) == -1, losses
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  assert np.mean(losses[-5:]) < 0.5 * losses[0], losses

  evaluator = eval_lib.Evaluator(cfg, task_lib.make_predict_fn(detector, cfg, mesh), mesh)
  gts, dets = evaluator.collect(task_lib.variables_of(state))
  assert len(gts) == len(dets) == 2
  for det in dets:
    assert len(det['scores']) > 0
    assert det['scores'].dtype == np.float32 and det['boxes'].dtype == np.float32
    assert np.all(np.isfinite(det['scores'])) and np.all(np.isfinite(det['boxes']))
    assert np.all((det['scores'] > 0) & (det['scores'] <= 1))
  results = evaluator.run(task_lib.variables_of(state), step=STEPS,
                          out_dir=str(tmp_path / 'eval' / f'step_{STEPS}'))
  assert 0.0 <= results['mAP'] <= 1.0
  assert (tmp_path / 'eval' / f'step_{STEPS}' / 'results.json').exists()
