"""BatchNorm as MAML's published code uses it: always the statistics of the batch it is given."""
from __future__ import annotations

from torch import nn


def batch_statistics_only(model: nn.Module) -> nn.Module:
    """Make every BatchNorm layer normalise with batch statistics, in train and eval mode alike."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model
