"""An InstructBLIP checkpoint as users call it: a `Captioner` whose prompts also reach the Q-Former.

```python
captioner = blip2.load("Salesforce/instructblip-flan-t5-xl", dtype="bfloat16", device="cuda")
captioner.ask("dog.jpg", "what is the dog sitting on?")   # the question goes to the Q-Former and the LLM
```

Every prompt (a caption prompt, a question in its template, a conversation) is tokenized twice: by the
LLM's tokenizer for the LLM, and by the Q-Former's BERT tokenizer (cut from the left to 128 tokens, as
InstructBLIP does) for the Q-Former.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from blip2.pipelines.captioner import Captioner
from blip2.processing import ImageProcessor

INSTRUCTION_TOKENS = 128  # InstructBLIP's Q-Former reads at most this many instruction tokens
QFORMER_TOKENIZER = "qformer_tokenizer"  # its subfolder in a saved folder (transformers' layout)


class InstructCaptioner(Captioner):
    """An InstructBLIP model with its image processor and both tokenizers.

    Attributes:
        model: `InstructBridge`.
        llm_tokenizer: the LLM's tokenizer.
        qformer_tokenizer: the Q-Former's BERT tokenizer, truncating from the left.
    """

    checkpoint_kind: ClassVar[str] = "an InstructBLIP checkpoint such as Salesforce/instructblip-flan-t5-xl"

    def __init__(
        self,
        model: nn.Module,
        image_processor: ImageProcessor,
        llm_tokenizer: Any,
        qformer_tokenizer: Any | None = None,
    ):
        """`qformer_tokenizer`: default bert-base-uncased with `[DEC]` (`blip2.tokenizers.qformer_tokenizer`)."""
        from blip2 import tokenizers

        super().__init__(model, image_processor, llm_tokenizer)
        if qformer_tokenizer is None:
            qformer_tokenizer = tokenizers.qformer_tokenizer(self.config.tokenizer, truncation_side="left")
        qformer_tokenizer.truncation_side = "left"  # the end of an instruction is the question
        self.qformer_tokenizer = qformer_tokenizer

    def _encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The LLM's inputs (`Captioner`'s) and the same prompts for the Q-Former (`qformer_input_ids`,
        `qformer_attention_mask`), right padded."""
        limit = min(INSTRUCTION_TOKENS, self.config.qformer.max_position_embeddings)
        enc = self.qformer_tokenizer(
            list(prompts), padding=True, truncation=True, max_length=limit, return_tensors="pt"
        )
        return {
            **super()._encode_prompts(prompts),
            "qformer_input_ids": enc["input_ids"].to(self.device),
            "qformer_attention_mask": enc["attention_mask"].to(self.device),
        }

    def _save_tokenizer(self, path: Path, image_processor: Any) -> None:
        from transformers import InstructBlipProcessor

        InstructBlipProcessor(
            image_processor=image_processor,
            tokenizer=self.llm_tokenizer,
            qformer_tokenizer=self.qformer_tokenizer,
            num_query_tokens=self.config.qformer.num_query_tokens,
        ).save_pretrained(str(path))
