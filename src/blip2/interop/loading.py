"""A model from what a user names: our folder, a transformers BLIP-2 folder, or a LAVIS checkpoint file
with the preset or the config it belongs to.

`load_model` returns the torch model and where its processor and tokenizer may be found; turning that
into what users call (a captioner or a retriever) is `blip2.pipelines.load`'s job.

A LAVIS file whose sizes match no preset loads with a `Blip2Config` (or a JSON file of one) describing
it. The frozen image encoder comes from the file when it holds one (`visual_encoder.*`), else from
`vision_weights`: LAVIS's own tower file (`eva_vit_g.pth`, `clip_vit_L.pth`; by default the one beside
the checkpoint) or a transformers folder / hub id of the tower; a config may name that folder in
`vision.hf_config["_name_or_path"]`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from blip2.config import Blip2Config
from blip2.errors import UserError
from blip2.hub import looks_like_hub_id, resolve
from blip2.interop import checkpoint, hf, lavis
from blip2.presets import PRESETS, preset

# hub repositories whose name is not a preset name
HUB_PRESETS = {"blip2-itm-vit-g": "blip2-stage1-vit-g", "blip2-itm-vit-g-coco": "blip2-stage1-vit-g-coco"}


class UnknownCheckpointFile(UserError):
    """A checkpoint file loaded without a preset or config, under a name that is not one of LAVIS's
    released files: nothing says which model it is. The message names the command line's and
    `blip2.load`'s options; a caller with other settings (a training config) words its own.

    Attributes:
        path: the file.
    """

    def __init__(self, path: Path):
        super().__init__(
            f"{path.name} is a checkpoint file: say which model it is with --preset NAME on the command "
            "line or preset=NAME in blip2.load (for example blip2-opt-2.7b; `blip2 presets` lists them), "
            "or with --config CFG.json (config= in blip2.load) when its sizes match no preset"
        )
        self.path = path


@dataclass
class Loaded:
    """A loaded model and where the rest of it lies.

    Attributes:
        model: our stage-1 or stage-2 model, in eval mode.
        folder: the checkpoint folder (its tokenizer and image processor settings), None for a file.
        llm_folder: the LLM folder a LAVIS stage-2 file was loaded with (its tokenizer), else None.
        from_lavis: the model comes from a LAVIS file (it follows LAVIS's conventions, not yet
            transformers': no `<image>` token).
    """

    model: nn.Module
    folder: Path | None = None
    llm_folder: Path | None = None
    from_lavis: bool = False


def load_model(
    name: str,
    path: Path,
    *,
    dtype: str | None = None,
    preset_name: str | None = None,
    config: Blip2Config | str | os.PathLike[str] | None = None,
    vision_weights: str | os.PathLike[str] | None = None,
    llm: str | os.PathLike[str] | None = None,
    hub: dict[str, Any] | None = None,
) -> Loaded:
    """The model at `path` (`name` resolved: a folder or a file); see `blip2.load` for the options."""
    hub = hub or {}
    if path.is_file():
        lavis_config = _lavis_config(path, preset_name, config)
        return _load_lavis(path, checkpoint.with_dtype(lavis_config, dtype), vision_weights, llm, hub)
    if config is not None:
        raise UserError(f"{path} carries its own config: config= (--config) is for LAVIS checkpoint files")
    if checkpoint.is_our_folder(path):
        ours = checkpoint.with_dtype(checkpoint.read_config(path), dtype)
        return Loaded(with_adapters(checkpoint.load_folder(path, ours), path), folder=path)
    if (path / "config.json").is_file():
        hf_config = json.loads((path / "config.json").read_text())
        theirs = hf.config_from_transformers(hf_config, name=path.name)
        theirs = with_preset_conventions(theirs, hub_preset(name) if looks_like_hub_id(name) else preset_name)
        return Loaded(checkpoint.load_folder(path, checkpoint.with_dtype(theirs, dtype)), folder=path)
    raise UserError(f"{path} is neither a BLIP-2 folder (no config.json) nor a checkpoint file")


def with_adapters(model: nn.Module, folder: Path) -> nn.Module:
    """`model` with the LoRA adapters saved beside it (`folder/lora/`, written by a `lora` training run)
    merged into its LLM; the model itself when there are none."""
    from blip2.interop import lora

    adapters = folder / lora.ADAPTER_FOLDER
    if getattr(model, "llm", None) is None or not lora.is_adapter_folder(adapters):
        return model
    lora.load_adapter(model.llm, adapters)
    lora.merge(model.llm)
    return model.eval()


def read_config(config: Blip2Config | str | os.PathLike[str]) -> Blip2Config:
    """A `Blip2Config`, or one read from a JSON file (`blip2 presets NAME` prints one to start from)."""
    if isinstance(config, Blip2Config):
        return config
    path = Path(config)
    if not path.is_file():
        raise UserError(f"the config file {path} does not exist: give a Blip2Config JSON file")
    try:
        return Blip2Config.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path} is not a valid Blip2Config JSON file ({e})") from None


def hub_preset(repo_id: str) -> str | None:
    """The preset of a hub repository (`Salesforce/blip2-opt-2.7b` -> `blip2-opt-2.7b`), else None."""
    repo = repo_id.split("/")[-1]
    repo = HUB_PRESETS.get(repo, repo)
    return repo if repo in PRESETS else None


def with_preset_conventions(config: Blip2Config, preset_name: str | None) -> Blip2Config:
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


# -------------------------------------------------------------------------------------------- LAVIS


def _lavis_config(
    path: Path, preset_name: str | None, config: Blip2Config | str | os.PathLike[str] | None
) -> Blip2Config:
    """What a LAVIS file is: the config given, the preset given, or the preset of its released name."""
    if config is not None:
        if preset_name is not None:
            raise UserError("give either a preset or a config for a LAVIS checkpoint, not both")
        return read_config(config)
    preset_name = preset_name or lavis.FILES.get(path.name)
    if preset_name is None:
        raise UnknownCheckpointFile(path)
    if preset_name not in PRESETS:
        raise UserError(f"unknown preset {preset_name!r}; `blip2 presets` lists them")
    return preset(preset_name)


def _load_lavis(
    path: Path,
    config: Blip2Config,
    vision_weights: str | os.PathLike[str] | None,
    llm: str | os.PathLike[str] | None,
    hub: dict[str, Any],
) -> Loaded:
    if vision_weights is not None:
        vision_path = resolve(vision_weights, **hub)
    else:  # LAVIS's tower file beside the checkpoint, else the tower's own pretrained source
        beside = path.parent / lavis.VISION_FILES.get(config.vision.model_type, "")
        source = config.vision.hf_config.get("_name_or_path")
        vision_path = beside if beside.is_file() else resolve(source, **hub) if source else None
    llm_path = None
    if config.llm is not None:
        llm_source = llm or config.llm.name
        if not llm_source:
            raise UserError(
                f"{config.name or 'this model'} names no LLM: pass --llm (llm= in blip2.load) a folder or hub id"
            )
        llm_path = resolve(llm_source, **hub)
    model = checkpoint.load_lavis(path, config, vision_path, llm_path)
    return Loaded(model, llm_folder=llm_path, from_lavis=True)
