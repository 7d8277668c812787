"""An InstructBLIP checkpoint as users call it: a `Captioner` whose prompts also reach the Q-Former.

```python
captioner = blip2.load("Salesforce/instructblip-flan-t5-xl", dtype="bfloat16", device="cuda")
captioner.ask("dog.jpg", "what is the dog sitting on?")   # the question goes to the Q-Former and the LLM
captioner.ask(Video("clip.mp4"), "what is the man doing?")  # a video wherever an image goes
```

Every prompt (a caption prompt, a question in its template, a conversation) is tokenized twice: by the
LLM's tokenizer for the LLM, and by the Q-Former's BERT tokenizer (cut from the left to 128 tokens, as
InstructBLIP does) for the Q-Former.

A `Video` (a file, or a list of frames) goes wherever these methods take an image: its frames are
processed as images, `(B, T, 3, S, S)`, and the model lays their query outputs end to end
(`InstructBridge`). A list is still a batch: `[Video(a), Video(b)]` is two clips, and a list of PIL
images is that many images, never one clip.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from blip2.errors import UserError
from blip2.interop.hf import VIDEO_FRAMES
from blip2.pipelines.base import is_batch
from blip2.pipelines.captioner import Captioner
from blip2.processing import ImageLike, ImageProcessor

INSTRUCTION_TOKENS = 128  # InstructBLIP's Q-Former reads at most this many instruction tokens


@dataclass
class Video:
    """A video clip, given where `InstructCaptioner` takes an image.

    Attributes:
        source: a video file (a path, or its bytes), decoded with PyAV and `num_frames` frames sampled
            uniformly (`blip2.video.read_frames`); or the clip's frames, a list of images (paths, PIL
            images, arrays, ...) used as given.
        num_frames: the frames read from a file; None: the model's (`Blip2Config.video_frames`, else 4).
    """

    source: str | os.PathLike[str] | bytes | Sequence[ImageLike]
    num_frames: int | None = None

    def frames(self, default: int) -> list[ImageLike]:
        """The clip's frames: read from the file (`num_frames`, else `default` of them), or as given."""
        from blip2.video import read_frames

        if isinstance(self.source, (str, os.PathLike, bytes)):
            return read_frames(self.source, default if self.num_frames is None else self.num_frames)
        frames = list(self.source)
        if not frames:
            raise UserError("a video has no frames: give a video file or a list of at least one image")
        return frames


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

    def pixels(self, images: ImageLike | Video | Sequence[ImageLike | Video]) -> Tensor:
        """`Captioner.pixels` for images; clips (`Video`) to `(B, T, 3, S, S)` frames on the device,
        every clip of a batch with as many frames."""
        batch = list(images) if is_batch(images) else [images]
        clips = [item for item in batch if isinstance(item, Video)]
        if not clips:
            return super().pixels(images)
        if len(clips) != len(batch):
            raise UserError("a batch holds both images and videos: ask about them in separate calls")
        frames = [clip.frames(self.config.video_frames or VIDEO_FRAMES) for clip in clips]
        if len({len(f) for f in frames}) > 1:
            raise UserError(
                f"the videos of one batch have {sorted({len(f) for f in frames})} frames: give each as many"
            )
        pixels = self.image_processor([f for clip in frames for f in clip])  # (B * T, 3, S, S)
        return pixels.unflatten(0, (len(frames), -1)).to(self.device)  # (B, T, 3, S, S)

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

    def _tokenizers(self) -> tuple[Any, Any]:
        return self.llm_tokenizer, self.qformer_tokenizer
