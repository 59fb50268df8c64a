"""`draftray sample` on SDXL (tiny, built in code): diffusers' SDXL pipeline, LoRA, SDXL embedding files
(clip_l + clip_g), a replacement VAE, base + refiner, and compel prompt weighting (SD 1.x and SDXL)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from models.components import build_tiny
from models.export import LORA_FILE
from models.loading import load_components
from models.sdxl import SDXL_SCHEDULER, build_tiny_refiner, build_tiny_sdxl
from rayjobs.cli import _parser, main, sample_request
from rayjobs.errors import UserError
from rayjobs.tools.sample import SampleRequest, build_pipeline, generate

PROMPT = "a red circle"


def _args(tmp_path: Path, *extra: str, out: str = "out") -> SampleRequest:
    """The request `draftray sample` builds from its flags (cli's own parser), 3 steps of the tiny SDXL."""
    argv = ["sample", "--model", "tiny-sdxl", "--prompt", PROMPT, "--steps", "3", "--seed", "1", "--out", str(tmp_path / out)]
    return sample_request(_parser().parse_args(argv + list(extra)))


def _pngs(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p), dtype=np.int16) for p in paths]


def _pipe_png(image: Image.Image, tmp_path: Path) -> np.ndarray:
    """An image as it reads back after the CLI's PNG round trip."""
    image.save(tmp_path / "hand.png")
    return np.asarray(Image.open(tmp_path / "hand.png"), dtype=np.int16)


def _run(capsys, argv) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_sdxl_sample_is_diffusers_sdxl_pipeline(tmp_path):
    paths = generate(_args(tmp_path, "--num-images", "2"))
    assert [p.name for p in paths] == ["000_seed1.png", "001_seed2.png"]
    first = _pngs(paths)[0]
    assert first.shape == (32, 32, 3)  # the native size
    pipe = load_components("tiny-sdxl").pipeline()
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    hand = pipe(PROMPT, negative_prompt=None, num_inference_steps=3, generator=torch.Generator().manual_seed(1)).images[0]
    assert np.array_equal(first, _pipe_png(hand, tmp_path))


def test_python_request_gives_the_cli_image(tmp_path):
    """A Python caller builds the request itself (no argparse) and gets the PNGs `draftray sample` writes."""
    argv = ["sample", "--model", "tiny-sdxl", "--prompt", PROMPT, "--steps", "3", "--seed", "4", "--num-images", "2",
            "--negative-prompt", "blue", "--scheduler", "euler_a", "--out", str(tmp_path / "cli")]  # fmt: skip
    assert main(argv) == 0
    request = SampleRequest(model="tiny-sdxl", prompt=PROMPT, steps=3, seed=4, num_images=2, negative_prompt="blue",
                            scheduler="euler_a", out=tmp_path / "py")  # fmt: skip
    assert request == sample_request(_parser().parse_args(argv[:-1] + [str(tmp_path / "py")]))
    paths = generate(request)
    assert [p.name for p in paths] == ["000_seed4.png", "001_seed5.png"]
    for path in paths:
        assert np.array_equal(_pngs([path])[0], _pngs([tmp_path / "cli" / path.name])[0])
    with pytest.raises(UserError, match="^--steps must be >= 1, got 0$"):  # the same checks, naming the CLI's flags
        generate(SampleRequest(model="tiny-sdxl", prompt=PROMPT, steps=0, out=tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_sdxl_sample_with_lora_and_scale(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = build_tiny_sdxl().unet
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers, weight_name=LORA_FILE)
    base, lora, zero = (
        _pngs(generate(_args(tmp_path, *extra, out=name)))[0]
        for name, extra in (("base", ()), ("lora", ("--lora", str(tmp_path / "lora"))),
                            ("zero", ("--lora", str(tmp_path / "lora"), "--lora-scale", "0")))
    )  # fmt: skip
    assert np.abs(lora - base).max() > 0
    assert np.array_equal(zero, base)


def test_vae_flag_same_vae_saved_gives_the_same_images_and_missing_path_errors(tmp_path, capsys):
    build_tiny_sdxl().vae.save_pretrained(tmp_path / "vae")
    plain = _pngs(generate(_args(tmp_path, out="plain")))[0]
    swapped = _pngs(generate(_args(tmp_path, "--vae", str(tmp_path / "vae"), out="vae")))[0]
    assert np.array_equal(plain, swapped)
    rc, err = _run(capsys, ["sample", "--model", "tiny-sdxl", "--prompt", "x", "--vae", str(tmp_path / "novae"), "--out", str(tmp_path / "bad")])
    assert rc == 2 and "--vae" in err and "novae" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def _hand_refined(steps: int, start: float, seed: int):
    """diffusers' documented base + refiner hand-over, written out by hand: (the image, the refiner pipeline)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    base = load_components("tiny-sdxl").pipeline()
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, tokenizer=None, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
        unet=build_tiny_refiner(), scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False,
    )  # fmt: skip
    refiner.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    latents = base(PROMPT, num_inference_steps=steps, denoising_end=start, output_type="latent", generator=generator).images
    image = refiner(PROMPT, image=latents, num_inference_steps=steps, denoising_start=start, generator=generator)
    return image.images[0], refiner


def test_refiner_differs_from_base_and_equals_the_two_diffusers_pipelines(tmp_path):
    base_only = _pngs(generate(_args(tmp_path, "--steps", "4", out="base")))[0]
    refined = _pngs(generate(_args(tmp_path, "--steps", "4", "--refiner", "tiny-refiner", "--refiner-start", "0.5", out="ref")))[0]
    assert np.abs(refined - base_only).max() > 0
    hand, refiner = _hand_refined(steps=4, start=0.5, seed=1)
    assert np.array_equal(refined, _pipe_png(hand, tmp_path))
    refiner.save_pretrained(tmp_path / "refiner")  # a refiner directory in diffusers layout (no text_encoder/)
    from_dir = _pngs(generate(_args(tmp_path, "--steps", "4", "--refiner", str(tmp_path / "refiner"), "--refiner-start", "0.5", out="dir")))
    assert np.array_equal(from_dir[0], refined)


def test_refiner_and_image_bad_input(tmp_path, capsys):
    argv = ["sample", "--prompt", "x", "--out", str(tmp_path / "bad")]
    cases = [
        (["--model", "tiny-sdxl", "--refiner", "tiny-refiner", "--refiner-start", "1.5"], "--refiner-start"),
        (["--model", "tiny", "--refiner", "tiny-refiner"], "SD 1.x"),
        (["--model", "tiny-sdxl", "--refiner", str(tmp_path / "norefiner")], "norefiner"),
        (["--model", "tiny-sdxl", "--image", __file__], "InstructPix2Pix"),
    ]
    for extra, needle in cases:
        rc, err = _run(capsys, argv + extra)
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_compel_without_weights_is_encode_prompt_and_weights_change_it(model):
    from models.prompt_weighting import weighted_embeddings

    pipe = (build_tiny() if model == "tiny" else build_tiny_sdxl()).pipeline()
    plain = weighted_embeddings(pipe, PROMPT, "blurry")
    weighted = weighted_embeddings(pipe, "a (red)++ circle", "blurry")
    if model == "tiny":
        embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="blurry")
        expected = dict(prompt_embeds=embeds, negative_prompt_embeds=negative)
    else:
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        expected = dict(zip(names, pipe.encode_prompt(PROMPT, device="cpu", negative_prompt="blurry")))
    assert plain.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(plain[name], tensor, rtol=0, atol=0)
    assert (weighted["prompt_embeds"] - plain["prompt_embeds"]).abs().max() > 1e-3


def test_compel_cli_unweighted_prompt_gives_the_same_images(tmp_path):
    plain = _pngs(generate(_args(tmp_path, out="plain")))[0]
    compel = _pngs(generate(_args(tmp_path, "--prompt-weighting", "compel", out="compel")))[0]
    weighted = _pngs(generate(_args(tmp_path, "--prompt-weighting", "compel", "--prompt", "a (red)1.5 circle", out="w")))[0]
    refined = generate(_args(tmp_path, "--prompt-weighting", "compel", "--refiner", "tiny-refiner", "--negative-prompt", "blue", out="r"))
    assert np.array_equal(plain, compel) and np.abs(weighted - plain).max() > 0 and len(refined) == 1


def test_compel_missing_is_one_error_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "compel" else find_spec(name, *a))
    rc, err = _run(capsys, ["sample", "--model", "tiny", "--prompt", "x", "--prompt-weighting", "compel", "--out", str(tmp_path / "o")])
    assert rc == 2 and "pip install 'draftray[compel]'" in err and len(err.strip().splitlines()) == 1


def _sdxl_embedding_file(path: Path, token: str | None) -> dict[str, torch.Tensor]:
    rows = {"clip_l": torch.randn(2, 16, generator=torch.Generator().manual_seed(3)), "clip_g": torch.randn(2, 32)}
    save_file(rows, str(path), metadata={"token": token} if token else None)
    return rows


def test_sdxl_embedding_file_loads_into_both_encoders(tmp_path):
    rows = _sdxl_embedding_file(tmp_path / "emb.safetensors", "<shp>")
    pipe = build_pipeline(_args(tmp_path, "--embeddings", str(tmp_path / "emb.safetensors")))
    for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"), (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        ids = tokenizer.convert_tokens_to_ids(["<shp>", "<shp>_1"])
        assert ids[0] != tokenizer.unk_token_id and ids[1] == ids[0] + 1
        torch.testing.assert_close(encoder.get_input_embeddings().weight[ids], rows[key])
    assert len(generate(_args(tmp_path, "--embeddings", str(tmp_path / "emb.safetensors"), "--prompt", "a <shp> circle"))) == 1


def test_sdxl_embedding_token_from_flag_or_error(tmp_path):
    _sdxl_embedding_file(tmp_path / "anon.safetensors", None)
    with pytest.raises(UserError, match="--token"):
        build_pipeline(_args(tmp_path, "--embeddings", str(tmp_path / "anon.safetensors")))
    pipe = build_pipeline(_args(tmp_path, "--embeddings", str(tmp_path / "anon.safetensors"), "--token", "<anon>"))
    assert "<anon>" in pipe.tokenizer.get_vocab() and "<anon>" in pipe.tokenizer_2.get_vocab()
    save_file({"<sd1>": torch.randn(1, 32)}, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(UserError, match="clip_l and clip_g"):
        build_pipeline(_args(tmp_path, "--embeddings", str(tmp_path / "sd1.safetensors")))
