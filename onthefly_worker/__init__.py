"""Worker side of OnTheFly: the Trainer, quickstart, and the role runners."""

from onthefly_worker.config import TrainerConfig
from onthefly_worker.errors import OnTheFlyError
from onthefly_worker.quickstart import quickstart
from onthefly_worker.trainer import Trainer

__all__ = ["OnTheFlyError", "Trainer", "TrainerConfig", "quickstart"]
