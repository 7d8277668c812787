"""Pure modules: tensors in, dataclass outputs out. No loss, no decode policy, no tokenizing, no file
reading, no torch.distributed.

* `query_encoder.py`: `QueryEncoder`, what both kinds share (image tower + `ln_vision` + Q-Former +
  queries);
* `retrieval.py`: `RetrievalModel`, stage 1's heads (ITC projections, ITM head, ITG head);
* `bridge.py`: `LanguageBridge`, stage 2's projection into a frozen LLM;
* `instruct.py`: `InstructBridge`, InstructBLIP's bridge (the Q-Former also reads the instruction);
* `qformer.py`, `encoders.py`, `language.py`: the Q-Former, the frozen image towers, LLM helpers.

One name per tensor, everywhere:

| name | shape | what |
| --- | --- | --- |
| `pixel_values` | `(B, 3, H, W)` | processed images |
| `image_features` | `(B, N, Dv)` | frozen tower output, before `ln_vision` (what a feature cache stores) |
| `image_embeds` | `(B, N, Dv)` | after `ln_vision`: what the Q-Former's cross-attention reads |
| `image_kv` | per layer `(B, heads, N, d)` x 2 | `image_embeds` projected to cross-attention keys/values |
| `query_output` | `(B, Q, D)` | the Q-Former's query outputs |
| `image_feats` | `(B, Q, E)` | normalized `vision_proj(query_output)`, for ITC |
| `text_feats` | `(B, E)` | normalized `text_proj` of the text's [CLS] output, for ITC |
| `prefix` | `(B, Q, d_llm)` | `language_projection(query_output)`: the LLM's soft visual prompt |
| `qformer_input_ids` | `(B, I)` | an instruction in the Q-Former's (BERT) vocabulary, read beside the queries (InstructBLIP) |

Dtypes: a config names one as a string from `blip2.config.DTYPES` ("float32", "bfloat16",
"float16"); code holds a `torch.dtype` (`encoders.torch_dtype` turns one into the other).
"""

from blip2.models.bridge import LanguageBridge, LMOutput
from blip2.models.encoders import ImageEncoder
from blip2.models.instruct import InstructBridge
from blip2.models.qformer import QFormer, QFormerOutput
from blip2.models.query_encoder import QueryEncoder
from blip2.models.retrieval import ImageEmbedding, ITGOutput, RetrievalModel

__all__ = [
    "ITGOutput",
    "ImageEmbedding",
    "ImageEncoder",
    "InstructBridge",
    "LMOutput",
    "LanguageBridge",
    "QFormer",
    "QFormerOutput",
    "QueryEncoder",
    "RetrievalModel",
]
