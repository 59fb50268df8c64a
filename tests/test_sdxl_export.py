"""SDXL exports (docs/exports.md): LoRA (UNet + both text encoders), kohya/SGM LoRA, clip_l/clip_g embeddings,
text encoders and the full pipeline; each loads into a fresh StableDiffusionXLPipeline and reproduces the
trained model's images."""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from toydata import pipe_sample as sample
from toydata import randomize

from models.export import EXPORT_INFO, LORA_FILE, export
from models.kohya import KOHYA_FILE, KohyaUnsupportedError, to_kohya
from models.kohya_sdxl import sgm_path
from models.policy import DEFAULT_LORA_TARGETS, Policy
from models.sdxl import build_tiny_sdxl
from models.textual_inversion import TI_FILE, add_placeholder
from rayjobs.config import TrainableConfig

PROMPT = "a photo of <cat> on a mat"
# every LoRA-able kind of the SDXL UNet: attention, ff, proj_in/out, resnet convs/shortcut/time projection,
# conv_in/conv_out, down/upsampler convs, time and added-condition embeddings
ALL_TARGETS = tuple(TrainableConfig().lora_targets) + ("conv_in", "time_emb_proj", "conv_shortcut", "conv",
                                                       "linear_1", "linear_2")
SGM_PREFIXES = ("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_",
                "lora_unet_out_", "lora_unet_time_embed_", "lora_unet_label_emb_", "lora_te1_", "lora_te2_")


def fresh():
    return build_tiny_sdxl().pipeline()


def with_placeholder(comps, token="<cat>", num_vectors=2, seed=0):
    """Add ``token`` to both tokenizers/encoders, as rayjobs/training/prepare.py does for SDXL."""
    generator = torch.Generator().manual_seed(seed)
    for tok, encoder in zip(comps.tokenizers, comps.text_encoders):
        add_placeholder(tok, encoder, token, num_vectors, None, generator)
    return comps


def lora_policy(targets=DEFAULT_LORA_TARGETS, text_encoder="lora"):
    policy = Policy(build_tiny_sdxl(), "lora", lora_rank=4, lora_alpha=8, lora_targets=targets, text_encoder=text_encoder)
    randomize(policy.parameters())  # B != 0: the LoRAs change the model
    return policy


def assert_same_images(pipe, expected, prompt="a red cube"):
    assert torch.allclose(sample(pipe, prompt), expected, atol=1e-5)


def test_sdxl_lora_round_trips_unet_and_both_text_encoders(tmp_path):
    policy = lora_policy()
    assert export(policy, tmp_path) == tmp_path / LORA_FILE
    keys = load_file(str(tmp_path / LORA_FILE)).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = fresh()
    pipe.load_lora_weights(str(tmp_path))
    assert_same_images(pipe, sample(policy.components.pipeline()))
    assert not torch.allclose(sample(pipe, output_type="latent"), sample(fresh(), output_type="latent"), atol=1e-3)
    unet_only = fresh()
    unet_only.load_lora_weights({k: v for k, v in load_file(str(tmp_path / LORA_FILE)).items() if k.startswith("unet.")})
    assert not torch.allclose(sample(unet_only), sample(pipe), atol=1e-3)  # the text-encoder LoRAs matter


@pytest.mark.parametrize("targets", [DEFAULT_LORA_TARGETS, ALL_TARGETS], ids=["attention", "all-kinds"])
def test_sdxl_kohya_file_uses_sgm_names_and_loads_like_diffusers_file(targets, tmp_path):
    policy = lora_policy(targets)
    export(policy, tmp_path)
    kohya = load_file(str(tmp_path / KOHYA_FILE))
    assert all(k.startswith(SGM_PREFIXES) for k in kohya), sorted(k for k in kohya if not k.startswith(SGM_PREFIXES))[:3]
    assert not any(word in k for k in kohya for word in ("down_blocks", "up_blocks", "mid_block"))
    assert any(k.startswith("lora_te1_text_model_") for k in kohya) and any(k.startswith("lora_te2_text_model_") for k in kohya)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert 3 * len(policy.named_trainable()) == 2 * len(kohya)  # A, B -> down, up, alpha: every module kept
    with safe_open(str(tmp_path / KOHYA_FILE), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4" and f.metadata()["ss_network_alpha"] == "8"
    a, b = fresh(), fresh()
    a.load_lora_weights(str(tmp_path))
    b.load_lora_weights(str(tmp_path), weight_name=KOHYA_FILE)
    assert_same_images(b, sample(a))
    assert_same_images(a, sample(policy.components.pipeline()))


def test_sgm_names_of_the_released_sdxl_layout():
    config = SimpleNamespace(layers_per_block=2, up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    expected = {
        "conv_in": "input_blocks.0.0",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.proj_out": "input_blocks.8.1.proj_out",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "mid_block.resnets.0.time_emb_proj": "middle_block.0.emb_layers.1",
        "mid_block.attentions.0.transformer_blocks.9.attn2.to_k": "middle_block.1.transformer_blocks.9.attn2.to_k",
        "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
        "up_blocks.0.attentions.2.proj_in": "output_blocks.2.1.proj_in",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.resnets.0.conv1": "output_blocks.3.0.in_layers.2",
        "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
        "conv_out": "out.2",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
    }
    assert {path: sgm_path(path, config) for path in expected} == expected


def test_upsampler_without_attention_is_refused_not_written_wrong():
    # SGM puts this upsampler at output_blocks.k.1, which diffusers' reader takes for an attention
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=16)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["conv"]))
    with pytest.raises(KohyaUnsupportedError, match="upsamplers"):
        to_kohya(get_peft_model_state_dict(unet), alpha=4, rank=4, sgm_config=unet.config)


def load_sdxl_embedding(pipe, path):
    """The documented two-call load of a {"clip_l", "clip_g"} file (docs/exports.md)."""
    with safe_open(str(path), "pt") as f:
        token = f.metadata()["token"]
    rows = load_file(str(path))
    pipe.load_textual_inversion(rows["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(rows["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)


def test_sdxl_textual_inversion_is_one_clip_l_clip_g_file(tmp_path):
    comps = with_placeholder(build_tiny_sdxl())
    policy = Policy(comps, "none", tokens={"<cat>": 2})
    randomize(policy.token_rows(), seed=4, scale=1.0)
    assert export(policy, tmp_path) == tmp_path / TI_FILE
    assert sorted(p.name for p in tmp_path.iterdir()) == [TI_FILE]
    saved = load_file(str(tmp_path / TI_FILE))
    assert {k: list(v.shape) for k, v in saved.items()} == {"clip_l": [2, 16], "clip_g": [2, 32]}
    assert torch.equal(saved["clip_g"], policy.token_rows()[1].detach())
    pipe = fresh()
    load_sdxl_embedding(pipe, tmp_path / TI_FILE)
    assert_same_images(pipe, sample(comps.pipeline(), PROMPT), PROMPT)
    base = with_placeholder(build_tiny_sdxl())  # same placeholder, untrained rows
    assert not torch.allclose(sample(pipe, PROMPT, "latent"), sample(base.pipeline(), PROMPT, "latent"), atol=1e-3)


def test_sdxl_several_placeholders_beside_a_lora(tmp_path):
    policy = lora_policy(text_encoder="none")
    comps = with_placeholder(with_placeholder(policy.components, "<a>", 1, seed=1), "<b>", 2, seed=2)
    policy.tokens = {"<a>": 1, "<b>": 2}
    randomize(policy.token_rows(), seed=5, scale=1.0)
    prompt = "<a> next to <b>"
    export(policy, tmp_path)
    pipe = fresh()
    pipe.load_lora_weights(str(tmp_path))
    for k, token in enumerate(("<a>", "<b>")):
        path = tmp_path / f"learned_embeds_{k}.safetensors"
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"token": token}
        load_sdxl_embedding(pipe, path)
    assert_same_images(pipe, sample(comps.pipeline(), prompt), prompt)


def test_sdxl_full_export_merges_text_encoder_loras_and_tokens(tmp_path):
    comps = with_placeholder(build_tiny_sdxl())
    policy = Policy(comps, "full", text_encoder="lora", lora_rank=4, lora_alpha=2, tokens={"<cat>": 2})
    randomize(policy.parameters(), scale=0.05)
    expected = sample(comps.pipeline(), PROMPT)
    assert export(policy, tmp_path) == tmp_path
    for name in ("model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / EXPORT_INFO).read_text())["trained"] == ["unet", "text_encoder", "text_encoder_2"]
    loaded = StableDiffusionXLPipeline.from_pretrained(str(tmp_path), local_files_only=True, add_watermarker=False)
    loaded.set_progress_bar_config(disable=True)
    assert_same_images(loaded, expected, PROMPT)
    assert torch.equal(sample(comps.pipeline(), PROMPT), expected)  # the trained model itself is untouched
    assert not torch.allclose(sample(loaded, output_type="latent"), sample(fresh(), output_type="latent"), atol=1e-3)


def test_sdxl_fully_trained_text_encoders_beside_unet_lora(tmp_path):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    policy = lora_policy(text_encoder="full")
    randomize(policy.parameters(), scale=0.01)
    export(policy, tmp_path)
    pipe = fresh()
    pipe.text_encoder = CLIPTextModel.from_pretrained(str(tmp_path), subfolder="text_encoder")
    pipe.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(str(tmp_path), subfolder="text_encoder_2")
    pipe.tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path), subfolder="tokenizer")
    pipe.tokenizer_2 = CLIPTokenizer.from_pretrained(str(tmp_path), subfolder="tokenizer_2")
    pipe.load_lora_weights(str(tmp_path))
    assert_same_images(pipe, sample(policy.components.pipeline()))
