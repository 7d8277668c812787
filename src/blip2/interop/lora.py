"""LoRA adapters on the LLM of a stage-2 model, with `peft` (the `lora` extra).

Hu et al. (2021). `add_lora` puts peft's LoRA layers in place of the LLM's target linear layers (the
LLM stays the transformers model it was, `bridge.llm`; only the adapters' `lora_A` / `lora_B` train).
A trained model is saved either with its adapters beside it, as peft's adapter folder
(`adapter_config.json` + `adapter_model.safetensors`, keys as `PeftModel.save_pretrained` writes
them, so `PeftModel.from_pretrained(llm, folder)` reads it too), or merged into the LLM's weights
(`merge`): a plain model folder. `load_adapter` applies a saved adapter folder to an LLM.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from blip2.errors import UserError

ADAPTER_FOLDER = "lora"  # the adapters' folder inside a saved model folder
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # peft's keys: the adapter's names under its `PeftModel` wrapper

# the attention projections of each LLM family (`model_type`), the layers LoRA adapts by default
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "llama": ATTENTION,
    "mistral": ATTENTION,
    "qwen2": ATTENTION,
    "qwen3": ATTENTION,
    "gemma": ATTENTION,
    "gemma2": ATTENTION,
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn"],
    "t5": ["q", "k", "v", "o"],
}


def require_peft() -> ModuleType:
    """The `peft` module, or one sentence naming the extra that installs it."""
    try:
        import peft
    except ImportError:
        raise UserError("LoRA needs the peft package: pip install 'blip2[lora]'") from None
    return peft


def target_modules(llm: nn.Module, given: list[str] | None = None) -> list[str]:
    """The names of the LLM's layers that get adapters: `given`, else its family's default."""
    if given:
        return list(given)
    model_type = llm.config.model_type
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    if model_type in PEFT_DEFAULTS:
        return list(PEFT_DEFAULTS[model_type])
    raise UserError(
        f"there is no default LoRA target for a {model_type!r} LLM: set lora.target_modules to the names "
        "of its attention projections (e.g. [q_proj, v_proj])"
    )


def add_lora(
    llm: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets: list[str] | None = None
) -> None:
    """Put LoRA adapters (`lora_B` zero: the LLM's outputs do not change yet) on `targets` of `llm`
    (default: `target_modules(llm)`); only the adapters need gradients, the rest stays frozen.

    Raises:
        UserError: peft is missing, or no layer of the LLM has a target's name.
    """
    peft = require_peft()
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules(llm, targets)
    )
    try:
        peft.inject_adapter_in_model(config, llm)
    except ValueError as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise UserError(f"LoRA could not be added to the LLM ({reason}): check lora.target_modules") from None
    for name, p in llm.named_parameters():
        p.requires_grad_("lora_" in name)


def _layers(llm: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """Each LoRA layer of `llm` as (its parent module, its attribute name, the layer)."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in llm.named_modules():
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            out.append((llm.get_submodule(parent_name), child, module))
    return out


def has_lora(llm: nn.Module) -> bool:
    """Whether `llm` carries LoRA adapters."""
    return getattr(llm, "peft_config", None) is not None and bool(_layers(llm))


@contextlib.contextmanager
def without_adapters(llm: nn.Module) -> Iterator[nn.Module]:
    """Inside: `llm` with its original layers (no adapters, the original state_dict keys); after: the
    adapters are back in place."""
    layers = _layers(llm)
    for parent, child, layer in layers:
        setattr(parent, child, layer.get_base_layer())
    try:
        yield llm
    finally:
        for parent, child, layer in layers:
            setattr(parent, child, layer)


def merge(llm: nn.Module) -> None:
    """Add each adapter's update into its layer's weight and drop the adapters: `llm` is a plain
    transformers model again (with the trained behaviour)."""
    for parent, child, layer in _layers(llm):
        layer.merge()
        setattr(parent, child, layer.get_base_layer())
    vars(llm).pop("peft_config", None)


def adapter_state(llm: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under peft's saved names (detached CPU copies)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(llm)
    return {KEY_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_adapter(llm: nn.Module, folder: str | os.PathLike[str]) -> None:
    """Write the adapters of `llm` as peft's adapter folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    llm.peft_config["default"].save_pretrained(str(folder))
    save_file(adapter_state(llm), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def is_adapter_folder(folder: str | os.PathLike[str]) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def load_adapter(llm: nn.Module, folder: str | os.PathLike[str]) -> None:
    """Add the adapters saved in `folder` (peft's adapter folder) to `llm`, with their weights.

    Raises:
        UserError: peft is missing, or the folder is not an adapter of this LLM.
    """
    peft = require_peft()
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = peft.LoraConfig.from_pretrained(str(folder))
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{folder} is not a readable LoRA adapter folder ({e})") from None
    add_lora(llm, config.r, config.lora_alpha, config.lora_dropout, sorted(config.target_modules))
    state = {k.removeprefix(KEY_PREFIX): v for k, v in state.items()}
    result = set_peft_model_state_dict(llm, state)
    wrong = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if "lora_" in k]
    if wrong or missing:
        raise UserError(
            f"{folder} is not a LoRA adapter of this LLM (missing {missing[:3]}, unexpected {wrong[:3]})"
        )
