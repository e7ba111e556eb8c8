"""Inference: tiling, scene streaming, the evaluation protocols and their reports.

Modules:
  tiling: the official tiling geometry and batched jitted tile inference (`Fuser`).
  scene: the scene streaming engine of `fuse.py` (any `WindowFuser`, window by window).
  network_fuser: a network as a window fuser (the official tiling over the tile grid, lms).
  eval_lib: the evaluation protocols, test-set sources and the loop of `evaluate.py`.
  reporting: tables, CSV/JSON/.mat outputs, PNG previews.
"""
