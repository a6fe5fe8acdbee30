"""Table 2: Shake-Shake 26 2x96d on CIFAR-10; variants plain | gated (default).

Usage: gaternet train --config experiments/cifar10_shake_shake26_2x96d.py:gated --workdir runs/ss96
The same recipe as `cifar10_shake_shake26_2x64d.py` (kept there, in one place), with N = 96.
"""

import importlib.util
import os


def _recipe():
  # Experiment files are loaded by path, not as a package, so the sibling is loaded the same way.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10_shake_shake26_2x64d.py')
  spec = importlib.util.spec_from_file_location('cifar10_shake_shake26_2x64d', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.shake_shake_config


def get_config(arg=None):
  return _recipe()(96, arg)
