"""Zero-shot generation settings of the original evaluations, per model kind.

BLIP-2 (`generation`): LAVIS's `projects/blip2/eval/*.yaml`. InstructBLIP (`instruct`): the paper's
prompts ("A short image description:" for captions, "Question: {} Short answer:" for short answers)
and LAVIS's InstructBLIP `generate` / `predict_answers` defaults (beam 5; open answers up to 256
tokens with repetition penalty 1.5; short answers up to 10).
"""

from __future__ import annotations

from typing import Any

CAPTION: dict[str, dict[str, Any]] = {
    "generation": {"prompt": "a photo of", "num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8},
    "instruct": {
        "prompt": "A short image description:",
        "num_beams": 5,
        "max_new_tokens": 256,
        "min_new_tokens": 1,
        "repetition_penalty": 1.5,
        "length_penalty": 1.0,
    },
}
VQA: dict[str, dict[str, Any]] = {
    "generation": {
        "prompt": None,  # the model's VQA template ("Question: {} Short answer:" for FlanT5)
        "num_beams": 5,
        "max_new_tokens": 10,
        "min_new_tokens": 1,
        "length_penalty": None,  # -1 for FlanT5 (encoder-decoder), 0 for OPT (decoder-only)
    },
    "instruct": {
        "prompt": "Question: {} Short answer:",
        "num_beams": 5,
        "max_new_tokens": 10,
        "min_new_tokens": 1,
        "length_penalty": -1.0,
    },
}


def caption_settings(kind: str) -> dict[str, Any]:
    """The captioning settings of a model kind (`Blip2Config.kind`)."""
    return dict(CAPTION[kind])


def vqa_settings(kind: str) -> dict[str, Any]:
    """The VQA settings of a model kind (`Blip2Config.kind`)."""
    return dict(VQA[kind])
