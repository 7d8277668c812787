"""Reading and writing checkpoints: files to state dicts, state dicts into models, models to folders.

* `read_state_dict(path)`: a folder (`model.safetensors`, sharded or not, or `pytorch_model.bin`) or
  one file. Safetensors, or `torch.load(weights_only=True)`: nothing but tensors is ever unpickled.
* `build_model(config)`: our model with uninitialized weights (they are all loaded next).
* `load_transformers_folder`, `load_lavis`: the two foreign layouts into our model, strictly.
* `save_folder(model, folder)`: our folder, a superset of transformers' (see `blip2.pipelines`).

Our folder: `blip2_config.json` (our config), and either
  - the model has a transformers class: `config.json` (transformers' BLIP-2 config) and
    `model.safetensors` in transformers' key names, plus `blip2_extras.safetensors` with what
    transformers has no place for (ITC temperature, ITG head, a stage-2 Q-Former's text side), or
  - it has none (an image encoder other than EVA ViT-g: CLIP, SigLIP, DINOv2, ...), or transformers
    would load it without a part (an LLM whose LoRA adapters lie beside it, unmerged, in `lora/`):
    `blip2_model.safetensors` in our key names, marked `{"format": "blip2"}` in its metadata, and no
    `config.json`. No file transformers looks for, so its `from_pretrained` refuses the folder (it
    would otherwise build a default EVA model and fill it with nothing, or the LLM without its
    adapters). Folders written before this
    name hold the same weights as `model.safetensors` and still load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from blip2.config import DTYPES, Blip2Config, LLMConfig
from blip2.errors import UserError
from blip2.interop import hf, lavis
from blip2.interop.keymap import CheckpointError, convert, load_state, unique_state_dict

CONFIG = "blip2_config.json"
WEIGHTS = "model.safetensors"
OUR_WEIGHTS = "blip2_model.safetensors"  # our layout's weights (a model transformers has no class for)
EXTRAS = "blip2_extras.safetensors"
OUR_FORMAT = "blip2"
ITC_TEMPERATURE = 0.07  # LAVIS's initial value; transformers checkpoints do not keep the trained one


# ----------------------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of a checkpoint folder or file, and the safetensors metadata (empty for others)."""
    path = Path(path)
    if path.is_dir():
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index).is_file():
                shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
                state: dict[str, Tensor] = {}
                meta: dict[str, str] = {}
                for shard in shards:
                    s, meta = read_state_dict(path / shard)
                    state.update(s)
                return state, meta
        for name in (WEIGHTS, OUR_WEIGHTS, "pytorch_model.bin"):
            if (path / name).is_file():
                return read_state_dict(path / name)
        raise UserError(f"{path} holds no model weights ({WEIGHTS}, {OUR_WEIGHTS} or pytorch_model.bin)")
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except SafetensorError as e:
            raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{path} holds Python objects besides tensors; it is not loaded, as unpickling could run code"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    return lavis.unwrap(obj, str(path)), {}


# ------------------------------------------------------------------------------------------ models


def build_model(
    config: Blip2Config,
    vision_tower: nn.Module | None = None,
    llm: nn.Module | None = None,
    init: bool = False,
) -> nn.Module:
    """The model of `config`'s kind (a `RetrievalModel`, `LanguageBridge` or `InstructBridge`); without
    `init` its weights are left uninitialized (fast for real sizes), to be filled by `load_state`."""
    from transformers.initialization import no_init_weights

    from blip2.models import InstructBridge, LanguageBridge, RetrievalModel

    with _maybe(no_init_weights(), not init):
        if config.kind == "retrieval":
            return RetrievalModel(config, vision_tower=vision_tower)
        bridge = InstructBridge if config.kind == "instruct" else LanguageBridge
        model = bridge(config, vision_tower=vision_tower, llm=llm)
    model.llm.tie_weights()  # skipped with the initialization: tied tables are one tensor again
    return model


class _maybe:
    def __init__(self, ctx: Any, on: bool):
        self.ctx, self.on = ctx, on

    def __enter__(self) -> None:
        if self.on:
            self.ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.on:
            self.ctx.__exit__(*exc)


def with_dtype(config: Blip2Config, dtype: str | None) -> Blip2Config:
    """`config` with the frozen towers (image encoder, LLM) in `dtype` (the Q-Former stays fp32)."""
    if dtype is None:
        return config
    vision = dataclasses.replace(config.vision, dtype=dtype)
    llm = dataclasses.replace(config.llm, dtype=dtype) if config.llm is not None else None
    return dataclasses.replace(config, vision=vision, llm=llm)


def _finish(model: nn.Module) -> nn.Module:
    """After loading: record an untied LM head in the LM's config, and go to eval mode."""
    llm = getattr(model, "llm", None)
    if llm is not None:
        head, table = llm.get_output_embeddings(), llm.get_input_embeddings()
        if head is not None and head.weight is not table.weight:
            llm.config.tie_word_embeddings = False
    return model.eval()


# ------------------------------------------------------------------------------------ our folders


def is_our_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def read_config(path: Path) -> Blip2Config:
    try:
        return Blip2Config.from_json((path / CONFIG).read_text())
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path / CONFIG} is not a valid blip2 config ({e})") from None


def load_folder(path: Path, config: Blip2Config) -> nn.Module:
    """Our own folder (either layout; see the module docstring), or a plain transformers one."""
    state, meta = read_state_dict(path)
    if meta.get("format") != OUR_FORMAT:
        state = convert(state, hf.rules(config.kind), to="ours", source=str(path))
    if (path / EXTRAS).is_file():
        extras, _ = read_state_dict(path / EXTRAS)
        state.update(extras)
    model = build_model(config)
    unfilled = load_state(model, state, source=str(path), optional=["temp"])
    if "temp" in unfilled:  # a transformers retrieval checkpoint: the trained temperature was dropped
        with torch.no_grad():
            model.temp.fill_(ITC_TEMPERATURE)
    return _finish(model)


def transformers_layout(model: nn.Module) -> bool:
    """Whether `save_folder` writes `model` in transformers' layout: transformers has a class for it,
    and its LLM carries no LoRA adapters. An LLM saved without its adapters (a training run's
    `merge: false` writes them beside it, in `lora/`, while the LLM is saved as it started) would load
    in transformers as the base model, the adapters silently left out: such a folder is ours alone."""
    llm = getattr(model, "llm", None)
    adapters = llm is not None and getattr(llm, "peft_config", None) is not None  # kept while saving
    return hf.has_counterpart(model.config) and not adapters


def save_folder(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write `model` as our folder: weights and configs (the caller adds processor and tokenizer)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config: Blip2Config = model.config
    state = {k: v.detach().contiguous().cpu() for k, v in unique_state_dict(model).items()}
    (path / CONFIG).write_text(config.to_json())
    for stale in (EXTRAS, "config.json", WEIGHTS, OUR_WEIGHTS):
        (path / stale).unlink(missing_ok=True)
    if not transformers_layout(model):
        save_file(state, str(path / OUR_WEIGHTS), metadata={"format": OUR_FORMAT})
        return
    extra = hf.extra_keys(config)
    extras = {k: v for k, v in state.items() if extra.match(k)}
    theirs = convert({k: v for k, v in state.items() if k not in extras}, hf.rules(config.kind), to="theirs")
    save_file(theirs, str(path / WEIGHTS), metadata={"format": "pt"})
    if extras:
        save_file(extras, str(path / EXTRAS), metadata={"format": OUR_FORMAT})
    hf_config = hf.config_to_transformers(config)
    hf_config.dtype = str(next(iter(theirs.values())).dtype).removeprefix("torch.")
    hf_config.save_pretrained(str(path))


# -------------------------------------------------------------------------------------------- LAVIS


def load_lavis(
    path: Path,
    config: Blip2Config,
    vision_weights: Path | None = None,
    llm_path: Path | None = None,
) -> nn.Module:
    """A LAVIS checkpoint into our model described by `config` (a preset, or any config that fits it).

    The image encoder comes from the checkpoint when it holds one (`visual_encoder.*`), else from
    `vision_weights`: a LAVIS tower file (`eva_vit_g.pth` / `clip_vit_L.pth`) or a transformers folder
    of the tower (`pretrained_tower`). The LLM of a stage-2 model comes from `llm_path`, a transformers
    LM folder whose `config.json` replaces `config.llm.hf_config` (FlanT5 gets LAVIS's exact GELU). All
    are held to the same rule: every key consumed, every weight filled.
    """
    state, _ = read_state_dict(path)
    if config.vision.model_type == "blip_2_vision_model":  # LAVIS's ln_vision: eps 1e-5, not 1e-6
        config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, ln_vision_eps=1e-5))
    tower = None
    if not any(k.startswith("visual_encoder.") for k in state):
        if vision_weights is None:
            raise UserError(
                f"{path.name} holds no image encoder: pass --vision-weights (vision_weights= in blip2.load) "
                f"the LAVIS file {lavis.VISION_FILES.get(config.vision.model_type, 'of the image encoder')} "
                "or a transformers folder of the image encoder"
            )
        if vision_weights.is_dir():
            tower = pretrained_tower(config, vision_weights)
        else:
            base, _ = read_state_dict(vision_weights)
            state.update(lavis.vision_base_state(base, config))
    llm_state: dict[str, Tensor] = {}
    if config.llm is not None:
        if any(k.startswith(lavis.llm_prefixes(config)[1] + ".") for k in state):
            raise UserError(f"{path.name} holds LLM weights; this loader takes the LLM from its own folder")
        if llm_path is None:
            raise UserError(
                f"{path.name} holds no LLM: pass --llm (llm= in blip2.load) the transformers folder or hub id of it"
            )
        config = dataclasses.replace(config, llm=pretrained_llm_config(llm_path, config.llm))
        llm_state, _ = read_state_dict(llm_path)
    model = build_model(config, vision_tower=tower)
    if llm_state:
        _, model_prefix = lavis.llm_prefixes(config)
        llm_state = _with_base_prefix(llm_state, model.llm)
        state.update({f"{model_prefix}.{k}": v for k, v in llm_state.items()})
    ours = convert(state, lavis.rules(config, vision=tower is None), to="ours", source=str(path))
    if tower is not None:  # the pretrained tower fills its own weights
        ours.update({f"visual.tower.{k}": v for k, v in model.visual.tower.state_dict().items()})
    load_state(model, ours, source=str(path))
    return _finish(model)


def pretrained_tower(config: Blip2Config, folder: Path) -> nn.Module:
    """The frozen image encoder `config.vision` describes, with the weights of the transformers folder
    `folder` (`save_pretrained` of a `Blip2VisionModel`, `CLIPVisionModel`, `ResNetModel`, ...).

    Raises:
        UserError: the folder lacks weights the tower needs, or holds them in other shapes.
    """
    from blip2.models.encoders import tower_class_and_config

    cls, tower_config = tower_class_and_config(config.vision)
    try:
        tower, info = cls.from_pretrained(
            str(folder), config=tower_config, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{folder} is not a transformers folder of the image encoder ({reason})") from None
    wrong = [k for k, *_ in info.get("mismatched_keys", [])] + list(info.get("missing_keys", []))
    if wrong:
        raise UserError(
            f"{folder} does not hold the image encoder the config describes: "
            f"{len(wrong)} weights are missing or of another shape ({', '.join(sorted(wrong)[:3])}, ...)"
        )
    return tower


def _with_base_prefix(state: dict[str, Tensor], llm: nn.Module) -> dict[str, Tensor]:
    """Keys of an LM saved as its base model (`decoder.*` of OPT) under the causal-LM names
    (`model.decoder.*`), as transformers' `from_pretrained` accepts them."""
    expected = set(llm.state_dict())
    prefix = getattr(llm, "base_model_prefix", "")
    return {
        f"{prefix}.{k}" if k not in expected and f"{prefix}.{k}" in expected else k: v
        for k, v in state.items()
    }


# what an LLM folder that cannot be read should be instead, after the reason
LLM_HINT = (
    "; the LLM (model.llm in a training config, --llm for a LAVIS checkpoint) is a folder written by the "
    "LM's save_pretrained (config.json and weights) or a hub id"
)


def _reason(e: Exception) -> str:
    """The first line of an exception's message (its type when it has none), for a one-sentence error."""
    text = str(e).strip()
    return text.splitlines()[0][:200].rstrip(".") if text else type(e).__name__


def pretrained_llm_config(llm_path: Path, preset: LLMConfig | None) -> LLMConfig:
    """`preset` (name, dtype, prompt, EOS text, ...; default `LLMConfig()`) with the architecture of
    the transformers LM folder `llm_path`; FlanT5 gets LAVIS's exact GELU and its own LM head."""
    import transformers

    if not (llm_path / "config.json").is_file():
        raise UserError(
            f"{llm_path} is not a transformers language model folder: it has no config.json{LLM_HINT}"
        )
    try:
        hf_cfg = transformers.AutoConfig.from_pretrained(str(llm_path))
    except (OSError, ValueError) as e:
        raise UserError(
            f"{llm_path} is not a transformers language model folder ({_reason(e)}){LLM_HINT}"
        ) from None
    arch = hf._arch_dict(hf_cfg)
    if arch["model_type"] == "t5":
        arch["dense_act_fn"] = "gelu"  # LAVIS and the transformers conversion use exact GELU for FlanT5
        arch["tie_word_embeddings"] = False  # FlanT5's LM head is its own
    base = preset or LLMConfig()
    return dataclasses.replace(base, hf_config=arch, image_token_id=None)


def recorded_dtype(llm_path: Path) -> str | None:
    """The precision the config of the transformers LM folder `llm_path` records (`dtype`, or the
    older `torch_dtype`: Qwen2.5 and Llama 3 bfloat16), when it is one of `DTYPES`; else None."""
    hf_cfg = json.loads((llm_path / "config.json").read_text())
    value = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype")
    return value if value in DTYPES else None


def load_pretrained_llm(llm_path: Path, llm_config: LLMConfig) -> nn.Module:
    """The transformers LM folder `llm_path` as the LM `llm_config` describes (from
    `pretrained_llm_config`), loaded in `llm_config.dtype`."""
    from blip2.models import language

    hf_cfg = language.transformers_config(llm_config)
    try:
        llm = language.auto_class(hf_cfg).from_pretrained(
            str(llm_path),
            config=hf_cfg,
            dtype=language.torch_dtype(llm_config.dtype),
            attn_implementation=language.attention_implementation(hf_cfg),
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"{llm_path} holds no weights of its language model ({_reason(e)}){LLM_HINT}"
        ) from None
    return language.tie_input_embeddings(llm)  # the saved `shared.weight` for T5's encoder and decoder


__all__ = [
    "CheckpointError",
    "build_model",
    "load_folder",
    "load_lavis",
    "load_pretrained_llm",
    "pretrained_llm_config",
    "read_state_dict",
    "recorded_dtype",
    "save_folder",
    "with_dtype",
]
