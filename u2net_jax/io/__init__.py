"""Files: the `.pth` reader that trusts nothing, and atomic files and folders.

Modules:
  pth_reader: reads PyTorch `.pth` checkpoints without unpickling code.
  fileio: atomic files and folders (every output goes through it).
  raster_sinks: scene outputs (GeoTIFF/COG, .npy, .mat) written window by window.
"""
