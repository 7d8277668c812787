"""Suite-wide settings: tiny models run faster on one intra-op thread (and leave the other core to
the subprocesses some tests start)."""

import torch

torch.set_num_threads(1)
