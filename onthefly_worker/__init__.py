"""Worker side of OnTheFly: the Trainer, quickstart, and the role runners."""

import os as _os

# DataLoader workers fork this process while its gRPC stream is open. They never use gRPC,
# so gRPC's fork handlers have nothing to do; left on, they log "Other threads are
# currently calling into gRPC, skipping fork() handlers" into the user's output on every
# fork. Set before gRPC is first imported; a value the user set wins.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from onthefly_worker.config import TrainerConfig
from onthefly_worker.errors import OnTheFlyError
from onthefly_worker.quickstart import quickstart
from onthefly_worker.trainer import Trainer

__all__ = ["OnTheFlyError", "Trainer", "TrainerConfig", "quickstart"]
