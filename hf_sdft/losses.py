"""Deprecated: the losses moved to :mod:`hf_sdft.trainer.losses` (pure divergences) and
:mod:`hf_sdft.trainer.fused` (the fused heads-in-the-loss pass). This module re-exports both for
one release and warns on import."""

import warnings

from hf_sdft.trainer.fused import *  # noqa: F401,F403
from hf_sdft.trainer.fused import fused_linear_distillation_loss, fused_linear_kd_ce_loss  # noqa: F401
from hf_sdft.trainer.losses import *  # noqa: F401,F403
from hf_sdft.trainer.losses import (  # noqa: F401
    distillation_loss,
    label_logprobs,
    mean_label_probability,
    token_cross_entropy,
    topk_distillation_loss,
)

warnings.warn("hf_sdft.losses is deprecated: import from hf_sdft.trainer.losses (divergences) or "
              "hf_sdft.trainer.fused (the fused loss); the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
