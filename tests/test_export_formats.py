"""Export formats: kohya/A1111 LoRA, text-encoder LoRA, full pipeline directory; each loads back in plain diffusers."""

import json
import re
import warnings

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from toydata import pipe_sample as sample
from toydata import randomize

from models.components import build_tiny
from models.export import EXPORT_INFO, LORA_FILE, export, export_full, export_lora
from models.kohya import KOHYA_FILE, KohyaUnsupportedError, to_kohya
from models.policy import DEFAULT_LORA_TARGETS, Policy
from models.textual_inversion import TI_FILE, add_placeholder, trainable_rows
from rayjobs.config import TrainableConfig

FULL_TARGETS = tuple(TrainableConfig().lora_targets)  # attention, ff, proj_in/out, resnet convs, conv_out
# every other LoRA-able SD 1.x UNet kind: resnet shortcut/time projection, conv_in, down/upsampler convs, ...
OTHER_TARGETS = ("conv_in", "time_emb_proj", "conv_shortcut", "conv", "ff.net.0.proj", "linear_1", "linear_2")
PROMPT = "a photo of <cat> on a mat"


def lora_policy(targets, text_encoder_lora=False):
    policy = Policy(build_tiny(), "lora", lora_rank=4, lora_alpha=8, lora_targets=targets)  # scale 2
    if text_encoder_lora:
        te_config = LoraConfig(r=4, lora_alpha=2, init_lora_weights="gaussian",  # scale 0.5
                               target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
        policy.components.text_encoder.add_adapter(te_config)
        randomize([p for n, p in policy.components.text_encoder.named_parameters() if "lora_" in n], seed=1)
    randomize(policy.parameters())  # B != 0: the LoRA changes the model
    return policy


def assert_loads_like(policy, directory, prompt="a red cube"):
    """diffusers file and kohya file, each into a fresh pipeline: same images as the trained model, not as base."""
    expected = sample(policy.components.pipeline(), prompt)
    base = build_tiny().pipeline()
    a, b = build_tiny().pipeline(), build_tiny().pipeline()
    a.load_lora_weights(str(directory))  # picks pytorch_lora_weights.safetensors
    b.load_lora_weights(str(directory), weight_name=KOHYA_FILE)
    assert torch.allclose(sample(a, prompt), expected, atol=1e-5)
    assert torch.allclose(sample(b, prompt), sample(a, prompt), atol=1e-5)
    assert not torch.allclose(sample(a, prompt, "latent"), sample(base, prompt, "latent"), atol=1e-3)


@pytest.mark.parametrize(
    "targets", [DEFAULT_LORA_TARGETS, FULL_TARGETS, OTHER_TARGETS], ids=["attention", "config-default", "other-kinds"]
)
def test_kohya_lora_loads_like_diffusers_lora(targets, tmp_path):
    policy = lora_policy(targets)
    assert export(policy, tmp_path) == tmp_path / LORA_FILE
    assert_loads_like(policy, tmp_path)
    kohya = load_file(str(tmp_path / KOHYA_FILE))
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert 3 * len(policy.named_trainable()) == 2 * len(kohya)  # A, B -> down, up, alpha
    assert all(v.ndim == 0 and v.item() == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))
    with safe_open(str(tmp_path / KOHYA_FILE), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert ("ss_network_args" in meta) == (targets != DEFAULT_LORA_TARGETS)  # 3x3 conv LoRA announced as conv_dim/alpha


def lora_deltas(root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Module path -> the weight change its active LoRA adapters make (scale * B @ A, conv-shaped for convolutions)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    with torch.no_grad():
        for name, module in root.named_modules():
            if isinstance(module, LoraLayer):
                adapters = [a for a in module.active_adapters if a in module.lora_A]
                if adapters:
                    out[name] = sum(module.get_delta_weight(a) for a in adapters)
    return out


@pytest.mark.parametrize(
    "targets, text_encoder_lora",
    [(DEFAULT_LORA_TARGETS, False), (FULL_TARGETS, False), (OTHER_TARGETS, False), (DEFAULT_LORA_TARGETS, True)],
    ids=["attention", "config-default", "other-kinds", "with-text-encoder"],
)
def test_kohya_file_through_load_lora_weights_gives_the_trained_weights(targets, text_encoder_lora, tmp_path):
    """diffusers' own kohya reader (load_lora_weights -> lora_conversion_utils) puts, on every module, the weight
    change the trained model has: compared weight by weight, not only through images."""
    policy = lora_policy(targets, text_encoder_lora=text_encoder_lora)
    export(policy, tmp_path)
    pipe = build_tiny().pipeline()
    pipe.load_lora_weights(str(tmp_path), weight_name=KOHYA_FILE)
    for trained, loaded in ((policy.components.unet, pipe.unet), (policy.components.text_encoder, pipe.text_encoder)):
        expected, got = lora_deltas(trained), lora_deltas(loaded)
        assert set(got) == set(expected)
        for name, delta in expected.items():
            torch.testing.assert_close(got[name], delta, atol=1e-6, rtol=1e-5, msg=name)
    assert bool(lora_deltas(pipe.text_encoder)) == text_encoder_lora


# The key families the A1111 WebUI's built-in Lora extension translates to its own (LDM) module names
# (`convert_diffusers_name_to_compvis`, read from its source, not run here); ComfyUI's key map has one entry
# `lora_unet_<diffusers key, "." -> "_">` per UNet weight and `lora_te_text_model_encoder_layers_<i>_<proj>`
# per CLIP projection. Both read `<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha`.
A1111_UNET = [re.compile(p) for p in (
    r"lora_unet_conv_in", r"lora_unet_conv_out", r"lora_unet_time_embedding_linear_[12]",
    r"lora_unet_(down|up)_blocks_\d+_(attentions|resnets)_\d+_.+", r"lora_unet_mid_block_(attentions|resnets)_\d+_.+",
    r"lora_unet_down_blocks_\d+_downsamplers_0_conv", r"lora_unet_up_blocks_\d+_upsamplers_0_conv",
)]  # fmt: skip
TEXT_ENCODER_KEY = re.compile(r"lora_te_text_model_encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc[12])")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


@pytest.mark.parametrize(
    "targets, text_encoder_lora",
    [(FULL_TARGETS, False), (OTHER_TARGETS, False), (DEFAULT_LORA_TARGETS, True)],
    ids=["config-default", "other-kinds", "with-text-encoder"],
)
def test_kohya_keys_have_the_layout_webui_and_comfyui_map(targets, text_encoder_lora, tmp_path):
    """What is checked of the WebUI / ComfyUI side (their loaders are not run: docs/exports.md): the key names
    and shapes. Loading in those programs themselves is untested."""
    policy = lora_policy(targets, text_encoder_lora=text_encoder_lora)
    export(policy, tmp_path)
    kohya = load_file(str(tmp_path / KOHYA_FILE))
    names = {k[: -len(s)] for k in kohya for s in KOHYA_SUFFIXES if k.endswith(s)}
    assert {f"{n}{s}" for n in names for s in KOHYA_SUFFIXES} == set(kohya)  # every module: down, up, alpha; nothing else
    # ComfyUI: "lora_unet_" + a diffusers UNet weight key with "." -> "_", and no two keys collapse to one name
    weights = [k[: -len(".weight")] for k in build_tiny().unet.state_dict() if k.endswith(".weight")]
    comfy = {"lora_unet_" + k.replace(".", "_"): k for k in weights}
    assert len(comfy) == len(weights)
    unet_names = {n for n in names if n.startswith("lora_unet_")}
    assert unet_names and unet_names <= set(comfy), sorted(unet_names - set(comfy))[:3]
    for name in unet_names:
        assert any(p.fullmatch(name) for p in A1111_UNET), name
    te_names = names - unet_names
    assert all(TEXT_ENCODER_KEY.fullmatch(n) for n in te_names), sorted(te_names)[:3]
    assert bool(te_names) == text_encoder_lora
    for name in names:
        down, up, alpha = (kohya[name + s] for s in KOHYA_SUFFIXES)
        assert alpha.ndim == 0 and down.shape[0] == up.shape[1] == 4, name  # rank 4: [r, in(, k, k)] and [out, r(, 1, 1)]


def test_to_kohya_key_names():
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    conv_a, conv_b = torch.randn(4, 32, 3, 3), torch.randn(64, 4, 1, 1)
    state = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": b,
        "unet.up_blocks.1.resnets.0.conv1.lora_A.weight": conv_a,
        "unet.up_blocks.1.resnets.0.conv1.lora_B.weight": conv_b,
        "text_encoder.encoder.layers.0.self_attn.out_proj.lora_A.weight": a,
        "text_encoder.encoder.layers.0.self_attn.out_proj.lora_B.weight": b,
    }
    out = to_kohya(state, alpha=2.0, rank=4)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    conv = "lora_unet_up_blocks_1_resnets_0_conv1"
    te = "lora_te_text_model_encoder_layers_0_self_attn_out_proj"
    assert set(out) == {f"{n}.{s}" for n in (q, conv, te) for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert torch.equal(out[f"{q}.lora_down.weight"], a) and torch.equal(out[f"{q}.lora_up.weight"], b)
    assert torch.equal(out[f"{conv}.lora_down.weight"], conv_a) and out[f"{te}.alpha"].item() == 2.0
    with pytest.raises(ValueError, match="rank"):
        to_kohya(state, alpha=2.0, rank=8)


def test_text_encoder_lora_round_trips_in_both_formats(tmp_path):
    policy = lora_policy(DEFAULT_LORA_TARGETS, text_encoder_lora=True)
    path = export(policy, tmp_path)  # picks up the text encoder's adapter
    keys = load_file(str(path)).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    kohya = load_file(str(tmp_path / KOHYA_FILE))
    te_alphas = {v.item() for k, v in kohya.items() if k.startswith("lora_te_") and k.endswith(".alpha")}
    assert te_alphas == {2.0}  # the text encoder's own alpha, not the UNet's
    assert_loads_like(policy, tmp_path)


def test_explicit_text_encoder_layers_and_unreadable_kohya_case(tmp_path):
    policy = lora_policy(DEFAULT_LORA_TARGETS)
    te = build_tiny().text_encoder
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["q_proj", "v_proj"])
    te.add_adapter(config)
    randomize([p for n, p in te.named_parameters() if "lora_" in n])
    layers = get_peft_model_state_dict(te)
    # diffusers cannot tell the format of a kohya text-encoder LoRA without out_proj/mlp keys
    with pytest.raises(KohyaUnsupportedError, match="out_proj"):
        to_kohya({f"text_encoder.{k}": v for k, v in layers.items()}, alpha=4, rank=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_lora(policy, tmp_path, text_encoder_layers=layers, text_encoder_config=config)
    assert any(KOHYA_FILE in str(w.message) for w in caught)
    assert not (tmp_path / KOHYA_FILE).exists()  # skipped, never written wrong
    pipe = build_tiny().pipeline()
    pipe.load_lora_weights(str(tmp_path))
    prompt_embeds = pipe.encode_prompt("a red cube", "cpu", 1, False)[0]
    with torch.no_grad():
        ids = pipe.tokenizer("a red cube", padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert torch.allclose(prompt_embeds, te(ids)[0], atol=1e-5)
    assert path == tmp_path / LORA_FILE


def test_lora_export_with_new_tokens_writes_textual_inversion(tmp_path):
    policy = lora_policy(DEFAULT_LORA_TARGETS)
    comps = policy.components
    add_placeholder(comps.tokenizer, comps.text_encoder, "<cat>", 2, None, torch.Generator().manual_seed(0))
    randomize([trainable_rows(comps.text_encoder)], seed=2, scale=1.0)
    export(policy, tmp_path)
    assert (tmp_path / TI_FILE).is_file()
    pipe = build_tiny().pipeline()
    pipe.load_lora_weights(str(tmp_path))
    pipe.load_textual_inversion(str(tmp_path))
    assert torch.allclose(sample(pipe, PROMPT), sample(comps.pipeline(), PROMPT), atol=1e-5)


def test_full_export_is_a_pipeline_directory(tmp_path):
    policy = Policy(build_tiny(), trainable="full")
    randomize(policy.parameters(), scale=0.01)
    assert export(policy, tmp_path) == tmp_path
    for name in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / EXPORT_INFO).read_text())["trained"] == ["unet"]
    loaded = StableDiffusionPipeline.from_pretrained(str(tmp_path), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.safety_checker is None
    assert torch.allclose(sample(loaded), sample(policy.components.pipeline()), atol=1e-5)
    base = sample(build_tiny().pipeline(), output_type="latent")
    assert not torch.allclose(sample(loaded, output_type="latent"), base, atol=1e-3)


def test_full_export_merges_new_token_rows(tiny, tmp_path):
    add_placeholder(tiny.tokenizer, tiny.text_encoder, "<cat>", 2, None, torch.Generator().manual_seed(0))
    randomize([trainable_rows(tiny.text_encoder)], seed=2, scale=1.0)
    with pytest.raises(ValueError, match="text_encoder_trained"):
        export_full(tiny, tmp_path / "no", text_encoder_trained=False)
    export_full(tiny, tmp_path, text_encoder_trained=True)
    loaded = StableDiffusionPipeline.from_pretrained(str(tmp_path), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert torch.allclose(sample(loaded, PROMPT), sample(tiny.pipeline(), PROMPT), atol=1e-5)
    assert json.loads((tmp_path / EXPORT_INFO).read_text())["trained"] == ["unet", "text_encoder"]


# The Policy's text-encoder modes (text_encoder="lora"/"full", trainable="none", tokens=...).


def test_text_encoder_only_lora_exports_without_unet_part(tmp_path):
    policy = Policy(build_tiny(), "none", text_encoder="lora", lora_rank=4, lora_alpha=2)
    randomize(policy.parameters())
    assert export(policy, tmp_path) == tmp_path / LORA_FILE
    assert all(k.startswith("text_encoder.") for k in load_file(str(tmp_path / LORA_FILE)))
    assert all(k.startswith("lora_te_") for k in load_file(str(tmp_path / KOHYA_FILE)))
    assert_loads_like(policy, tmp_path)


def test_fully_trained_text_encoder_beside_unet_lora(tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    policy = Policy(build_tiny(), "lora", text_encoder="full", lora_rank=4, lora_alpha=8)
    comps = policy.components
    randomize(policy.parameters(), scale=0.01)
    export(policy, tmp_path)
    pipe = build_tiny().pipeline()
    pipe.text_encoder = CLIPTextModel.from_pretrained(str(tmp_path), subfolder="text_encoder")
    pipe.tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path), subfolder="tokenizer")
    pipe.load_lora_weights(str(tmp_path))
    assert torch.allclose(sample(pipe), sample(comps.pipeline()), atol=1e-5)
    unet_only = build_tiny().pipeline()
    unet_only.load_lora_weights(str(tmp_path))
    assert not torch.allclose(sample(unet_only), sample(pipe), atol=1e-3)  # the text encoder's training matters


def test_full_export_merges_text_encoder_lora_and_tokens(tmp_path):
    comps = build_tiny()
    add_placeholder(comps.tokenizer, comps.text_encoder, "<cat>", 2, None, torch.Generator().manual_seed(0))
    policy = Policy(comps, "full", text_encoder="lora", lora_rank=4, lora_alpha=2, tokens={"<cat>": 2})
    randomize(policy.parameters(), scale=0.05)
    expected = sample(comps.pipeline(), PROMPT)
    assert export(policy, tmp_path) == tmp_path
    loaded = StableDiffusionPipeline.from_pretrained(str(tmp_path), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert torch.allclose(sample(loaded, PROMPT), expected, atol=1e-5)
    assert torch.equal(sample(comps.pipeline(), PROMPT), expected)  # the trained model itself is untouched


def test_tokens_only_export_returns_the_embedding_file(tmp_path):
    comps = build_tiny()
    add_placeholder(comps.tokenizer, comps.text_encoder, "<cat>", 3, "cat", None)
    policy = Policy(comps, "none", tokens={"<cat>": 3})
    randomize(policy.parameters(), seed=4, scale=1.0)
    assert export(policy, tmp_path) == tmp_path / TI_FILE
    assert sorted(p.name for p in tmp_path.iterdir()) == [TI_FILE]
    pipe = build_tiny().pipeline()
    pipe.load_textual_inversion(str(tmp_path))
    assert torch.allclose(sample(pipe, PROMPT), sample(comps.pipeline(), PROMPT), atol=1e-5)
