"""`draftray sample --image --mask`: inpainting with diffusers' own pipelines over tiny models built in code, both
a 4-channel text-to-image UNet and a 9-channel inpainting UNet (SD 1.x), and the tiny SDXL; --paste-back,
--strength, and the one-line errors for bad masks."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from toydata import write_toy_images

from models.components import build_tiny, save_components
from models.ip2p import expand_unet_inputs
from models.loading import load_components
from rayjobs.cli import main
from rayjobs.tools.sample import binarize_mask, paste_back

PROMPT = "a red circle"
BOX = (8, 4, 24, 20)  # x0, y0, x1, y1 of the white (repaint) rectangle


def _mask(path: Path, size=(32, 32), box=BOX, fill=255, background=0) -> Path:
    mask = Image.new("L", size, background)
    if box is not None:
        mask.paste(fill, box)
    mask.save(path)
    return path


def _inside(shape=(32, 32), box=BOX) -> np.ndarray:
    inside = np.zeros(shape, dtype=bool)
    inside[box[1] : box[3], box[0] : box[2]] = True
    return inside


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 32x32 toy image, its mask, and a 9-channel inpainting model (the tiny model, conv_in widened to 9 inputs
    with small random weights on the mask and masked-image channels, so they matter) saved in diffusers layout."""
    root = tmp_path_factory.mktemp("inpaint")
    write_toy_images(root / "img", 1, captions=False)
    comps = build_tiny()
    expand_unet_inputs(comps.unet, 9)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        extra = comps.unet.conv_in.weight[:, 4:]
        extra.copy_(0.1 * torch.randn(extra.shape, generator=generator))
    save_components(comps, root / "inpaint9")
    return dict(image=root / "img" / "000.png", mask=_mask(root / "mask.png"), inpaint9=root / "inpaint9", root=root)


def _argv(files, out: Path, *extra, model="tiny") -> list[str]:
    return ["sample", "--model", str(model), "--prompt", PROMPT, "--steps", "3", "--seed", "1",
            "--image", str(files["image"]), "--mask", str(files["mask"]), "--out", str(out), *extra]  # fmt: skip


def _png(folder: Path, name="000_seed1.png") -> np.ndarray:
    return np.asarray(Image.open(folder / name), dtype=np.int16)


def _roundtrip(image: Image.Image, path: Path) -> np.ndarray:
    image.save(path)
    return np.asarray(Image.open(path), dtype=np.int16)


def _by_hand(pipe, files, tmp_path, seed=1, strength=1.0, **extra) -> np.ndarray:
    image = Image.open(files["image"]).convert("RGB")
    mask = Image.open(files["mask"])
    out = pipe(PROMPT, image=image, mask_image=mask, height=32, width=32, strength=strength, num_inference_steps=3,
               generator=torch.Generator().manual_seed(seed), **extra).images[0]  # fmt: skip
    return _roundtrip(out, tmp_path / f"hand{seed}.png")


@pytest.mark.parametrize("kind", ["text-to-image (4 channels)", "inpainting (9 channels)"])
def test_inpaint_is_diffusers_inpaint_pipeline(files, tmp_path, kind):
    from diffusers import StableDiffusionInpaintPipeline

    model = "tiny" if kind.startswith("text") else files["inpaint9"]
    assert main(_argv(files, tmp_path / "out", "--num-images", "2", model=model)) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000_seed1.png", "001_seed2.png"]
    comps = load_components(str(model))
    assert comps.unet.config.in_channels == (4 if model == "tiny" else 9)
    pipe = StableDiffusionInpaintPipeline(**comps.pipeline().components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for seed, name in ((1, "000_seed1.png"), (2, "001_seed2.png")):
        cli = _png(tmp_path / "out", name)
        assert cli.shape == (32, 32, 3)
        assert np.array_equal(cli, _by_hand(pipe, files, tmp_path, seed=seed))


def test_nine_channel_mask_channels_matter(files, tmp_path):
    """The 9-channel model sees the mask: another mask changes the output inside the common region too."""
    other = _mask(tmp_path / "other.png", box=(0, 0, 24, 24))
    assert main(_argv(files, tmp_path / "a", model=files["inpaint9"])) == 0
    argv = _argv(files, tmp_path / "b", model=files["inpaint9"])
    argv[argv.index("--mask") + 1] = str(other)
    assert main(argv) == 0
    inside = _inside()
    assert np.abs(_png(tmp_path / "a") - _png(tmp_path / "b"))[inside].max() > 0


@pytest.mark.parametrize("model", ["tiny", "inpaint9"])
def test_paste_back_keeps_the_input_outside_the_mask(files, tmp_path, model):
    model = files[model] if model == "inpaint9" else model
    assert main(_argv(files, tmp_path / "plain", model=model)) == 0
    assert main(_argv(files, tmp_path / "paste", "--paste-back", model=model)) == 0
    source = np.asarray(Image.open(files["image"]).convert("RGB"), dtype=np.int16)
    plain, pasted = _png(tmp_path / "plain"), _png(tmp_path / "paste")
    inside = _inside()
    assert np.array_equal(pasted[~inside], source[~inside])  # exactly the input outside the mask
    assert np.array_equal(pasted[inside], plain[inside])  # the generated pixels inside
    assert np.abs(pasted[inside] - source[inside]).max() > 0
    assert np.abs(plain[~inside] - source[~inside]).max() > 0  # why the option exists: the VAE round trip is lossy


def test_paste_back_function_matches_diffusers_apply_overlay():
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(0)
    generated, image = (Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)) for _ in range(2))
    mask = Image.fromarray((rng.random((16, 24)) > 0.5).astype(np.uint8) * 255)
    out = np.asarray(paste_back(generated, image, mask))
    white = np.asarray(mask)[..., None] == 255
    assert np.array_equal(out, np.where(white, np.asarray(generated), np.asarray(image)))
    assert np.array_equal(out, np.asarray(VaeImageProcessor().apply_overlay(mask, image, generated)))
    grey = Image.fromarray(np.where(np.asarray(mask) == 255, 128, 127).astype(np.uint8))  # thresholded at 0.5
    assert np.array_equal(np.asarray(paste_back(generated, image, grey)), out)
    binary, had_grey = binarize_mask(grey)
    assert had_grey and np.array_equal(np.asarray(binary), np.asarray(mask))


def test_strength_below_one_works_and_differs(files, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    assert main(_argv(files, tmp_path / "full")) == 0
    assert main(_argv(files, tmp_path / "half", "--strength", "0.67")) == 0  # int(3 * 0.67) = 2 of the 3 steps
    full, half = _png(tmp_path / "full"), _png(tmp_path / "half")
    assert np.abs(full - half).max() > 0
    pipe = StableDiffusionInpaintPipeline(**load_components("tiny").pipeline().components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert np.array_equal(half, _by_hand(pipe, files, tmp_path, strength=0.67))


def test_sdxl_inpaints_with_the_sdxl_inpaint_pipeline(files, tmp_path):
    from diffusers import StableDiffusionXLInpaintPipeline

    assert main(_argv(files, tmp_path / "out", model="tiny-sdxl")) == 0
    comps = load_components("tiny-sdxl")
    assert comps.unet.config.in_channels == 4
    pipe = StableDiffusionXLInpaintPipeline(**comps.pipeline().components, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    assert np.array_equal(_png(tmp_path / "out"), _by_hand(pipe, files, tmp_path, negative_prompt=None))


def _error(capsys, argv, before_loading: bool = True) -> str:
    """The one error line; ``before_loading``: stderr holds nothing else (no model was loaded)."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines() if before_loading else [line for line in err.splitlines() if line.startswith("draftray:")]
    assert len(lines) == 1 and lines[0].startswith("draftray: error: "), err
    return lines[0]


def test_bad_inputs_one_line_and_nothing_written(files, tmp_path, capsys):
    root, out = tmp_path, tmp_path / "out"
    Image.new("RGB", (36, 36)).save(root / "img36.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    swap = lambda argv, flag, value: [value if i and argv[i - 1] == flag else a for i, a in enumerate(argv)]  # noqa: E731
    drop = lambda argv, flag: [a for i, a in enumerate(argv) if a != flag and not (i and argv[i - 1] == flag)]  # noqa: E731
    argv = _argv(files, out)
    cases = [
        (swap(argv, "--mask", str(_mask(root / "m16.png", size=(16, 16), box=(0, 0, 8, 8)))), ["16x16", "32x32", "match"]),
        (swap(argv, "--mask", str(_mask(root / "empty.png", box=None))), ["no white pixel"]),
        (swap(argv, "--mask", str(_mask(root / "white.png", box=None, background=255))), ["all white", "text-to-image"]),
        (swap(argv, "--mask", str(_mask(root / "dark.png", fill=100))), ["no white pixel"]),  # grey below 0.5: empty
        (swap(argv, "--mask", str(root / "corrupt.png")), ["--mask", "cannot read"]),
        (swap(argv, "--mask", str(root / "missing.png")), ["--mask", "no such file"]),
        (swap(swap(argv, "--image", str(root / "img36.png")), "--mask", str(_mask(root / "m36.png", size=(36, 36)))), ["36x36", "multiple of 8"]),
        (argv + ["--strength", "0"], ["--strength", "(0, 1]"]),
        (argv + ["--strength", "1.5"], ["--strength", "(0, 1]"]),
        (argv + ["--strength", "0.2"], ["--strength", "no denoising step"]),  # int(3 * 0.2) = 0
        (argv + ["--height", "32"], ["--height/--width", "size of --image"]),
        (argv + ["--refiner", "tiny-refiner"], ["--refiner", "--mask"]),
        (drop(argv, "--image"), ["--mask", "--image"]),
        (drop(argv, "--mask") + ["--paste-back"], ["--paste-back", "--mask"]),
        (drop(argv, "--mask") + ["--strength", "0.5"], ["--strength", "--mask"]),
    ]  # fmt: skip
    for case, words in cases:
        err = _error(capsys, case)
        assert all(w in err for w in words), (words, err)
        assert not out.exists(), case


def test_mask_on_an_instructpix2pix_model_errors(files, tmp_path, capsys):
    comps = build_tiny()
    expand_unet_inputs(comps.unet, 8)
    save_components(comps, tmp_path / "ip2p")
    err = _error(capsys, _argv(files, tmp_path / "out", model=tmp_path / "ip2p"), before_loading=False)
    assert "InstructPix2Pix" in err and "--mask" in err
    assert not (tmp_path / "out").exists()


def test_inpainting_model_without_mask_errors(files, tmp_path, capsys):
    argv = ["sample", "--model", str(files["inpaint9"]), "--prompt", "x", "--steps", "2", "--out", str(tmp_path / "out")]
    err = _error(capsys, argv, before_loading=False)
    assert "9 input channels" in err and "--mask" in err
    assert not (tmp_path / "out").exists()


def test_grey_mask_is_thresholded_and_said(files, tmp_path, capsys):
    grey = np.zeros((32, 32), dtype=np.uint8)
    grey[BOX[1] : BOX[3], BOX[0] : BOX[2]] = 200  # >= 0.5: repaint
    grey[0:4, 0:4] = 100  # < 0.5: keep
    Image.fromarray(grey).save(tmp_path / "grey.png")
    argv = _argv(files, tmp_path / "grey")
    argv[argv.index("--mask") + 1] = str(tmp_path / "grey.png")
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grey" in err[0] and "thresholded at 0.5" in err[0]
    assert main(_argv(files, tmp_path / "binary")) == 0  # the same image as the binary mask
    assert capsys.readouterr().err == ""
    assert np.array_equal(_png(tmp_path / "grey"), _png(tmp_path / "binary"))


def test_lora_and_embeddings_apply_to_inpainting(files, tmp_path):
    """A LoRA (and its --lora-scale) on the 9-channel model; SD 1.x and SDXL embedding files on the inpaint pipelines."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    from models.export import LORA_FILE
    from rayjobs.cli import _parser, sample_request
    from rayjobs.tools.sample import build_pipeline

    unet = load_components(str(files["inpaint9"])).unet
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers, weight_name=LORA_FILE)
    model, lora = files["inpaint9"], ["--lora", str(tmp_path / "lora")]
    for name, extra in (("base", []), ("lora", lora), ("zero", lora + ["--lora-scale", "0"])):
        assert main(_argv(files, tmp_path / name, *extra, model=model)) == 0
    base, with_lora, zero = (_png(tmp_path / name) for name in ("base", "lora", "zero"))
    assert np.abs(with_lora - base).max() > 0 and np.array_equal(zero, base)

    save_file({"<sd1>": torch.randn(1, 32)}, str(tmp_path / "sd1.safetensors"))
    save_file({"clip_l": torch.randn(1, 16), "clip_g": torch.randn(1, 32)}, str(tmp_path / "xl.safetensors"), metadata={"token": "<xl>"})
    for model, file, token in (("tiny", "sd1", "<sd1>"), ("tiny-sdxl", "xl", "<xl>")):
        argv = _argv(files, tmp_path / file, "--embeddings", str(tmp_path / f"{file}.safetensors"), model=model)
        pipe = build_pipeline(sample_request(_parser().parse_args(argv)))
        assert "Inpaint" in type(pipe).__name__ and token in pipe.tokenizer.get_vocab()
        argv[argv.index("--prompt") + 1] = f"a {token} circle"
        assert main(argv) == 0 and (tmp_path / file / "000_seed1.png").is_file()
