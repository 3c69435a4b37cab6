"""Deployment: the Python predictor, the StableHLO and ONNX exports, video input.

Every artifact is checked against the predictor on the same images: the
predictor against `--mode=detect`, StableHLO in a fresh process that imports
jax only, ONNX in onnxruntime (skipped with its reason when the `export` extra
is missing), a generated video through `--mode=detect`.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from smallssd_jax import errors
from smallssd_jax import export as export_lib
from smallssd_jax import predictor as predictor_lib
from smallssd_jax import runner
from smallssd_jax import task as task_lib
from smallssd_jax import video
from smallssd_jax.config_blocks import load_config
from smallssd_jax.datasets import pipeline

pytestmark = pytest.mark.slow

DEFAULT = str(pathlib.Path(__file__).parents[1] / 'configs' / 'default.py')
CONFIG = DEFAULT + ':runlocal'


def run_config():
  cfg = load_config(CONFIG)
  cfg.num_train_steps = 4
  cfg.eval_every_steps = 0
  cfg.data.builtin.num_test = 4
  cfg.eval.num_examples = 4
  cfg.eval.pr_curves = False
  cfg.detect.max_images = 0
  cfg.detect.score_threshold = 0.02
  return cfg


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A runlocal SSD trained for a few steps, and test images of two sizes."""
  workdir = str(tmp_path_factory.mktemp('run'))
  runner.run(run_config(), workdir, 'train')
  source = pipeline.get_source(run_config().data, 'test')
  images = [source[i]['image'] for i in range(4)]
  images[1] = np.asarray(Image.fromarray(images[1]).resize((150, 90)))   # another size
  return workdir, images


@pytest.fixture(scope='module')
def predictor(trained):
  return predictor_lib.Predictor.from_workdir(trained[0])


def assert_same_detections(a, b, box_px: float, score: float):
  """The same detections (class, box, score within tolerances), whatever their order among
  near-equal scores."""
  a_boxes, a_scores, a_classes = a
  b_boxes, b_scores, b_classes = b
  assert len(a_scores) == len(b_scores)
  free = np.ones(len(b_scores), bool)
  for box, s, c in zip(a_boxes, a_scores, a_classes):
    close = (free & (b_classes == c) & (np.abs(b_scores - s) <= score)
             & np.all(np.abs(b_boxes - box) <= box_px, axis=1))
    assert close.any(), f'no match for class {c} score {s} box {box}'
    free[np.argmax(close)] = False


# -------------------------------------------------------------- predictor ---


def test_predictor_equals_detect_mode(trained, predictor, tmp_path):
  workdir, images = trained
  folder = tmp_path / 'images'
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f'img{i}.png')
  cfg = run_config()
  cfg.detect.input = str(folder)
  records = runner.run(cfg, workdir, 'detect')['detections']
  found = predictor([str(folder / f'img{i}.png') for i in range(len(images))])
  assert any(len(f) for f in found), 'the comparison needs detections'
  for record, detections in zip(records, found):
    assert record['detections'] == detections.to_json()
  # One image at a time, arrays instead of paths: the same detections.
  for image, batched in zip(images, found):
    single = predictor(image)
    np.testing.assert_allclose(single.boxes, batched.boxes, atol=1e-3)
    np.testing.assert_allclose(single.scores, batched.scores, atol=1e-6)
    np.testing.assert_array_equal(single.classes, batched.classes)


def test_predictor_boxes_are_in_pixels_of_the_given_image(predictor, trained):
  _, images = trained
  small = images[1]                                  # 90 x 150
  found = predictor(small, score_threshold=0.02)
  raw = predictor.raw(predictor.preprocess(small)[None])
  keep = raw['valid'][0] & (raw['scores'][0] >= 0.02)
  np.testing.assert_allclose(found.boxes, raw['boxes'][0][keep] * [90, 150, 90, 150], atol=1e-3)
  assert found.class_names == tuple(predictor.class_names[c - 1] for c in found.classes)
  np.testing.assert_array_equal(found.boxes_xyxy, found.boxes[:, [1, 0, 3, 2]])
  capped = predictor(small, score_threshold=0.02, max_detections=3)
  assert len(capped) == min(3, len(found))
  np.testing.assert_array_equal(capped.scores, found.scores[:len(capped)])
  higher = predictor(small, score_threshold=0.3)
  assert np.all(higher.scores >= 0.3) and len(higher) <= len(found)


def test_predictor_from_config_and_variables(trained, predictor):
  workdir, images = trained
  config = predictor_lib.read_run_config(workdir)
  again = predictor_lib.Predictor.from_config(config, predictor.variables,
                                              class_names=predictor.class_names)
  a, b = predictor(images[0]), again(images[0])
  np.testing.assert_array_equal(a.boxes, b.boxes)
  np.testing.assert_array_equal(a.scores, b.scores)


def test_predictor_names_what_is_wrong(trained, predictor):
  workdir, images = trained
  with pytest.raises(ValueError, match='single-channel'):
    predictor(images[0][..., 0])
  with pytest.raises(ValueError, match='alpha'):
    predictor(np.concatenate([images[0], images[0][..., :1]], -1))
  with pytest.raises(ValueError, match='uint8'):
    predictor(images[0].astype(np.float32))
  with pytest.raises(ValueError, match='max_detections'):
    predictor(images[0], max_detections=10_000)
  wider = predictor_lib.read_run_config(workdir)
  wider.model.width = wider.model.width * 2
  with pytest.raises(errors.CheckpointError):
    predictor_lib.Predictor.from_workdir(workdir, config=wider)
  with pytest.raises(errors.CheckpointError, match=r'\[8\] in the variables, \[16\] in the model'):
    predictor_lib.Predictor.from_config(wider, predictor.variables)


# -------------------------------------------------------------- StableHLO ---

FRESH_PROCESS = textwrap.dedent('''
    import json, sys, zipfile
    import jax, numpy as np
    with zipfile.ZipFile(sys.argv[1]) as z:
      fn = jax.export.deserialize(bytearray(z.read('exported.bin')))
      meta = json.loads(z.read('metadata.json'))
    images = np.load(sys.argv[2])['images']
    out = {}
    for b in (1, 3):
      boxes, scores, classes, count = fn.call(images[:b])
      out.update({f'boxes{b}': boxes, f'scores{b}': scores, f'classes{b}': classes,
                  f'count{b}': count})
    np.savez(sys.argv[3], **out)
    print(json.dumps({'platforms': list(fn.platforms),
                      'imported': sorted(m for m in ('smallssd_jax', 'flax', 'optax')
                                         if m in sys.modules)}))
''')


def test_stablehlo_runs_without_the_library_and_equals_the_predictor(trained, predictor,
                                                                      tmp_path):
  _, images = trained
  path = str(tmp_path / 'model.jax')
  meta = export_lib.export_stablehlo(predictor, path, platforms=('cpu', 'cuda'))
  assert meta['box_format'].startswith('yxyx normalised')
  assert meta['class_names'] == list(predictor.class_names)
  prepared = np.stack([predictor.preprocess(a) for a in images[:3]])
  assert prepared.dtype == np.uint8
  np.savez(tmp_path / 'in.npz', images=prepared)
  script = tmp_path / 'load.py'
  script.write_text(FRESH_PROCESS)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  done = subprocess.run([sys.executable, str(script), path, str(tmp_path / 'in.npz'),
                         str(tmp_path / 'out.npz')], capture_output=True, text=True, env=env,
                        cwd=tmp_path, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(done.stdout.strip().splitlines()[-1])
  assert report == {'platforms': ['cpu', 'cuda'], 'imported': []}
  out = np.load(tmp_path / 'out.npz')
  size = predictor.input_size
  for b in (1, 3):
    raw = predictor.raw(prepared[:b])
    counts = raw['valid'].sum(1)
    np.testing.assert_array_equal(out[f'count{b}'], counts)
    for i in range(b):
      n = counts[i]
      np.testing.assert_allclose(out[f'boxes{b}'][i, :n] * size, raw['boxes'][i, :n] * size,
                                 atol=1e-3)
      np.testing.assert_allclose(out[f'scores{b}'][i, :n], raw['scores'][i, :n], atol=1e-5)
      np.testing.assert_array_equal(out[f'classes{b}'][i, :n], raw['labels'][i, :n])
      assert not out[f'scores{b}'][i, n:].any() and not out[f'classes{b}'][i, n:].any()


def test_load_stablehlo_names_a_file_that_is_not_an_export(tmp_path):
  bad = tmp_path / 'model.jax'
  bad.write_bytes(b'not a zip')
  with pytest.raises(errors.InputError, match='model.jax'):
    export_lib.load_stablehlo(str(bad))


# ------------------------------------------------------------------- ONNX ---


def assert_onnx_equals_the_predictor(predictor, images, path):
  pytest.importorskip('jax2onnx', reason="ONNX export needs the extra: pip install -e '.[export]'")
  ort = pytest.importorskip('onnxruntime', reason="pip install -e '.[export]'")
  export_lib.export_onnx(predictor, path, batch=2)
  prepared = np.stack([predictor.preprocess(a) for a in images[:2]])
  session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
  boxes, scores, classes, counts = session.run(None, {'images': prepared})
  raw = predictor.raw(prepared)
  size = predictor.input_size
  # Both run the same float32 network with different kernels (summation order):
  # probabilities agree to a few 1e-7, boxes to 1e-4 px. Tolerances of 1e-5 and
  # 1e-2 px leave room for that and nothing else; counts and classes are exact.
  np.testing.assert_array_equal(counts, raw['valid'].sum(1))
  assert counts.min() > 0
  for i in range(2):
    n = counts[i]
    assert_same_detections((boxes[i, :n] * size, scores[i, :n], classes[i, :n]),
                           (raw['boxes'][i, :n] * size, raw['scores'][i, :n], raw['labels'][i, :n]),
                           box_px=1e-2, score=1e-5)


def test_onnx_in_onnxruntime_equals_the_predictor(trained, predictor, tmp_path):
  assert_onnx_equals_the_predictor(predictor, trained[1], str(tmp_path / 'model.onnx'))


def test_a_two_step_model_exports_like_its_predictor(trained, tmp_path):
  """SkipFPN-GRF320 (skip pyramid, GRF modules, two-step head): the refined priors and
  the ARM's background filter are inside both exported graphs."""
  cfg = load_config(DEFAULT + ':model=skipfpn,runlocal')
  cfg.model.head_init = 'xavier'     # spread-out scores at initialisation: no near-ties
  task = task_lib.build_task(cfg)
  variables = task_lib.init_variables(task, cfg, task_lib.init_rng(0))
  predictor = predictor_lib.Predictor.from_config(cfg, variables, class_names=())
  assert predictor.input_size == 320
  path = str(tmp_path / 'model.jax')
  export_lib.export_stablehlo(predictor, path)
  exported, _ = export_lib.load_stablehlo(path)
  prepared = np.stack([predictor.preprocess(a) for a in trained[1][:2]])
  boxes, scores, classes, counts = exported.call(prepared)
  raw = predictor.raw(prepared)
  np.testing.assert_array_equal(counts, raw['valid'].sum(1))
  assert np.asarray(counts).min() > 0
  np.testing.assert_allclose(boxes, raw['boxes'], atol=1e-5)
  np.testing.assert_allclose(scores, raw['scores'], atol=1e-5)
  np.testing.assert_array_equal(classes, np.where(raw['valid'], raw['labels'], 0))
  assert_onnx_equals_the_predictor(predictor, trained[1], str(tmp_path / 'model.onnx'))


def test_a_missing_extra_names_the_pip_line(trained, monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'jax2onnx', None)
  with pytest.raises(errors.MissingExtra, match=r"pip install -e '\.\[export\]'"):
    export_lib.export(trained[0], 'onnx', str(tmp_path / 'm.onnx'))
  monkeypatch.setitem(sys.modules, 'imageio', None)
  monkeypatch.setitem(sys.modules, 'imageio.v2', None)
  with pytest.raises(errors.MissingExtra, match=r"pip install -e '\.\[video\]'"):
    video.open_video(str(tmp_path / 'clip.mp4'))


def test_export_command_line_exit_status(tmp_path):
  done = subprocess.run([sys.executable, '-m', 'smallssd_jax.export',
                         f'--workdir={tmp_path / "nothing"}', f'--out={tmp_path / "m.jax"}'],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == errors.ConfigError.exit_code, done.stderr[-2000:]
  assert 'config.json' in done.stderr


# ------------------------------------------------------------------ video ---


def test_a_video_goes_through_detect_mode(trained, predictor, tmp_path):
  imageio = pytest.importorskip('imageio.v2', reason="video input needs pip install -e '.[video]'")
  pytest.importorskip('imageio_ffmpeg', reason="pip install -e '.[video]'")
  workdir, images = trained
  clip = tmp_path / 'clip.mp4'
  frames = [images[i % 4] if i % 4 != 1 else images[0][:, ::-1] for i in range(5)]
  with imageio.get_writer(str(clip), format='FFMPEG', fps=5, codec='libx264', quality=10,
                          macro_block_size=1) as writer:
    for frame in frames:
      writer.append_data(frame)
  cfg = run_config()
  cfg.detect.input = str(clip)
  result = runner.run(cfg, workdir, 'detect')
  summary = result['video']
  assert summary['frames'] == 5
  record = json.loads(pathlib.Path(summary['json']).read_text())
  assert [f['frame'] for f in record['frames']] == list(range(5))
  decoded = list(imageio.get_reader(str(clip), format='FFMPEG').iter_data())
  assert len(decoded) == 5
  assert any(entry['detections'] for entry in record['frames']), 'the comparison needs detections'
  for frame, entry in zip(decoded, record['frames']):
    assert entry['detections'] == predictor(frame).to_json()
  drawn = list(imageio.get_reader(summary['video'], format='FFMPEG').iter_data())
  assert len(drawn) == 5 and drawn[0].shape == decoded[0].shape
  # max_frames stops early.
  cfg.detect.max_frames = 2
  cfg.detect.name = 'two'
  assert runner.run(cfg, workdir, 'detect')['video']['frames'] == 2


def test_an_unreadable_video_is_named(trained, tmp_path):
  pytest.importorskip('imageio_ffmpeg', reason="pip install -e '.[video]'")
  bad = tmp_path / 'broken.mp4'
  bad.write_bytes(b'\x00' * 1000)
  cfg = run_config()
  cfg.detect.input = str(bad)
  with pytest.raises(errors.InputError, match='broken.mp4'):
    runner.run(cfg, trained[0], 'detect')
