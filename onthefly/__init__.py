"""OnTheFly: take control of PyTorch training while it runs.

    from onthefly import Trainer, attach_lightning, quickstart, load_model

Importing this package applies the session seed (ONTHEFLY_SEED, default 0; `none`
disables it) to python, numpy and torch once per process. Every worker re-runs the
user's script, so this is what makes the data a script builds with `torch.randn` the same
in the generalist, its forks and a restarted worker.
"""

from __future__ import annotations

import random as _random

import numpy as _np
import torch as _torch

from onthefly_worker import env as _env

_seed = _env.session_seed()
if _seed is not None:
    _random.seed(_seed)
    _np.random.seed(_seed % 2**32)
    _torch.manual_seed(_seed)

from onthefly_worker import OnTheFlyError, Trainer, TrainerConfig, quickstart  # noqa: E402
from onthefly_worker.lightning import attach_lightning  # noqa: E402
from onthefly_worker.moe import load_model  # noqa: E402

__all__ = [
    "OnTheFlyError",
    "Trainer",
    "TrainerConfig",
    "attach_lightning",
    "load_model",
    "quickstart",
]
__version__ = "0.1.0"
