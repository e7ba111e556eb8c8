"""Classical (parameter-free) pansharpening methods, equal to the benchmark MATLAB toolbox.

Each method is a pure function of the toolbox demos' arguments::

  fused = fn(lms, pan, ms_lr, *, sensor, ratio=4, **options)

with ``lms`` (H, W, C) the MS interpolated to the PAN grid (the demos' ``I_MS``), ``pan`` (H, W) the
PAN (``I_PAN``), ``ms_lr`` (H/ratio, W/ratio, C) the MS as acquired (``I_MS_LR``), on the sensor's
scale (0..2047 for 11-bit data); it returns the fused (H, W, C) float64 image on the same scale,
not clipped, as the toolbox returns it. ``METHODS`` maps each method's name (lower case, as the
toolbox's demos spell it: ``'mtf-glp-hpm-r'``) to its function; the families register theirs here.
"""

from __future__ import annotations

from collections.abc import Callable

METHODS: dict[str, Callable] = {}

# One import per family module; each module's METHODS table is merged here.
from u2net_jax.methods import component_substitution as _cs  # noqa: E402

METHODS.update(_cs.METHODS)
from u2net_jax.methods import bdsd as _bdsd  # noqa: E402

METHODS.update(_bdsd.METHODS)
from u2net_jax.methods import multiresolution as _mra  # noqa: E402

METHODS.update(_mra.METHODS)
from u2net_jax.methods import variational as _var  # noqa: E402

METHODS.update(_var.METHODS)
