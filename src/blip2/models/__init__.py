"""Pure modules: tensors in, dataclass outputs out. No tokenizing, no file reading, no torch.distributed."""

from blip2.models.blip2 import ImageEmbedding, Stage1Model, Stage1Output
from blip2.models.encoders import ImageEncoder
from blip2.models.qformer import QFormer, QFormerOutput
from blip2.models.stage2 import Stage2Model, Stage2Output

__all__ = [
    "ImageEmbedding",
    "ImageEncoder",
    "QFormer",
    "QFormerOutput",
    "Stage1Model",
    "Stage1Output",
    "Stage2Model",
    "Stage2Output",
]
