"""`Task`: an objective is a model plus its losses, and the module that DDP wraps.

A task type (a subclass) is also what the training loop asks for everything that depends on the model
kind: how to build the model from a `TrainConfig` (`build_model`), how its texts are tokenized
(`text_spec`), which batch entries the call takes (`inputs`), which loss parts to log (`parts`), and
how the model is set up and saved (`set_gradient_checkpointing`, `set_autocast`, `image_tower`,
`save`: written for the models built on a `QueryEncoder`; a task with another model overrides them).
The loop never asks which kind it runs: `blip2.tasks.registry` maps the config's task name to a type.

A new kind is a new subclass, registered under a name (`tests/test_train_tasks.py` trains one):

```python
class MyTask(Task):
    def forward(self, input_ids, attention_mask, pixel_values):  # -> an output with `.loss`
        ...
    def inputs(self, batch, gather, generator):  # the batch -> forward's keyword arguments
        return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    @classmethod
    def new_model(cls, config, cfg):  # a model with new weights
        return RetrievalModel(config)
    @classmethod
    def text_spec(cls, cfg, section, config):  # how its texts are tokenized
        return TextSpec("qformer", qformer_tokenizer(config.tokenizer), max_len=section.max_len)

blip2.tasks.register("mine", MyTask)  # then `task: mine` in a training config
```
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from blip2.config import Blip2Config
from blip2.errors import UserError
from blip2.losses import Gather
from blip2.models.encoders import ImageEncoder
from blip2.presets import preset

if TYPE_CHECKING:
    from blip2.data.batching import TextSpec
    from blip2.train.config import DataSection, TrainConfig


class Task(nn.Module):
    """A model and its objective. `forward(...)` returns an output with a scalar `loss`.

    Attributes:
        model: the trained model (what checkpoints and saved folders hold: its state_dict keys have
            no task prefix).
        uses_image_ids: whether batches carry `image_ids` (captions of one image are positives of
            each other).
        merge_adapters: `save` merges LoRA adapters of the LLM into its weights (`lora.merge`) instead
            of writing them beside the model.
    """

    uses_image_ids: ClassVar[bool] = False
    merge_adapters: bool = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    # ---------------------------------------------------------------------------------- per batch

    def inputs(self, batch: dict[str, Tensor], gather: Gather, generator: torch.Generator) -> dict[str, Any]:
        """The keyword arguments of `forward` for a training batch (see `blip2.data.batching`).

        Args:
            batch: the batch's tensors on the model's device.
            gather: concatenation over ranks (identity in one process).
            generator: this micro-batch's random source (the same on every rank).
        """
        raise NotImplementedError

    def parts(self, output: Any) -> dict[str, Tensor]:
        """The loss parts to log besides `loss` (none by default)."""
        return {}

    def frozen_llm(self) -> nn.Module | None:
        """A frozen LLM the loop may shard with FSDP (`train.fsdp_llm`); None: the task has none."""
        return None

    # ---------------------------------------------------------------------------------- set-up, saving
    # written for the models built on a `QueryEncoder` (`RetrievalModel`, `LanguageBridge`); a task
    # training another kind of model overrides them

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in the backward pass (`train.grad_checkpointing`): the Q-Former's."""
        self.model.qformer.gradient_checkpointing = enabled

    def set_autocast(self, dtype: torch.dtype | None) -> None:
        """Mixed precision (`train.precision`; None: none): the Q-Former side computes under autocast to
        `dtype`, the frozen towers in their configured dtype (`VisionConfig.dtype`, `LLMConfig.dtype`)."""
        self.model.autocast_dtype = dtype

    def image_tower(self) -> nn.Module | None:
        """The frozen image tower a feature cache (`data.features`) must have been written by; None:
        nothing to check."""
        return self.model.visual.tower

    def save(self, path: str, text: TextSpec) -> None:
        """Write the trained model where `blip2.load` reads it (and transformers, where it has the
        class): the weights, the image processor and the tokenizers the texts were read with (`text`:
        the LLM's or the Q-Former's, and an InstructBLIP model's instruction tokenizer)."""
        from blip2.interop import lora
        from blip2.interop.saving import save_pretrained
        from blip2.processing import ImageProcessor

        v = self.model.config.vision
        processor = ImageProcessor(v.image_size, v.image_mean, v.image_std)
        llm = getattr(self.model, "llm", None)
        shutil.rmtree(os.path.join(path, lora.ADAPTER_FOLDER), ignore_errors=True)  # a previous save's
        if llm is None or not lora.has_lora(llm):
            save_pretrained(self.model, path, processor, text.tokenizer, text.qformer_tokenizer)
        elif self.merge_adapters:  # the end of training: the adapters become part of the LLM for good
            lora.merge(llm)
            save_pretrained(self.model, path, processor, text.tokenizer, text.qformer_tokenizer)
        else:  # the LLM as it started, and its adapters beside it (`blip2.load` applies them)
            with lora.without_adapters(llm):
                save_pretrained(self.model, path, processor, text.tokenizer, text.qformer_tokenizer)
            lora.save_adapter(llm, os.path.join(path, lora.ADAPTER_FOLDER))

    # ---------------------------------------------------------------------------------- building

    @classmethod
    def build_model(cls, cfg: TrainConfig) -> nn.Module:
        """The model to train: from a preset/config (new weights, `new_model`) or a saved model
        (`model.init_from`, `from_saved`); a new Q-Former starts from BERT with `model.qformer_init`."""
        m = cfg.model
        bert = None
        if m.qformer_init and m.init_from is None:  # fetch (or fail) before building a large model
            from blip2.interop.bert import read_bert_state_dict

            bert = read_bert_state_dict(m.qformer_init)
        if m.init_from is not None:
            saved = load_saved(m.init_from)
            kept = cls.saved_overrides(saved)
            unused = sorted(set(m.overrides) - kept)
            if unused:
                sections = ", ".join(f"model.overrides.{k}" for k in unused)
                also = f" (from this model, only {', '.join(f'model.overrides.{k}' for k in sorted(kept))})"
                raise UserError(
                    f"model.overrides apply to new models only, not to model.init_from: drop {sections}"
                    + (also if kept else "")
                )
            return cls.from_saved(saved, cfg)
        config, tower = vision_model_config(cfg)
        model = cls.new_model(config, cfg)
        if tower is not None:
            model.visual = ImageEncoder(config.vision, tower)
        if m.qformer_init:
            from blip2.interop.bert import init_qformer_from_bert

            init_qformer_from_bert(model.qformer, bert if bert is not None else m.qformer_init)
        return model

    @classmethod
    def new_model(cls, config: Blip2Config, cfg: TrainConfig) -> nn.Module:
        """A model with new weights from `config` (the preset or config file, overrides applied)."""
        raise NotImplementedError

    @classmethod
    def from_saved(cls, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        """The model to train from a saved one (`model.init_from`); by default the model itself."""
        return model

    @classmethod
    def saved_overrides(cls, model: nn.Module) -> frozenset[str]:
        """The sections of `model.overrides` that `from_saved` applies to what it builds from the saved
        `model` (e.g. `llm`: the new LLM of stage 2 from a stage-1 model); the others are refused. None
        by default: a saved model is trained as it was saved."""
        return frozenset()

    @classmethod
    def text_spec(cls, cfg: TrainConfig, section: DataSection, config: Blip2Config) -> TextSpec:
        """How the task's texts are tokenized (see `blip2.data.batching`)."""
        raise NotImplementedError


def model_config(cfg: TrainConfig) -> Blip2Config:
    """The `Blip2Config` named by `model.preset` or `model.config`, with `model.overrides` applied."""
    m = cfg.model
    if m.preset is not None:
        try:
            config = preset(m.preset)
        except ValueError as e:
            raise UserError(str(e)) from None
    else:
        try:
            with open(m.config) as f:
                config = Blip2Config.from_json(f.read())
        except FileNotFoundError:
            raise UserError(f"model config not found: {m.config}") from None
    if not m.overrides:
        return config
    try:
        return Blip2Config.from_dict(_merge(config.to_dict(), m.overrides))
    except (TypeError, ValueError) as e:
        raise UserError(f"model.overrides do not fit the model config: {e}") from None


def vision_model_config(cfg: TrainConfig) -> tuple[Blip2Config, nn.Module | None]:
    """`model_config(cfg)`, and with `model.vision` the pretrained image tower it names: the config then
    describes that tower (its transformers config, input size and normalization, with
    `model.overrides.vision` applied on top) and the Q-Former reads its width."""
    config = model_config(cfg)
    name = cfg.model.vision
    if name is None:
        return config, None
    import json

    import transformers

    from blip2.config import VisionConfig
    from blip2.hub import resolve
    from blip2.interop.checkpoint import pretrained_tower
    from blip2.interop.hf import _arch_dict

    path = resolve(name)
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"model.vision: {name} is not a transformers model folder or hub id ({e})") from None
    tower_config = getattr(hf_config, "vision_config", None) or hf_config  # CLIP and SigLIP: their image side
    vision = dataclasses.asdict(config.vision)
    vision["hf_config"] = {**_arch_dict(tower_config), "_name_or_path": name}
    settings_file = path / "preprocessor_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    size = settings.get("crop_size") or settings.get("size") or getattr(tower_config, "image_size", None)
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    if size:
        vision["image_size"] = int(size)
    for key in ("image_mean", "image_std"):
        if key in settings:
            vision[key] = tuple(settings[key])
    vision = _merge(vision, cfg.model.overrides.get("vision", {}))
    try:
        mean, std = tuple(vision.pop("image_mean")), tuple(vision.pop("image_std"))
        vision_config = VisionConfig(**vision, image_mean=mean, image_std=std)
    except TypeError as e:
        raise UserError(f"model.overrides.vision does not fit the image encoder of {name}: {e}") from None
    width = cfg.model.overrides.get("qformer", {}).get("encoder_width", 0)  # 0: the new tower's
    config = dataclasses.replace(
        config, vision=vision_config, qformer=dataclasses.replace(config.qformer, encoder_width=width)
    )
    return config, pretrained_tower(config, path)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_saved(path: str, setting: str = "model.init_from") -> nn.Module:
    """A saved model (any format `blip2.load` reads) as its torch module, without its tokenizer and
    image processor (training builds its own); what goes wrong names the config's `setting`."""
    from blip2.hub import resolve
    from blip2.interop.loading import UnknownCheckpointFile, load_model

    try:
        return load_model(str(path), resolve(path)).model
    except UnknownCheckpointFile as e:  # a training config names no preset for it: convert it first
        raise UserError(
            f"{setting}: {e.path.name} is a checkpoint file under a name LAVIS did not release, so which "
            f"model it is is unknown: convert it to a folder with `blip2 convert {e.path} DIR --preset NAME` "
            f"(`blip2 presets` lists them; --config CFG.json when its sizes match no preset) and set "
            f"{setting} to DIR"
        ) from None
    except UserError as e:  # say which setting named it
        raise UserError(f"{setting}: {e}") from None
