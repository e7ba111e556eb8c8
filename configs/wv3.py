"""WorldView-3 pansharpening (PanCollection), the paper's recipe (Table 1).

python train.py --config=configs/wv3.py
"""

from configs import default


def get_config():
  return default.get_config()  # The defaults are the WV3 recipe.
