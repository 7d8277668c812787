"""What users call: `blip2.load(...)` returns one `Pipeline` holding the model, the image processor and
the tokenizers, with `caption` / `ask` (stage-2 models) and `match` / `similarity` (stage-1 models).

```python
import blip2

captioner = blip2.load("Salesforce/blip2-opt-2.7b", dtype="float16", device="cuda")
captioner.caption("dog.jpg")                               # "a dog sitting on the beach"
captioner.ask("dog.jpg", "what is the dog sitting on?")    # "sand"

retriever = blip2.load("Salesforce/blip2-itm-vit-g")
retriever.match(["dog.jpg", "cat.jpg"], ["a dog", "a dog"])   # tensor([0.97, 0.02]): one per pair
retriever.similarity(["dog.jpg", "cat.jpg"], ["a dog", "a cat"])  # (2, 2) cosine matrix
```

`load` takes a hub id, a transformers BLIP-2 folder, a folder written by `save_pretrained`, or a LAVIS
checkpoint file with the preset it belongs to. `save_pretrained` writes a folder transformers also
loads (`Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval`) whenever it has the class.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from blip2.config import DTYPES, PRESETS, Blip2Config, preset
from blip2.errors import UserError
from blip2.hub import looks_like_hub_id, resolve
from blip2.interop import checkpoint, hf, lavis
from blip2.processing import ImageLike, ImageProcessor

IMAGE_TOKEN = "<image>"

# hub repositories whose name is not a preset name
HUB_PRESETS = {"blip2-itm-vit-g": "blip2-stage1-vit-g", "blip2-itm-vit-g-coco": "blip2-stage1-vit-g-coco"}

CAPTION_DEFAULTS: dict[str, Any] = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 1}
ASK_DEFAULTS: dict[str, Any] = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1}


class Pipeline:
    """A loaded BLIP-2 model with its image processor and tokenizers.

    Attributes:
        model: `Stage1Model` (retrieval: `match`, `similarity`) or `Stage2Model` (`caption`, `ask`).
        image_processor: images to pixel tensors (transformers' BLIP processor, bit for bit).
        qformer_tokenizer: the Q-Former's BERT tokenizer (stage 1), else None.
        llm_tokenizer: the LLM's tokenizer (stage 2), else None.
    """

    def __init__(
        self,
        model: nn.Module,
        image_processor: ImageProcessor,
        qformer_tokenizer: Any = None,
        llm_tokenizer: Any = None,
    ):
        self.model = model.eval()
        self.image_processor = image_processor
        self.qformer_tokenizer = qformer_tokenizer
        self.llm_tokenizer = llm_tokenizer
        if self.config.stage == 2:
            if llm_tokenizer is None:
                raise ValueError("a stage-2 pipeline needs the LLM's tokenizer")
            eos_text = self.config.llm.eos_text
            if eos_text:
                self.model.eos_token_id = _first_id(llm_tokenizer, eos_text)
        elif qformer_tokenizer is None:
            raise ValueError("a stage-1 pipeline needs the Q-Former's tokenizer")

    # ------------------------------------------------------------------------------------- basics

    @property
    def config(self) -> Blip2Config:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.query_tokens.device

    def to(self, device: str | torch.device) -> Pipeline:
        self.model.to(device)
        return self

    def __repr__(self) -> str:
        kind = "stage 2 (caption, ask)" if self.config.stage == 2 else "stage 1 (match, similarity)"
        return f"Pipeline({self.config.name or 'blip2'}: {kind}, device={self.device})"

    def pixels(self, images: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Images (paths, PIL images, arrays, ...) to `(B, 3, S, S)` pixel values on the model's device."""
        return self.image_processor(images).to(self.device)

    def _require(self, stage: int, what: str) -> None:
        if self.config.stage != stage:
            other = "stage-2 (captioning)" if stage == 2 else "stage-1 (retrieval)"
            raise UserError(f"{what} needs a {other} model; this one is stage {self.config.stage}")

    # ------------------------------------------------------------------------------------- stage 2

    @torch.no_grad()
    def generate(
        self, images: ImageLike | Sequence[ImageLike], prompts: Sequence[str], **generate_options: Any
    ) -> list[str]:
        """Text generated for each image after its prompt (new text only, stripped)."""
        self._require(2, "generate")
        tok = self.llm_tokenizer
        tok.padding_side = "left" if not self.model.is_encoder_decoder else "right"
        enc = tok(list(prompts), padding=True, return_tensors="pt")
        input_ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        if input_ids.shape[1] == 0:
            input_ids = mask = None
        ids = self.model.generate(self.pixels(images), input_ids, mask, **generate_options)
        return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]

    def caption(
        self, images: ImageLike | Sequence[ImageLike], prompt: str | None = None, **generate_options: Any
    ) -> str | list[str]:
        """Caption one image (a string back) or several (a list).

        Args:
            images: a path, PIL image, array or tensor, or a list of them.
            prompt: text the caption continues (default: the checkpoint's, e.g. "a photo of" for COCO).
            generate_options: transformers `generate` options; default beam search with 5 beams and at
                most 30 new tokens (LAVIS's captioning settings).
        """
        self._require(2, "caption")
        batch = _as_list(images)
        prompt = self.config.llm.prompt if prompt is None else prompt
        out = self.generate(batch, [prompt] * len(batch), **{**CAPTION_DEFAULTS, **generate_options})
        return out if isinstance(images, (list, tuple)) else out[0]

    def ask(
        self,
        images: ImageLike | Sequence[ImageLike],
        questions: str | Sequence[str],
        **generate_options: Any,
    ) -> str | list[str]:
        """Answer questions about images: one question per image, or one image or question for all.

        Questions are put in the checkpoint's template ("Question: {} Answer:" for OPT, "Question: {}
        Short answer:" for FlanT5). Default generation: 5 beams, at most 10 new tokens.
        """
        self._require(2, "ask")
        batch, qs = _as_list(images), [questions] if isinstance(questions, str) else list(questions)
        batch, qs = _broadcast(batch, qs, "images", "questions")
        template = self.config.llm.vqa_template
        opts = {**ASK_DEFAULTS, "length_penalty": -1.0 if self.model.is_encoder_decoder else 0.0}
        out = self.generate(batch, [template.format(q) for q in qs], **{**opts, **generate_options})
        single = not isinstance(images, (list, tuple)) and isinstance(questions, str)
        return out[0] if single else out

    # ------------------------------------------------------------------------------------- stage 1

    def _text(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        enc = self.qformer_tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.config.max_txt_len,
            return_tensors="pt",
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def match(self, images: ImageLike | Sequence[ImageLike], texts: str | Sequence[str]) -> Tensor:
        """ITM probability that each (image, text) pair matches, `(N,)`; one image or text may be
        paired with all of the others."""
        self._require(1, "match")
        batch, txt = _as_list(images), [texts] if isinstance(texts, str) else list(texts)
        batch, txt = _broadcast(batch, txt, "images", "texts")
        image_embeds = self.model.encode_image(self.pixels(batch))
        ids, mask = self._text(txt)
        logits = self.model.itm_logits(ids, mask, image_embeds=image_embeds)  # (N, 2)
        return logits.float().softmax(dim=-1)[:, 1]

    @torch.no_grad()
    def similarity(self, images: ImageLike | Sequence[ImageLike], texts: str | Sequence[str]) -> Tensor:
        """ITC cosine similarity of every image with every text, `(N_images, N_texts)`: the best of the
        image's query embeddings for each text, without temperature (as transformers reports it)."""
        self._require(1, "similarity")
        image_feats = self.model.embed_image(self.pixels(_as_list(images))).image_feats
        ids, mask = self._text([texts] if isinstance(texts, str) else list(texts))
        return self.model.itc_scores(image_feats, self.model.embed_text(ids, mask)).float()

    # ------------------------------------------------------------------------------------- saving

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write the model, its configs, the image processor and the tokenizer to a folder.

        Where transformers has the class, the folder loads there unchanged
        (`Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval.from_pretrained(path)`). A
        stage-2 model without an `<image>` token gets one first (added to the tokenizer, the LLM's
        embedding table grown if needed), as transformers' layout requires.
        """
        path = Path(path)
        if self.config.stage == 2:
            _ensure_image_token(self.model, self.llm_tokenizer)
        checkpoint.save_folder(self.model, path)
        hf_processor = _to_transformers_image_processor(self.image_processor)
        hf_processor.save_pretrained(str(path))
        if self.config.stage == 2:
            from transformers import Blip2Processor

            Blip2Processor(
                image_processor=hf_processor,
                tokenizer=self.llm_tokenizer,
                num_query_tokens=self.config.qformer.num_query_tokens,
            ).save_pretrained(str(path))
        else:
            self.qformer_tokenizer.save_pretrained(str(path))


# ------------------------------------------------------------------------------------------- loading


def load(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    preset: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    vision_weights: str | os.PathLike[str] | None = None,
    llm: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> Pipeline:
    """Load a BLIP-2 model with its image processor and tokenizers.

    Args:
        name_or_path: one of
            - a hub id (`Salesforce/blip2-opt-2.7b`, `-opt-6.7b`, `-flan-t5-xl`, `-flan-t5-xxl`, the
              `-coco` variants, `blip2-itm-vit-g`): downloaded or taken from the hub cache;
            - a transformers BLIP-2 folder (`config.json` + weights), or a folder from `save_pretrained`;
            - a LAVIS checkpoint file (`blip2_pretrained_opt2.7b.pth`, ...); give `preset` unless the
              file has its released name.
        device: where to put the model (default CPU).
        dtype: "float32" (default), "bfloat16" or "float16" for the frozen image encoder and LLM; the
            Q-Former, queries, `ln_vision` and projection stay in float32.
        preset: the preset a LAVIS checkpoint belongs to (`blip2 presets` lists them).
        revision, cache_dir, local_files_only: hub options (`huggingface_hub.snapshot_download`).
        vision_weights: LAVIS file of the image encoder (`eva_vit_g.pth`, `clip_vit_L.pth`) for LAVIS
            checkpoints without one; default: that file name beside the checkpoint.
        llm: the LLM (transformers folder or hub id) of a LAVIS stage-2 checkpoint; default: the
            preset's (`facebook/opt-2.7b`, `google/flan-t5-xl`, ...).
        tokenizer: the tokenizer folder or hub id when the checkpoint has none beside it.

    Raises:
        UserError: a missing path, an unreachable hub id, a checkpoint that does not fit (naming the
            keys), an unknown dtype or preset.
    """
    dtype_name = _dtype_name(dtype)
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    name = os.fspath(name_or_path)
    path = resolve(name, **hub)
    if path.is_file():
        pipe = _load_lavis(path, preset, dtype_name, vision_weights, llm, tokenizer, hub)
    elif checkpoint.is_our_folder(path):
        config = checkpoint.with_dtype(checkpoint.read_config(path), dtype_name)
        model = checkpoint.load_folder(path, config)
        pipe = _pipeline(model, path, tokenizer, hub)
    elif (path / "config.json").is_file():
        hf_config = json.loads((path / "config.json").read_text())
        config = hf.config_from_transformers(hf_config, name=path.name)
        config = _with_preset_conventions(config, _hub_preset(name) if looks_like_hub_id(name) else preset)
        model = checkpoint.load_folder(path, checkpoint.with_dtype(config, dtype_name))
        pipe = _pipeline(model, path, tokenizer, hub)
    else:
        raise UserError(f"{path} is neither a BLIP-2 folder (no config.json) nor a checkpoint file")
    return pipe.to(device) if device is not None else pipe


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return dtype


def _hub_preset(repo_id: str) -> str | None:
    repo = repo_id.split("/")[-1]
    repo = HUB_PRESETS.get(repo, repo)
    return repo if repo in PRESETS else None


def _with_preset_conventions(config: Blip2Config, preset_name: str | None) -> Blip2Config:
    """Conventions a transformers config does not carry (prompt, EOS text, LLM name), from the preset."""
    if preset_name is None:
        return config
    if preset_name not in PRESETS:
        raise UserError(f"unknown preset {preset_name!r}; `blip2 presets` lists them")
    p = preset(preset_name)
    config = dataclasses.replace(config, name=p.name, tokenizer=p.tokenizer, max_txt_len=p.max_txt_len)
    if config.llm is not None and p.llm is not None:
        llm = dataclasses.replace(
            config.llm,
            name=p.llm.name,
            prompt=p.llm.prompt,
            vqa_prompt=p.llm.vqa_prompt,
            eos_text=p.llm.eos_text,
            max_txt_len=p.llm.max_txt_len,
        )
        config = dataclasses.replace(config, llm=llm)
    return config


def _has_tokenizer(path: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "vocab.json")
    return path.is_dir() and any((path / n).is_file() for n in names)


def _tokenizer_source(
    folder: Path | None, fallback: str | os.PathLike[str] | None, hub: dict[str, Any]
) -> str | None:
    if folder is not None and _has_tokenizer(folder):
        return str(folder)
    if fallback is None or fallback == "":
        return None
    return str(resolve(fallback, **hub)) if not Path(fallback).exists() else os.fspath(fallback)


def _pipeline(
    model: nn.Module,
    folder: Path | None,
    tokenizer: str | os.PathLike[str] | None,
    hub: dict[str, Any],
    llm_folder: Path | None = None,
) -> Pipeline:
    from blip2 import tokenizers

    config: Blip2Config = model.config
    image_processor = _image_processor(folder, config)
    if config.stage == 1:
        source = str(tokenizer) if tokenizer else (str(folder) if folder and _has_tokenizer(folder) else None)
        return Pipeline(model, image_processor, qformer_tokenizer=tokenizers.qformer_tokenizer(source))
    source = _tokenizer_source(folder if tokenizer is None else None, tokenizer or llm_folder, hub)
    if source is None:
        source = _tokenizer_source(None, config.llm.name, hub)
    if source is None:
        raise UserError("no tokenizer found for the LLM: pass tokenizer= a folder or hub id")
    return Pipeline(model, image_processor, llm_tokenizer=tokenizers.llm_tokenizer(source))


def _load_lavis(
    path: Path,
    preset_name: str | None,
    dtype: str | None,
    vision_weights: str | os.PathLike[str] | None,
    llm: str | os.PathLike[str] | None,
    tokenizer: str | os.PathLike[str] | None,
    hub: dict[str, Any],
) -> Pipeline:
    preset_name = preset_name or lavis.FILES.get(path.name)
    if preset_name is None:
        raise UserError(
            f"{path.name} is a checkpoint file: say which model it is with preset= "
            "(for example 'blip2-opt-2.7b'; `blip2 presets` lists them)"
        )
    if preset_name not in PRESETS:
        raise UserError(f"unknown preset {preset_name!r}; `blip2 presets` lists them")
    config = checkpoint.with_dtype(preset(preset_name), dtype)
    if vision_weights is None:
        beside = path.parent / lavis.VISION_FILES.get(config.vision.model_type, "")
        vision_path = beside if beside.is_file() else None
    else:
        vision_path = resolve(vision_weights)
    llm_path = None
    if config.stage == 2:
        llm_source = llm or config.llm.name
        if not llm_source:
            raise UserError(f"preset {preset_name!r} names no LLM: pass llm= a folder or hub id")
        llm_path = resolve(llm_source, **hub)
    model = checkpoint.load_lavis(path, config, vision_path, llm_path)
    pipe = _pipeline(model, None, tokenizer, hub, llm_folder=llm_path)
    if config.stage == 2:  # convert to the transformers conventions, as the released checkpoints were
        _ensure_image_token(pipe.model, pipe.llm_tokenizer)
    return pipe


# ------------------------------------------------------------------------------------- conventions


def _first_id(tokenizer: Any, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"the tokenizer turns {text!r} into no tokens; it cannot end generation")
    return int(ids[0])


def _ensure_image_token(model: nn.Module, tokenizer: Any) -> None:
    """Give a stage-2 model transformers' `<image>` placeholder: the token in the tokenizer, its id in
    the config (`image_token_id`), and room for it in the LLM's embedding table.

    The table only grows when the id does not fit (padded to a multiple of 64 as the released
    checkpoints are; new rows are the mean of the old ones). The EOS text (OPT's "\\n") becomes the
    LLM config's EOS, as in the released transformers checkpoints.
    """
    from tokenizers import AddedToken

    config: Blip2Config = model.config
    if config.llm.image_token_id is not None:
        return
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    llm = model.llm
    rows = llm.get_input_embeddings().weight.shape[0]
    hf_config = dict(config.llm.hf_config)
    if image_id >= rows:
        _grow_vocab(llm, image_id + 1)
        hf_config["vocab_size"] = llm.get_input_embeddings().weight.shape[0]
    if config.llm.eos_text:
        eos = _first_id(tokenizer, config.llm.eos_text)
        hf_config["eos_token_id"] = llm.config.eos_token_id = llm.generation_config.eos_token_id = eos
    llm_cfg = dataclasses.replace(config.llm, image_token_id=image_id, hf_config=hf_config)
    model.config = dataclasses.replace(config, llm=llm_cfg)


@torch.no_grad()
def _grow_vocab(llm: nn.Module, size: int, multiple: int = 64) -> None:
    size = -(-size // multiple) * multiple
    tables = [llm.get_input_embeddings()]
    head = llm.get_output_embeddings()
    if head is not None and head.weight is not tables[0].weight:
        tables.append(head)
    old = [t.weight.detach().clone() for t in tables]
    llm.resize_token_embeddings(size, mean_resizing=False)
    tables = [llm.get_input_embeddings()] + ([llm.get_output_embeddings()] if len(old) > 1 else [])
    for table, weight in zip(tables, old, strict=True):
        table.weight[: weight.shape[0]] = weight
        table.weight[weight.shape[0] :] = weight.mean(dim=0)


# ------------------------------------------------------------------------------------ image processor


def _image_processor(folder: Path | None, config: Blip2Config) -> ImageProcessor:
    """Our image processor from a folder's `preprocessor_config.json` (hub layout) or
    `processor_config.json` (transformers 5 layout), else from the config."""
    settings: dict[str, Any] | None = None
    if folder is not None:
        if (folder / "preprocessor_config.json").is_file():
            settings = json.loads((folder / "preprocessor_config.json").read_text())
        elif (folder / "processor_config.json").is_file():
            settings = json.loads((folder / "processor_config.json").read_text()).get("image_processor")
    if not settings:
        v = config.vision
        return ImageProcessor(v.image_size, v.image_mean, v.image_std)
    size = settings.get("size", {})
    side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    if isinstance(size, dict) and size.get("width", side) != side:
        raise UserError(f"the image processor resizes to {size}; only square sizes are supported")
    if settings.get("resample", 3) != 3 or settings.get("do_center_crop"):
        raise UserError("the image processor does not resize bicubically without cropping, as BLIP-2's does")
    v = config.vision
    return ImageProcessor(
        int(side or v.image_size),
        settings.get("image_mean", v.image_mean),
        settings.get("image_std", v.image_std),
    )


def _to_transformers_image_processor(processor: ImageProcessor) -> Any:
    from transformers import BlipImageProcessorPil

    return BlipImageProcessorPil(
        size={"height": processor.size, "width": processor.size},
        resample=3,
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(x) for x in processor.mean],
        image_std=[float(x) for x in processor.std],
        do_convert_rgb=True,
    )


# --------------------------------------------------------------------------------------------- utils


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _broadcast(a: list[Any], b: list[Any], name_a: str, name_b: str) -> tuple[list[Any], list[Any]]:
    if len(a) == len(b):
        return a, b
    if len(a) == 1:
        return a * len(b), b
    if len(b) == 1:
        return a, b * len(a)
    raise UserError(f"got {len(a)} {name_a} and {len(b)} {name_b}: pass as many of each, or one of either")
