"""Stage 2 around a reused Q-Former (`model.qformer_from`, `model.trainable`), LoRA adapters on the LLM
(`lora`), LLM placement for inference (`device_map`, 8/4-bit) and the shipped recipes, through the real
entry points (`blip2 train`, `blip2.train.loop.train`, `blip2.load`, the CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_interop_lavis_files import _random_state  # a LAVIS file's tensors, random
from train_utils import blip2_cli, image_bytes, make_caption_json, make_llm_tokenizer

import blip2
from blip2.interop import lora
from blip2.interop.checkpoint import load_folder, read_config, save_folder
from blip2.models import RetrievalModel
from blip2.presets import TINY_LLMS, preset
from blip2.train import checkpoint
from blip2.train.config import load_config
from blip2.train.loop import build_task, train

ROOT = Path(__file__).resolve().parent.parent
TINY2 = str(ROOT / "configs" / "tiny-stage2.yaml")


@dataclass
class World:
    stage1: Path  # a trained-looking stage-1 model folder (random weights)
    llm: Path  # a pretrained-looking transformers OPT folder
    tokenizer: Path
    captions: str
    images: str
    image: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    import transformers

    root = tmp_path_factory.mktemp("reuse")
    torch.manual_seed(0)
    stage1 = RetrievalModel(preset("tiny-stage1"))
    save_folder(stage1, root / "stage1")
    llm = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**TINY_LLMS["opt"]))
    llm.save_pretrained(root / "llm")
    captions, images = make_caption_json(str(root / "data"), n=8)
    (root / "x.jpg").write_bytes(image_bytes(3))
    tok = make_llm_tokenizer(str(root / "tok"))
    return World(root / "stage1", root / "llm", Path(tok), captions, images, root / "x.jpg")


def _args(w: World, out: Path, *extra: str) -> list[str]:
    """`blip2 train` overrides: tiny-opt's model around the stage-1 Q-Former, the OPT folder as LLM."""
    return [
        "model.init_from=null",
        "model.preset=tiny-opt",
        f"model.llm={w.llm}",
        f"model.qformer_from={w.stage1}",
        f"model.llm_tokenizer={w.tokenizer}",
        "data.kind=captions",
        f"data.path={w.captions}",
        f"data.images={w.images}",
        f"train.output_dir={out}",
        "train.max_steps=3",
        "train.save_every=0",
        "train.log_every=1",
        "optim.warmup_steps=0",
        *extra,
    ]


def _llm_reference(w: World) -> dict[str, torch.Tensor]:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(w.llm).state_dict()


def _assert_equal(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str) -> None:
    assert set(reference) <= set(state), what
    changed = [k for k, v in reference.items() if not torch.equal(state[k], v)]
    assert not changed, f"{what} changed: {changed[:3]}"


def _optimizer_size(run: Path) -> int:
    _, state = checkpoint.load(checkpoint.find(str(run)))
    return sum(len(g["params"]) for g in state["optimizer"]["param_groups"])


# ------------------------------------------------------------------------------------ reused Q-Former


def test_a_reused_qformer_with_a_new_llm_trains_only_the_projection(world, tmp_path):
    out = tmp_path / "run"
    p = blip2_cli(["train", TINY2, *_args(world, out)])
    assert p.returncode == 0, p.stderr[-3000:]
    source = load_folder(world.stage1, read_config(world.stage1))
    final = blip2.load(str(out / "final")).model
    # the Q-Former (its query side), queries, ln_vision and the same tower: bit-equal to the source
    qformer = final.qformer.state_dict()
    _assert_equal(qformer, {k: v for k, v in source.qformer.state_dict().items() if k in qformer}, "Q-Former")
    assert torch.equal(final.query_tokens, source.query_tokens)
    _assert_equal(final.visual.state_dict(), source.visual.state_dict(), "image encoder")
    _assert_equal(final.llm.state_dict(), _llm_reference(world), "LLM")
    # the projection moved from where it started (the same seed builds the same start)
    torch.manual_seed(0)
    start = build_task(load_config(TINY2, _args(world, out))).model
    assert not torch.equal(final.language_projection.weight, start.language_projection.weight)
    _assert_equal(start.qformer.state_dict(), qformer, "the start's Q-Former")
    # what the optimizer held and the checkpoint kept: the projection only
    trainable, _ = checkpoint.load(checkpoint.find(str(out)))
    assert set(trainable) == {"language_projection.weight", "language_projection.bias"}
    assert _optimizer_size(out) == 2


def test_projection_and_qformer_train_and_nothing_else(world, tmp_path):
    out = tmp_path / "run"
    p = blip2_cli(["train", TINY2, *_args(world, out, "model.trainable=projection+qformer")])
    assert p.returncode == 0, p.stderr[-3000:]
    source = load_folder(world.stage1, read_config(world.stage1))
    final = blip2.load(str(out / "final")).model
    src = source.qformer.state_dict()
    moved = [k for k, v in final.qformer.state_dict().items() if not torch.equal(v, src[k])]
    assert moved and not torch.equal(final.query_tokens, source.query_tokens)
    _assert_equal(final.visual.state_dict(), source.visual.state_dict(), "image encoder and ln_vision")
    _assert_equal(final.llm.state_dict(), _llm_reference(world), "LLM")
    expected = 2 + len(list(final.qformer.parameters())) + 1  # projection, Q-Former, queries
    assert _optimizer_size(out) == expected


def test_a_qformer_of_another_width_or_no_qformer_is_one_sentence(world, tmp_path):
    wide = _args(world, tmp_path / "a", "model.overrides.vision.hf_config.hidden_size=64")
    p = blip2_cli(["train", TINY2, *wide])
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "reads 48-wide image features and this model's image tower gives 64-wide ones" in p.stderr
    none = _args(world, tmp_path / "b", f"model.qformer_from={world.llm}")
    p = blip2_cli(["train", TINY2, *none])
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "model.qformer_from" in p.stderr, p.stderr[-2000:]


def _tiny_lavis_files(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """A LAVIS stage-1 `.pth` of tiny-stage1's sizes (its keys written down from LAVIS, as the LAVIS
    interop tests write them) saved as `folder/name`, the `eva_vit_g.pth` beside it; returns its state."""
    from lavis_keys import lavis_qformer_keys, lavis_vision_keys

    q = preset("tiny-stage1").qformer
    state = _random_state(
        lavis_qformer_keys(q.num_layers, q.hidden_size, q.intermediate_size, 48, q.cross_attention_freq,
                           q.num_query_tokens, q.vocab_size, text=True, embed=preset("tiny-stage1").embed_dim),
        seed=1,
    )  # fmt: skip
    position = "Qformer.bert.embeddings.position_embeddings.weight"
    state[position] = state[position][: q.max_position_embeddings]
    state["Qformer.cls.predictions.decoder.weight"] = state["Qformer.bert.embeddings.word_embeddings.weight"]
    state["Qformer.cls.predictions.decoder.bias"] = state["Qformer.cls.predictions.bias"]
    folder.mkdir()
    eva = _random_state(lavis_vision_keys(depth=3, width=48, mlp=64, positions=17, patch=4), seed=2)
    torch.save({"model": state}, folder / name)
    torch.save(eva, folder / "eva_vit_g.pth")
    return state


def test_a_lavis_checkpoint_s_q_former_is_reused(world, tmp_path, monkeypatch):
    """A LAVIS stage-1 `.pth` and the `eva_vit_g.pth` beside it start stage 2 for a new LLM: the
    Q-Former, queries and `ln_vision` are the file's tensors, and only the projection trains."""
    from blip2.interop import lavis

    folder = tmp_path / "lavis"
    state = _tiny_lavis_files(folder, "blip2_tiny.pth")
    # a released file is known by its name (`blip2_pretrained.pth`: blip2-stage1-vit-g); this tiny one
    # is made known the same way
    monkeypatch.setitem(lavis.FILES, "blip2_tiny.pth", "tiny-stage1")

    out = tmp_path / "run"
    result = train(load_config(TINY2, _args(world, out, f"model.qformer_from={folder / 'blip2_tiny.pth'}")))
    assert result.steps == 3
    final = blip2.load(str(out / "final")).model
    qformer = final.qformer.state_dict()
    # the file's own tensors, by LAVIS's names
    layer = "Qformer.bert.encoder.layer.0"
    by_hand = {
        "layers.0.self_attn.query.weight": f"{layer}.attention.self.query.weight",
        "layers.0.cross_attn.key.weight": f"{layer}.crossattention.self.key.weight",
        "layers.0.query_ffn.fc1.weight": f"{layer}.intermediate_query.dense.weight",
    }
    for ours, theirs in by_hand.items():
        assert torch.equal(qformer[ours], state[theirs]), ours
    assert torch.equal(final.query_tokens, state["query_tokens"])
    assert torch.equal(final.visual.ln_vision.weight, state["ln_vision.weight"])
    # all of it: the Q-Former as blip2.load reads the file, and its tower (the file beside it)
    source = blip2.load(str(folder / "blip2_tiny.pth")).model
    _assert_equal(qformer, {k: v for k, v in source.qformer.state_dict().items() if k in qformer}, "Q-Former")
    _assert_equal(final.visual.state_dict(), source.visual.state_dict(), "image encoder")
    _assert_equal(final.llm.state_dict(), _llm_reference(world), "LLM")
    trainable, _ = checkpoint.load(checkpoint.find(str(out)))
    assert set(trainable) == {"language_projection.weight", "language_projection.bias"}
    assert _optimizer_size(out) == 2


@pytest.mark.parametrize("setting", ["model.qformer_from", "model.init_from"])
def test_a_lavis_file_under_another_name_says_what_to_do_in_the_config(world, tmp_path, setting):
    """A LAVIS `.pth` under a name LAVIS did not release names no model: the sentence says what to do
    in a training config (convert it, then name the folder), not the command line's --preset; done as
    it says, the Q-Former is reused."""
    folder = tmp_path / "lavis"
    state = _tiny_lavis_files(folder, "my_qformer.pth")
    file = folder / "my_qformer.pth"
    if setting == "model.qformer_from":
        named = [f"model.qformer_from={file}"]
    else:
        named = ["model.qformer_from=null", "model.preset=null", f"model.init_from={file}"]
    p = blip2_cli(["train", TINY2, *_args(world, tmp_path / "run", *named)])
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    error = p.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {setting}: my_qformer.pth is a checkpoint file"), error
    assert f"`blip2 convert {file} DIR --preset NAME`" in error and error.endswith(
        f"and set {setting} to DIR"
    )
    assert "--preset NAME on the command line" not in error and "preset=NAME" not in error
    if setting == "model.init_from":
        return
    converted = tmp_path / "converted"
    p = blip2_cli(["convert", str(file), str(converted), "--preset", "tiny-stage1"])
    assert p.returncode == 0, p.stderr[-3000:]
    p = blip2_cli(["train", TINY2, *_args(world, tmp_path / "run2", f"model.qformer_from={converted}")])
    assert p.returncode == 0, p.stderr[-3000:]
    final = blip2.load(str(tmp_path / "run2" / "final")).model
    assert torch.equal(final.query_tokens, state["query_tokens"])


# ------------------------------------------------------------------------------------------- LoRA


def _lora_config(w: World, out: Path, *extra: str):
    args = [
        "model.init_from=null",
        "model.preset=tiny-opt",
        "model.llm=null",
        f"model.overrides.llm.name={w.llm}",
        f"model.llm_tokenizer={w.tokenizer}",
        "data.kind=captions",
        f"data.path={w.captions}",
        f"data.images={w.images}",
        f"train.output_dir={out}",
        "train.max_steps=4",
        "train.save_every=2",
        "train.log_every=1",
        "optim.warmup_steps=0",
        "optim.lr=1e-2",
        "lora.rank=4",
        "lora.alpha=8",
        "lora.dropout=0.0",
        *extra,
    ]
    return load_config(TINY2, args)


def _logits_and_tokens(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        logits = model(pixels, ids).logits
    tokens = model.generate(pixels, max_new_tokens=8, num_beams=1)
    return logits, tokens


@pytest.fixture(scope="module")
def lora_runs(world, tmp_path_factory):
    """A LoRA run saved with its adapters beside the model, and the same run resumed at step 2 with
    `lora.merge` (so saved merged)."""
    root = tmp_path_factory.mktemp("lora")
    train(_lora_config(world, root / "adapters"))
    ckpt = root / "adapters" / "checkpoints" / "step-00000002"
    train(_lora_config(world, root / "merged", "lora.merge=true"), resume=str(ckpt))
    return root / "adapters", root / "merged"


def test_lora_trains_only_the_adapters(world, lora_runs):
    run, _ = lora_runs
    final = run / "final"
    base = load_folder(final, read_config(final))  # the saved LLM, without its adapters
    _assert_equal(base.llm.state_dict(), _llm_reference(world), "base LLM")
    assert lora.is_adapter_folder(final / lora.ADAPTER_FOLDER)
    adapters = load_file(final / lora.ADAPTER_FOLDER / lora.ADAPTER_WEIGHTS)
    b = [v for k, v in adapters.items() if "lora_B" in k]
    assert b and all(v.abs().max() > 0 for v in b)  # lora_B starts at zero: every adapter trained
    trainable, _ = checkpoint.load(checkpoint.find(str(run)))
    in_llm = [k for k in trainable if k.startswith("llm.")]
    assert in_llm and all("lora_" in k for k in in_llm)
    assert "language_projection.weight" in trainable and any(k.startswith("qformer.") for k in trainable)


def test_merged_and_adapter_folders_reproduce_the_unmerged_model(world, lora_runs):
    run, merged_run = lora_runs
    final = run / "final"
    unmerged = load_folder(final, read_config(final))
    lora.load_adapter(unmerged.llm, final / lora.ADAPTER_FOLDER)  # as it trained: adapters unmerged
    assert lora.has_lora(unmerged.llm)
    pipe = blip2.load(str(final))
    pixels = pipe.pixels(str(world.image))
    logits, tokens = _logits_and_tokens(unmerged, pixels)
    # the adapter folder, applied by blip2.load (merged in on load)
    loaded = pipe.model
    assert not lora.has_lora(loaded.llm)
    got_logits, got_tokens = _logits_and_tokens(loaded, pixels)
    torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_tokens, tokens)
    # the run resumed at step 2 and saved merged: a plain folder with the same model
    assert not (merged_run / "final" / lora.ADAPTER_FOLDER).exists()
    a, _ = checkpoint.load(checkpoint.find(str(run)))
    b, _ = checkpoint.load(checkpoint.find(str(merged_run)))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # resume: bit-exact
    merged = blip2.load(str(merged_run / "final")).model
    got_logits, got_tokens = _logits_and_tokens(merged, pixels)
    torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_tokens, tokens)


def test_an_unmerged_folder_is_refused_by_transformers_and_a_merged_one_loads(world, lora_runs):
    """`merge: false` saves the LLM as it started with the adapters beside it: transformers would load
    that as the base model without them, so the folder is written in our layout (no config.json) and
    transformers refuses it, while `blip2.load` applies the adapters. `merge: true` writes transformers'
    layout, which loads there with the trained (merged) LLM."""
    from transformers import Blip2ForConditionalGeneration

    run, merged_run = lora_runs
    final = run / "final"
    assert not (final / "config.json").exists() and (final / "blip2_model.safetensors").is_file()
    with pytest.raises(OSError):
        Blip2ForConditionalGeneration.from_pretrained(final)  # no weights where it looks
    q_proj = "model.decoder.layers.0.self_attn.q_proj.weight"
    loaded = blip2.load(str(final)).model.llm.state_dict()[q_proj]
    assert not torch.equal(loaded, _llm_reference(world)[q_proj])  # the adapters are in

    merged = merged_run / "final"
    assert (merged / "config.json").is_file()
    hf = Blip2ForConditionalGeneration.from_pretrained(merged).state_dict()
    theirs = [
        v for k, v in hf.items() if k.startswith("language_model.") and k.endswith(q_proj[len("model.") :])
    ]
    ours = blip2.load(str(merged)).model.llm.state_dict()[q_proj]
    assert len(theirs) == 1 and torch.equal(theirs[0], ours)
    assert torch.allclose(ours, loaded, atol=1e-6)  # the same trained LLM either way


def test_the_adapter_folder_is_peft_s_own(world, lora_runs):
    import transformers
    from peft import PeftModel

    run, _ = lora_runs
    final = run / "final"
    ours = load_folder(final, read_config(final)).llm
    lora.load_adapter(ours, final / lora.ADAPTER_FOLDER)
    theirs = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(world.llm), str(final / lora.ADAPTER_FOLDER)
    )
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(ids).logits, ours.eval()(input_ids=ids).logits)


def test_lora_settings_are_checked(world, tmp_path):
    from blip2.errors import UserError

    with pytest.raises(UserError, match="lora.rank must be at least 1"):
        _lora_config(world, tmp_path, "lora.rank=0")
    with pytest.raises(UserError, match="no default LoRA target for a 'gptj' LLM|could not be added"):
        train(_lora_config(world, tmp_path / "r", "lora.target_modules=[nothing_here]"))


def test_lora_without_peft_is_one_sentence(world, tmp_path, monkeypatch):
    """peft missing (made unimportable here: `import peft` raises, as where the extra is not installed):
    a `lora:` config fails with the sentence naming the extra."""
    import sys

    from blip2.errors import UserError

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(UserError, match=r"^LoRA needs the peft package: pip install 'blip2\[lora\]'$"):
        train(_lora_config(world, tmp_path / "run"))
    assert not (tmp_path / "run" / "final").exists()


# ------------------------------------------------------------------------------ LLM placement


@pytest.fixture(scope="module")
def captioner(world, tmp_path_factory) -> Path:
    """A stage-2 folder (tiny OPT) saved as `blip2.load` reads it."""
    from blip2.models import LanguageBridge
    from blip2.pipelines.load import pipeline_for
    from blip2.processing import ImageProcessor
    from blip2.tokenizers import llm_tokenizer

    torch.manual_seed(1)
    config = preset("tiny-opt")
    model = LanguageBridge(config)
    v = config.vision
    pipe = pipeline_for(
        model, ImageProcessor(v.image_size, v.image_mean, v.image_std), llm_tokenizer(str(world.tokenizer))
    )
    folder = tmp_path_factory.mktemp("captioner") / "model"
    pipe.save_pretrained(folder)
    return folder


def test_device_map_auto_and_disk_offload_generate_the_same(world, captioner, tmp_path):
    plain = blip2.load(str(captioner))
    want = plain.caption(str(world.image), max_new_tokens=6, num_beams=2)
    auto = blip2.load(str(captioner), device_map="auto")
    assert auto.caption(str(world.image), max_new_tokens=6, num_beams=2) == want
    assert set((getattr(auto.model.llm, "hf_device_map", None) or {"": "cpu"}).values()) <= {"cpu", 0}
    # room for the embeddings only: the decoder layers go to disk and come back layer by layer
    offloaded = blip2.load(
        str(captioner), device_map="auto", max_memory={"cpu": "20KB"}, offload_folder=str(tmp_path / "off")
    )
    assert "disk" in set(offloaded.model.llm.hf_device_map.values())
    assert offloaded.caption(str(world.image), max_new_tokens=6, num_beams=2) == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="the sentence is for machines without CUDA")
def test_8bit_and_4bit_without_cuda_are_one_sentence(world, captioner):
    for flag in ("--load-in-8bit", "--load-in-4bit"):
        p = blip2_cli(["caption", "--model", str(captioner), "--device", "cpu", flag, str(world.image)])
        assert p.returncode != 0 and "Traceback" not in p.stderr
        assert f"{flag} quantizes the LLM with bitsandbytes, which runs on a CUDA GPU" in p.stderr, p.stderr


def test_8bit_and_4bit_together_are_one_sentence(world, captioner):
    p = blip2_cli(
        ["caption", "--model", str(captioner), "--load-in-8bit", "--load-in-4bit", str(world.image)]
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "error: choose one of --load-in-8bit and --load-in-4bit" in p.stderr, p.stderr


@pytest.mark.parametrize("flag", ["load_in_8bit", "load_in_4bit"])
def test_8bit_and_4bit_without_bitsandbytes_are_one_sentence(captioner, monkeypatch, flag):
    """Where CUDA is there (faked: no GPU here) but bitsandbytes is not (made unimportable), the sentence
    names the extra, before anything loads."""
    import sys

    from blip2.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    option = "--" + flag.replace("_", "-")
    with pytest.raises(
        UserError, match=rf"^{option} needs the bitsandbytes package: pip install 'blip2\[quant\]'$"
    ):
        blip2.load(str(captioner), **{flag: True})


# ------------------------------------------------------------------------------------------ recipes

RECIPES = ROOT / "configs" / "recipes"
# tiny random models of the recipes' families (same model types, a few thousand weights)
TINY_TOWERS = {
    "siglip": {
        "model_type": "siglip",
        "text_config": {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        "vision_config": {
            "hidden_size": 48,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 16,
            "patch_size": 4,
        },
    },
    "dinov2": {
        "model_type": "dinov2",
        "hidden_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "mlp_ratio": 2,
        "image_size": 16,
        "patch_size": 4,
    },
}
TINY_TEXT = {
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 2},
    "llama": {"model_type": "llama", "num_key_value_heads": 2},
}
PIXELS = {"siglip": ([0.5] * 3, [0.5] * 3), "dinov2": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}


def _tiny_tower(family: str, folder: Path) -> Path:
    import json

    import transformers

    spec = dict(TINY_TOWERS[family])
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    mean, std = PIXELS[family]
    settings = {"size": {"height": 16, "width": 16}, "image_mean": mean, "image_std": std}
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    return folder


def _tiny_llm(family: str, folder: Path) -> Path:
    import transformers

    spec = {
        "vocab_size": 99,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
        **TINY_TEXT[family],
    }
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


SMALL_QFORMER = [
    "model.overrides.qformer.hidden_size=32",
    "model.overrides.qformer.num_layers=2",
    "model.overrides.qformer.num_heads=4",
    "model.overrides.qformer.intermediate_size=37",
    "model.overrides.qformer.num_query_tokens=8",
    "model.overrides.vision.dtype=float32",
]


def _run_settings(w: World, out: Path) -> list[str]:
    return [
        "data.kind=captions",
        f"data.path={w.captions}",
        f"data.images={w.images}",
        "data.num_workers=0",
        f"train.output_dir={out}",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.save_every=0",
        "train.log_every=1",
        "train.precision=float32",
        "train.device=cpu",
        "optim.warmup_steps=0",
    ]


@pytest.mark.parametrize(
    "recipe,tower,llm",
    [("siglip-qwen2.5-1.5b", "siglip", "qwen2"), ("dinov2-llama3.2-1b", "dinov2", "llama")],
)
def test_each_recipe_trains_stage_1_then_stage_2_with_tiny_models_of_its_families(
    world, tmp_path, recipe, tower, llm
):
    """The shipped recipe through the real config loader, its hub models swapped for tiny random ones of
    the same families; stage 2 continues from the stage-1 run as the recipe says, and loads and captions."""
    import yaml

    assert sorted(p.name for p in RECIPES.glob(f"{recipe}-*.yaml")) == [
        f"{recipe}-stage1.yaml",
        f"{recipe}-stage2.yaml",
    ]
    stage1_cfg = load_config(
        str(RECIPES / f"{recipe}-stage1.yaml"),
        [f"model.vision={_tiny_tower(tower, tmp_path / tower)}", "model.qformer_init=null"]
        + SMALL_QFORMER
        + _run_settings(world, tmp_path / "s1"),
    )
    raw = yaml.safe_load((RECIPES / f"{recipe}-stage1.yaml").read_text())
    assert raw["model"]["vision"].split("/")[0] in ("google", "facebook")  # the real hub names ship
    train(stage1_cfg)
    s1 = blip2.load(str(tmp_path / "s1" / "final"))
    assert s1.model.config.vision.hf_config["model_type"].startswith(tower)
    assert list(s1.model.config.vision.image_mean) == PIXELS[tower][0]  # from the tower's processor
    # the frozen tower is the pretrained one (model.vision), weight for weight
    import transformers

    saved = transformers.AutoModel.from_pretrained(tmp_path / tower)
    saved = getattr(saved, "vision_model", saved)  # SigLIP: its image side
    pretrained = {k.removeprefix("vision_model."): v for k, v in saved.state_dict().items()}
    weights = {k.removeprefix("vision_model."): v for k, v in s1.model.visual.tower.state_dict().items()}
    shared = [k for k in weights if k in pretrained]
    assert len(shared) == len(weights)
    assert all(torch.equal(weights[k], pretrained[k]) for k in shared)
    stage2 = RECIPES / f"{recipe}-stage2.yaml"
    llm_folder = _tiny_llm(llm, tmp_path / llm)
    stage2_cfg = load_config(
        str(stage2),
        [
            f"model.init_from={tmp_path / 's1' / 'final'}",
            f"model.llm={llm_folder}",
            f"model.llm_tokenizer={world.tokenizer}",
        ]
        + _run_settings(world, tmp_path / "s2")
        + (["lora.rank=4"] if llm == "qwen2" else []),  # the Qwen recipe ships LoRA off: try it on
    )
    assert stage2_cfg.model.init_from and stage2_cfg.model.llm == str(llm_folder)
    train(stage2_cfg)
    final = tmp_path / "s2" / "final"
    if llm == "qwen2":  # LoRA on: every adapter trained, the base LLM stayed as its folder has it
        adapters = load_file(final / lora.ADAPTER_FOLDER / lora.ADAPTER_WEIGHTS)
        b = [v for k, v in adapters.items() if "lora_B" in k]
        assert b and all(v.abs().max() > 0 for v in b)  # lora_B starts at zero
        reference = transformers.AutoModelForCausalLM.from_pretrained(llm_folder).state_dict()
        _assert_equal(load_folder(final, read_config(final)).llm.state_dict(), reference, "base LLM")
    pipe = blip2.load(str(final))
    assert pipe.model.llm.config.model_type == llm
    assert isinstance(pipe.caption(str(world.image), max_new_tokens=4), str)


@pytest.mark.parametrize("kind", ["tiny-opt", "tiny-instruct-opt"])
def test_a_stage_2_or_instructblip_q_former_is_reused_too(world, tmp_path, kind):
    """The Q-Former of a BLIP-2 stage-2 folder or of an InstructBLIP folder (saved in transformers'
    layout) starts a new model: query side, queries, tower and ln_vision as saved, only the projection
    trainable."""
    from blip2.errors import UserError
    from blip2.models import InstructBridge, LanguageBridge

    torch.manual_seed(2)
    config = preset(kind)
    source = (InstructBridge if config.kind == "instruct" else LanguageBridge)(config)
    save_folder(source, tmp_path / "source")
    cfg = load_config(TINY2, _args(world, tmp_path / "run", f"model.qformer_from={tmp_path / 'source'}"))
    model = build_task(cfg).model
    assert type(model) is LanguageBridge
    qformer = model.qformer.state_dict()
    _assert_equal(qformer, {k: v for k, v in source.qformer.state_dict().items() if k in qformer}, "Q-Former")
    assert torch.equal(model.query_tokens, source.query_tokens)
    _assert_equal(model.visual.state_dict(), source.visual.state_dict(), "image encoder")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "language_projection.weight",
        "language_projection.bias",
    }
    # another tower of the same width, with nothing to load it from: refused, never a random tower
    other = _args(world, tmp_path / "run", "model.overrides.vision.hf_config.num_hidden_layers=1")
    with pytest.raises(UserError, match="nothing names pretrained weights for this one: set model.vision"):
        build_task(load_config(TINY2, [*other, f"model.qformer_from={tmp_path / 'source'}"]))
