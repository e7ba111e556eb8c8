"""Inference: tiling, scene streaming, the evaluation protocols and their reports.

Modules:
  tiling: the official tiling geometry and batched jitted tile inference (`Fuser`).
  scene: scene fusion for `fuse.py` (windowed GeoTIFF/array I/O, georeference, the streaming loop).
  eval_lib: the evaluation protocols, test-set sources and the loop of `evaluate.py`.
  reporting: tables, CSV/JSON/.mat outputs, PNG previews.
"""
