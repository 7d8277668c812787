"""Image encoder families, each built tiny and random (`blip2.presets.TINY_VISION`): the features each
gives, stage 1 through `blip2 train`'s path (its loss falls), an exact save/load round trip in our
folder, a stage-2 model on it that generates, the feature cache, and what transformers can load."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from train_utils import blip2_cli, image_bytes, make_caption_json, make_llm_tokenizer

import blip2
from blip2.config import CLIP_MEAN, IMAGENET_MEAN
from blip2.errors import UserError
from blip2.models.encoders import ImageEncoder, siglip2_patches
from blip2.presets import TINY_VISION, preset, tiny_vision
from blip2.train.config import load_config
from blip2.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY1 = os.path.join(ROOT, "configs", "tiny-stage1.yaml")
TINY2 = os.path.join(ROOT, "configs", "tiny-stage2.yaml")


def _timm_usable() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:  # not installed, or installed without the torchvision it imports
        return False
    return True


needs_timm = pytest.mark.skipif(not _timm_usable(), reason="timm does not import here (it needs torchvision)")
FAMILIES = [
    pytest.param(f, marks=needs_timm) if TINY_VISION[f]["model_type"] == "timm_wrapper" else f
    for f in TINY_VISION
]


def _randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------- the features each family gives

# families read at the second-to-last block: a tower built with one block fewer reads a pretrained
# one's second-to-last hidden state, its final norm (and pooling head) unused
PENULTIMATE = ["clip", "siglip", "siglip2", "dinov2", "dinov2_with_registers"]


@pytest.mark.parametrize("family", PENULTIMATE)
def test_a_vit_family_gives_the_hidden_state_of_its_last_built_block_without_the_final_norm(family):
    import transformers

    from blip2.models.encoders import tower_class_and_config

    torch.manual_seed(0)
    cfg = tiny_vision(family)
    deeper = tiny_vision(family).__class__(hf_config={**cfg.hf_config, "num_hidden_layers": 3}, image_size=16)
    cls, hf_cfg = tower_class_and_config(deeper)
    full = transformers.AutoModel.from_config(hf_cfg).eval()
    _randomize(full)
    enc = ImageEncoder(cfg)
    result = enc.tower.load_state_dict(full.state_dict(), strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys and all(
        ".layers.2." in k
        or ".layer.2." in k
        or "post_layernorm" in k
        or "head" in k
        or k.startswith("layernorm")
        for k in result.unexpected_keys
    ), result.unexpected_keys
    px = torch.randn(2, 3, 16, 16)
    inputs = siglip2_patches(px, 4) if family == "siglip2" else {"pixel_values": px}
    with torch.no_grad():
        expected = full(**inputs, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(enc.features(px), expected, rtol=0, atol=1e-6)
    tokens = {"clip": 17, "siglip": 16, "siglip2": 16, "dinov2": 17, "dinov2_with_registers": 19}[family]
    assert enc(px).shape == (2, tokens, 32)  # CLS (+ 2 registers) + a 4 x 4 grid; SigLIP has no CLS


def test_siglip2_cut_into_its_full_grid_equals_siglip_with_the_same_weights():
    """NaFlex takes pre-cut patches: cut in transformers' order, SigLIP2 on a square image is SigLIP."""
    torch.manual_seed(0)
    siglip, siglip2 = ImageEncoder(tiny_vision("siglip")), ImageEncoder(tiny_vision("siglip2"))
    _randomize(siglip)
    state = dict(siglip.tower.state_dict())
    conv = state.pop("embeddings.patch_embedding.weight")  # (D, C, p, p) -> a linear map of (p, p, C) pixels
    state["embeddings.patch_embedding.weight"] = conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1)
    state.pop("embeddings.position_ids", None)
    siglip2.tower.load_state_dict(state)
    siglip2.ln_vision.load_state_dict(siglip.ln_vision.state_dict())
    px = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(siglip2(px), siglip(px), rtol=0, atol=1e-5)


def test_convnext_gives_its_last_stage_map_as_a_token_grid():
    enc = ImageEncoder(tiny_vision("convnext"))
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        grid = enc.tower(pixel_values=px).last_hidden_state  # (2, 32, 2, 2)
        assert torch.equal(enc.features(px), grid.flatten(2).transpose(1, 2))
    assert enc.width == 32 and enc(px).shape == (2, 4, 32)


def test_each_family_normalizes_images_as_it_was_trained_and_a_swapped_tower_follows():
    assert tiny_vision("siglip").image_mean == (0.5, 0.5, 0.5) == tiny_vision("siglip2").image_std
    assert tiny_vision("dinov2").image_mean == IMAGENET_MEAN == tiny_vision("convnext").image_mean
    assert tiny_vision("clip").image_mean == CLIP_MEAN == tiny_vision("eva").image_mean
    swapped = preset("tiny-stage1", vision={"hf_config": {**TINY_VISION["siglip"], "image_size": 16}})
    assert swapped.vision.image_mean == (0.5, 0.5, 0.5) and swapped.qformer.encoder_width == 32
    kept = preset("tiny-stage1-siglip", vision={"image_mean": (0.1, 0.2, 0.3)})
    assert kept.vision.image_mean == (0.1, 0.2, 0.3) and kept.vision.image_std == (0.5, 0.5, 0.5)


def test_an_unknown_tower_type_is_one_sentence():
    with pytest.raises(UserError, match="transformers knows no model_type 'not_a_tower'"):
        ImageEncoder(blip2.VisionConfig(hf_config={"model_type": "not_a_tower", "hidden_size": 8}))


@pytest.mark.skipif(_timm_usable(), reason="timm imports here")
def test_a_timm_tower_without_timm_is_one_sentence_naming_the_extra(tmp_path):
    with pytest.raises(UserError, match=r"a timm image encoder needs timm and torchvision .*blip2\[timm\]"):
        ImageEncoder(tiny_vision("timm-eva02"))
    ann, root = make_caption_json(str(tmp_path / "data"), n=2)
    p = blip2_cli(
        ["train", TINY1, "model.preset=tiny-stage1-timm-eva02", "data.kind=captions", f"data.path={ann}"]
        + [f"data.images={root}", f"train.output_dir={tmp_path / 'run'}"]
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "pip install 'blip2[timm]'" in p.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------- stage 1, round trip, stage 2, per family


def _stage1(tmp_path, family: str, steps: int = 6) -> str:
    ann, root = make_caption_json(str(tmp_path / "data"), n=4)
    out = tmp_path / "s1"
    cfg = load_config(
        TINY1,
        [f"model.preset=tiny-stage1-{family}" if family != "eva" else "model.preset=tiny-stage1"]
        + ["data.kind=captions", f"data.path={ann}", f"data.images={root}", "data.augment=false"]
        + [f"train.output_dir={out}", f"train.max_steps={steps}", "train.log_every=1", "train.save_every=0"]
        + ["train.batch_size=4", "optim.warmup_steps=0", "model.overrides.qformer.dropout=0.0"],
    )
    assert train(cfg).steps == steps
    return str(out)


def _assert_same_model(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.image_processor.mean.tolist() == b.image_processor.mean.tolist()
    assert a.image_processor.std.tolist() == b.image_processor.std.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_trains_stage1_round_trips_and_generates_in_stage2(tmp_path, family):
    from blip2.pipelines import load

    run = _stage1(tmp_path, family)
    lines = [m for m in _metrics(run) if "loss" in m]
    losses = [m["loss"] for m in lines]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert all(m["loss_itc"] > 0 and m["loss_itm"] > 0 and m["loss_itg"] > 0 for m in lines)
    assert losses[-1] < losses[0], losses

    # our folder: saved, loaded through the path real checkpoints take, bit-equal
    first = load(os.path.join(run, "final"))
    assert first.model.visual.config.model_type == TINY_VISION[family]["model_type"]
    first.save_pretrained(tmp_path / "again")
    again = load(str(tmp_path / "again"))
    _assert_same_model(first, again)
    image = tmp_path / "x.jpg"
    image.write_bytes(image_bytes(3))
    px = first.pixels([str(image)])
    with torch.no_grad():
        a, b = first.model.embed_image(px).image_feats, again.model.embed_image(px).image_feats
    assert torch.equal(a, b)
    transformers_layout = family == "eva"
    assert (tmp_path / "again" / "config.json").is_file() == transformers_layout
    assert (tmp_path / "again" / "model.safetensors").is_file() == transformers_layout

    # stage 2 on the trained Q-Former with the tiny OPT: trains, saves, loads back exactly, generates
    tok = make_llm_tokenizer(str(tmp_path / "tok"))
    ann = os.path.join(tmp_path, "data", "captions.json")
    cfg = load_config(
        TINY2,
        [f"model.init_from={run}/final", f"model.llm_tokenizer={tok}", "data.kind=captions"]
        + [f"data.path={ann}", f"data.images={tmp_path / 'data' / 'images'}", "train.max_steps=2"]
        + [f"train.output_dir={tmp_path / 's2'}", "train.save_every=0"],
    )
    train(cfg)
    captioner = load(str(tmp_path / "s2" / "final"))
    assert captioner.config.kind == "generation"
    captioner.save_pretrained(tmp_path / "s2-again")
    reloaded = load(str(tmp_path / "s2-again"))
    _assert_same_model(captioner, reloaded)
    assert (tmp_path / "s2-again" / "config.json").is_file() == transformers_layout
    texts = [
        p.caption(str(image), max_new_tokens=4, num_beams=n) for p in (captioner, reloaded) for n in (1, 2)
    ]
    assert texts[:2] == texts[2:] and all(isinstance(t, str) for t in texts)


# ------------------------------------------------------------------- feature cache, CLI, export


def test_a_dinov2_feature_cache_gives_the_loss_of_its_images(tmp_path):
    ann, root = make_caption_json(str(tmp_path / "data"), n=8)
    out = tmp_path / "cache"
    args = [
        "model.preset=tiny-stage1-dinov2",
        "data.kind=captions",
        f"data.path={ann}",
        f"data.images={root}",
    ]
    args += ["data.augment=false", "train.max_steps=3", "train.log_every=1", "train.save_every=0"]
    args += ["train.save_final=false"]
    p = blip2_cli(["cache-features", TINY1, *args, "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    train(load_config(TINY1, [*args, f"train.output_dir={tmp_path / 'images'}"]))
    train(load_config(TINY1, [*args, f"data.features={out}", f"train.output_dir={tmp_path / 'cached'}"]))
    la = [m["loss"] for m in _metrics(tmp_path / "images") if "loss" in m]
    lb = [m["loss"] for m in _metrics(tmp_path / "cached") if "loss" in m]
    assert len(la) == 3
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-5)


def test_cli_trains_a_siglip_stage1_and_convert_says_the_folder_is_ours(tmp_path):
    """Through `blip2 train` and `blip2 convert`: the folder of a SigLIP model is our layout (weights
    in our key names in `blip2_model.safetensors`, no `config.json`), and transformers refuses it
    rather than building a default EVA model in its place."""
    import transformers

    ann, root = make_caption_json(str(tmp_path / "data"), n=4)
    run = tmp_path / "run"
    p = blip2_cli(
        ["train", TINY1, "model.preset=tiny-stage1-siglip", "data.kind=captions", f"data.path={ann}"]
        + [f"data.images={root}", "train.max_steps=2", f"train.output_dir={run}"]
    )
    assert p.returncode == 0, p.stderr[-3000:]
    p = blip2_cli(["convert", str(run / "final"), str(tmp_path / "out")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "our layout" in p.stdout and "'siglip_vision_model' image encoder" in p.stdout, p.stdout
    folder = tmp_path / "out"
    assert not (folder / "config.json").exists() and not (folder / "model.safetensors").exists()
    from safetensors import safe_open

    with safe_open(str(folder / "blip2_model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "blip2"
        assert any(k.startswith("visual.tower.") for k in f.keys())
    with pytest.raises(OSError, match="no file named model.safetensors"):
        transformers.Blip2ForImageTextRetrieval.from_pretrained(str(folder))
    loaded = blip2.load(str(folder))
    assert loaded.model.visual.config.model_type == "siglip_vision_model"
    assert loaded.image_processor.mean.tolist() == [0.5, 0.5, 0.5]
    # a folder written before the weights had their own name (`model.safetensors`) still loads
    (folder / "blip2_model.safetensors").rename(folder / "model.safetensors")
    old = blip2.load(str(folder))
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, old.model.state_dict()[k]), k
