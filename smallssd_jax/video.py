"""Detect mode on a video file or a camera: an annotated video and per-frame JSON.

Decoding and encoding go through imageio with imageio-ffmpeg's bundled ffmpeg
binary, the optional `video` extra (`pip install 'smallssd-jax[video]'`).
`--config.detect.input` names a video file (by its suffix, `VIDEO_SUFFIXES`)
or a camera (`<video0>`, ffmpeg's device name through imageio).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Iterator

from absl import logging
import numpy as np
import tqdm

from smallssd_jax import detect as detect_lib
from smallssd_jax import errors

VIDEO_SUFFIXES = ('.mp4', '.m4v', '.mov', '.avi', '.mkv', '.webm', '.mpg', '.mpeg', '.wmv', '.flv')
INSTALL_HINT = ("pip install 'smallssd-jax[video]' (from a clone: pip install -e '.[video]')")


def is_camera(spec: str) -> bool:
  return spec.startswith('<video') and spec.endswith('>')


def is_video(spec: str) -> bool:
  """True for a camera name or a file with a video suffix."""
  return is_camera(spec) or pathlib.Path(spec).suffix.lower() in VIDEO_SUFFIXES


def _imageio():
  try:
    import imageio.v2 as imageio  # pylint: disable=g-import-not-at-top
    import imageio_ffmpeg  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise errors.MissingExtra(f'video input needs imageio and imageio-ffmpeg ({e}): '
                              f'{INSTALL_HINT}') from None
  return imageio


def open_video(spec: str) -> tuple[Any, float, int | None]:
  """(reader, frames per second, frame count or None when unknown) of a video file or camera."""
  imageio = _imageio()
  if not is_camera(spec) and not os.path.isfile(spec):
    raise FileNotFoundError(f'video not found: {spec}')
  try:
    reader = imageio.get_reader(spec, format='FFMPEG')
    meta = reader.get_meta_data()
  except (OSError, RuntimeError, ValueError, IndexError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise errors.InputError(f'cannot read video {spec}: {first}') from None
  fps = float(meta.get('fps') or 0.0) or 25.0
  frames = None
  duration = meta.get('duration')
  nframes = meta.get('nframes')
  if isinstance(nframes, (int, float)) and math.isfinite(nframes) and nframes > 0:
    frames = int(nframes)
  elif isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0:
    frames = int(round(duration * fps))
  return reader, fps, frames


def frames_of(reader, spec: str) -> Iterator[np.ndarray]:
  """The frames of an open reader as uint8 [H, W, 3] RGB; a decoding error names the video."""
  index = 0
  iterator = iter(reader)
  while True:
    try:
      frame = next(iterator)
    except StopIteration:
      return
    except (OSError, RuntimeError, ValueError) as e:
      raise errors.InputError(f'cannot decode frame {index} of {spec}: {e}') from None
    frame = np.asarray(frame)
    if frame.ndim == 2:
      frame = np.stack([frame] * 3, -1)
    yield np.ascontiguousarray(frame[..., :3])
    index += 1


def _even(frame: np.ndarray) -> np.ndarray:
  """Pads one edge row / column so that H.264 (4:2:0) accepts the frame size."""
  h, w = frame.shape[:2]
  if h % 2 or w % 2:
    frame = np.pad(frame, [(0, h % 2), (0, w % 2), (0, 0)], mode='edge')
  return frame


def detect_video(predictor: Callable, spec: str, out_dir: str, max_frames: int = 0,
                 batch_size: int = 1) -> dict[str, Any]:
  """Runs `predictor` (a predictor.Predictor) on every frame of `spec`.

  Writes `out_dir/<name>.mp4` (the frames with their detections drawn, at the
  source's frame rate) and `out_dir/<name>.json` (`{"video", "fps",
  "frames": [{"frame": i, "detections": [...]}]}`, boxes in pixels of the
  frame). `max_frames` > 0 stops after that many (a camera runs until then,
  or until interrupted). Returns the summary that is printed.
  """
  imageio = _imageio()
  reader, fps, total = open_video(spec)
  name = 'camera' if is_camera(spec) else pathlib.Path(spec).stem
  os.makedirs(out_dir, exist_ok=True)
  video_path = os.path.join(out_dir, f'{name}.mp4')
  json_path = os.path.join(out_dir, f'{name}.json')
  if max_frames:
    total = min(total, max_frames) if total else max_frames
  records: list[dict[str, Any]] = []
  writer = imageio.get_writer(video_path, format='FFMPEG', fps=fps, codec='libx264',
                              macro_block_size=1, quality=8)
  frames = frames_of(reader, spec)
  if max_frames:
    frames = (f for i, f in zip(range(max_frames), frames))
  start = time.perf_counter()
  try:
    with tqdm.tqdm(total=total, unit='frame', desc=name, mininterval=1.0) as bar:
      for frame, found in predictor.stream(frames, batch_size=batch_size):
        drawn = detect_lib.draw_detections(frame, found.boxes, found.scores, found.classes,
                                           found.class_names or ())
        writer.append_data(_even(drawn))
        records.append({'frame': len(records), 'detections': found.to_json()})
        bar.update(1)
  except KeyboardInterrupt:
    logging.warning('Interrupted after %d frames; writing what was done.', len(records))
  finally:
    writer.close()
    reader.close()
    seconds = time.perf_counter() - start
    with open(json_path, 'w') as f:
      json.dump({'video': spec, 'fps': fps, 'frames': records}, f, indent=1)
  if not records:
    raise errors.InputError(f'{spec} has no frames')
  summary = {'frames': len(records), 'seconds': seconds,
             'frames_per_second': len(records) / max(seconds, 1e-9),
             'video': video_path, 'json': json_path}
  print(f'{len(records)} frames in {seconds:.1f} s ({summary["frames_per_second"]:.1f} frames/s, '
        f'detection and drawing): {video_path}, {json_path}', flush=True)
  return summary
