"""`from onthefly.lightning import attach_lightning`: the Lightning entry point on its own.

The same function is exported as `onthefly.attach_lightning`; this module exists for
scripts that prefer to name the integration they use. Lightning itself is imported only
when `attach_lightning` is called.
"""

from onthefly_worker.lightning import (
    LightningAttachment,
    LightningOptions,
    attach_lightning,
    normalize_model_factory,
)

__all__ = ["LightningAttachment", "LightningOptions", "attach_lightning", "normalize_model_factory"]
