"""A classical method as a scene window fuser: `fuse.py --method=NAME` (issue 22).

  fuser = ClassicalWindowFuser('mtf-glp-hpm', sensor='WV2')
  scene.fuse_files_with(fuser, 'pan.tif', 'ms.tif', 'fused.tif', max_value=2047)

The method's window decomposition is `methods.streaming` (a `Plan`): `windows` makes the plan for
the scene's size (refusing, before any work, a whole-image method on a scene over
`whole_image_limit`), `prepare` runs the statistics passes over the same windows (image-wide
means, covariances, regressions), and `fuse` computes each window on the sensor scale in float64
from the readers' values (the raw values, holes filled: uint8/uint16/float32 data are exact in
them). The statistics skip the nodata pixels (`_Source.valid`, the engine's rule), which the
output marks; without nodata the result equals the method's whole-image function applied to the
scene as the toolbox's demos take it (`I_MS_LR` = the MS, `I_MS` = interp23tap(I_MS_LR), `I_PAN`
= the PAN): bit for bit for the local method, to rounding for the others (`methods.streaming`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from u2net_jax import toolbox
from u2net_jax.data import DataError
from u2net_jax.infer import scene
from u2net_jax.methods import streaming


class _Source:
  """The `methods.streaming` source over the engine's readers: float64 on the sensor scale."""

  def __init__(self, pan, ms):
    self._pan, self._ms = pan, ms
    self.height, self.width, self.bands = pan.height, pan.width, ms.bands

  def pan(self, y0, y1, x0, x1):
    return self._pan.values(y0, y1, x0, x1)[..., 0].astype(np.float64)

  def ms(self, y0, y1, x0, x1):
    return self._ms.values(y0, y1, x0, x1).astype(np.float64)

  def valid(self, y0, y1, x0, x1):
    """The PAN-grid pixels of the window whose output is not nodata (the engine's rule): the
    image-wide statistics are taken over these only, not over the filled holes."""
    readers = {'PAN': self._pan, 'MS': self._ms}
    return ~scene._bad_pixels(readers, y0, y1, x0, x1, self.height // self._ms.height)


class ClassicalWindowFuser(scene.WindowFuser):
  """`methods.METHODS[name]` over a scene, window by window.

  Args:
    method: the method's name (`methods.METHODS`, case-insensitive).
    sensor: the sensor of `toolbox.SENSORS` (MTF gains, band count, ratio).
    whole_image_limit: the largest scene (PAN pixels) a whole-image method reads at once.
  """

  sensor_scale = True  # Strips are float64 on the sensor scale, not divided to [0, 1].

  def __init__(
    self,
    method: str,
    sensor: str,
    whole_image_limit: int = streaming.DEFAULT_WHOLE_IMAGE_LIMIT,
  ):
    try:
      self.method = streaming.check_method(method)
      entry = toolbox.get_sensor(sensor)
    except ValueError as e:
      raise DataError(str(e).replace('sensor: ', f'--sensor={sensor}: ', 1)) from e
    if entry['task'] != 'pansharpening':
      raise DataError(f'--sensor={sensor}: not a pansharpening sensor (the methods take a PAN)')
    self.sensor = entry['name']
    self.bands, self.scale = int(entry['bands']), int(entry['ratio'])
    self.whole_image_limit = int(whole_image_limit)
    self.plan: streaming.Plan | None = None
    self._windows: list[scene.Window] = []

  def windows(self, height: int, width: int, window: int) -> list[scene.Window]:
    if window % self.scale:
      raise DataError(f'--window={window} must be a multiple of the ratio {self.scale}')
    try:
      self.plan = streaming.make_plan(
        self.method,
        sensor=self.sensor,
        height=height,
        width=width,
        bands=self.bands,
        whole_image_limit=self.whole_image_limit,
      )
    except streaming.StreamingError as e:
      raise DataError(str(e)) from e
    self.halo = self.plan.halo
    self._windows = super().windows(height, width, window)
    return self._windows

  def prepare(self, pan, ms) -> None:
    source = _Source(pan, ms)
    for _ in range(self.plan.passes):  # Statistics, window by window (methods.streaming).
      for w in self._windows:
        for reader in (pan, ms):
          reader.start_window()
        self.plan.accumulate(source, (w.y0, w.y1, w.x0, w.x1))
      for reader in (pan, ms):
        reader.start_window()
      self.plan.finalize(source)

  def fuse(self, pan, ms, w: scene.Window) -> Iterator[tuple[int, np.ndarray]]:
    if w.y1 > w.y0 and w.x1 > w.x0:
      yield 0, self.plan.fuse(_Source(pan, ms), (w.y0, w.y1, w.x0, w.x1))

  def identity(self) -> dict[str, Any]:
    return {
      'method': self.method,
      'sensor': self.sensor,
      'kind': streaming.kind(self.method, self.bands),
    }


def from_flags(flags) -> ClassicalWindowFuser:
  """The fuser `fuse.py --method=NAME --sensor=S [--whole_image_limit=N]` asks for.

  Raises:
    DataError: no --sensor (there is no workdir to take it from), a network-only flag, an
      unknown method or sensor, a limit that is not positive.
  """
  if flags.sensor is None:
    names = ', '.join(n for n, e in toolbox.SENSORS.items() if e['task'] == 'pansharpening')
    raise DataError(
      f'--method={flags.method} needs --sensor (its MTF gains, band count and ratio come from '
      f'the sensor table: {names}); there is no workdir to take it '
      'from'
    )
  for name in ('step', 'tile_batch'):
    if flags[name].value is not None:
      raise DataError(f'--{name} chooses a network checkpoint or batch; --method takes none')
  limit = flags.whole_image_limit
  if limit is not None and limit <= 0:
    raise DataError(f'--whole_image_limit={limit} must be a positive number of PAN pixels')
  if limit is None:
    limit = streaming.DEFAULT_WHOLE_IMAGE_LIMIT
  return ClassicalWindowFuser(flags.method, flags.sensor, whole_image_limit=limit)


def scene_options(flags, fuser: ClassicalWindowFuser) -> dict[str, Any]:
  """`scene.fuse_files_with`'s keyword arguments from `fuse.py`'s flags (max_value: the
  sensor's unless --max_value)."""
  max_value = flags.max_value
  if max_value is None:
    max_value = float(toolbox.get_sensor(fuser.sensor)['max_value'])
  return dict(
    max_value=max_value,
    dtype=flags.dtype,
    window=flags.window,
    overwrite=flags.overwrite,
    cog=flags.cog,
    pan_key=flags.pan_key,
    ms_key=flags.ms_key,
    progress=flags.progress,
    nodata=flags.nodata,
    allow_off_scale=flags.allow_off_scale,
    rescale_output=flags.rescale_output,
  )
