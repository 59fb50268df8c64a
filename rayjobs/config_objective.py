"""The sampler and objective sections of the config (rayjobs/config.py holds the rest)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rayjobs.schema import _Strict


class SamplerConfig(_Strict):
    steps: int = Field(10, ge=1, description="T, DDIM denoising steps per image")
    guidance: float = Field(3.0, ge=0, description="classifier-free guidance scale w (<= 1 disables CFG)")
    eta: float = Field(0.0, ge=0, le=1, description="DDIM eta (0 deterministic)")
    truncation_steps: int = Field(
        1,
        ge=1,
        description="K: gradient flows through the last K steps (1 = DRaFT-1/DRaFT+ as in the papers, T = full backprop). "
        "configs/tiny.yaml uses 5: on the random tiny model the last step alone scales eps by ~0.04 and K=1 barely learns",
    )
    height: int = Field(32, ge=8, description="image height, pixels (multiple of the VAE factor, 8 for SD; SDXL is trained at 1024)")
    width: int = Field(32, ge=8, description="image width, pixels")
    negative_prompt: str = Field(
        "", description="text of the unconditional branch of CFG. SDXL: an empty one is all-zero text states, as diffusers' "
        "StableDiffusionXLPipeline does for negative_prompt=None (force_zeros_for_empty_prompt)"
    )
    inpaint_strength: float = Field(
        1.0, gt=0, le=1, description="masked generation (data.inpaint): 1 = the hole starts from noise, < 1 = from the image "
        "noised to that fraction of the schedule (fewer steps: int(steps * strength))"
    )
    paste_back: bool = Field(True, description="masked generation: the input image outside the mask, in pixel space, before the reward scores it")
    scheduler: Literal["ddim", "pndm", "euler", "euler_a", "dpmsolver++"] | None = Field(
        None, description="sampling scheduler (models/schedulers.py), built from the model's noise schedule; None = the model's own "
        "(DDIM for SD 1.x models, which load their scheduler as DDIM; SDXL keeps its own, Euler for the released base)"
    )

    @model_validator(mode="after")
    def _k_le_t(self):
        if self.truncation_steps > self.steps:
            raise ValueError(f"truncation_steps (K={self.truncation_steps}) must be <= steps (T={self.steps})")
        return self


# Term weights each preset implies when a weight is left null (DESIGN.md preset table):
# (reward, kl_coeff, denoise, prior, conditioning_dropout).
PRESET_WEIGHTS = {
    "draftplus": (1.0, 0.03, 0.0, 0.0, 0.0),
    "draft": (1.0, 0.0, 0.0, 0.0, 0.0),
    "finetune": (0.0, 0.0, 1.0, 0.0, 0.0),
    "dreambooth": (0.0, 0.0, 1.0, 1.0, 0.0),
    "textual_inversion": (0.0, 0.0, 1.0, 0.0, 0.0),
    "pivotal": (0.0, 0.0, 1.0, 0.0, 0.0),
    "instructpix2pix": (0.0, 0.0, 1.0, 0.0, 0.05),
}


class ObjectiveConfig(_Strict):
    """loss = -reward_weight R + kl_coeff KL + denoise_weight D + prior_weight P (per sample, then mean).

    The preset only fills the weights left null (PRESET_WEIGHTS); what trains is the trainable section
    and what data is read follows from the non-zero weights (rayjobs/config_data.py).
    """

    preset: Literal["draftplus", "draft", "finetune", "dreambooth", "textual_inversion", "pivotal", "instructpix2pix"] = Field(
        "draftplus",
        description="draftplus: reward + kl_coeff * KL; draft: reward only (kl_coeff 0); finetune / textual_inversion / pivotal: "
        "denoise on data.source; dreambooth: denoise + prior on data.class_dir; instructpix2pix: denoise on edit triples with "
        "conditioning dropout",
    )
    reward_weight: float | None = Field(None, ge=0, description="weight of -reward in the loss; None = preset's (1 for draft/draftplus, else 0)")
    kl_coeff: float | None = Field(
        None, ge=0, description="beta, weight of the KL on CFG-combined eps (per-element mean). None = preset's (draftplus 0.03, else 0). "
        "Relative to the reward's scale: 0.03 suits the toy appeal reward (~2; docs/reproduction.md), SD presets set their own"
    )
    denoise_weight: float | None = Field(
        None, ge=0, description="weight of the denoising MSE on data.source; None = preset's (1 for supervised presets, else 0). "
        "A DRaFT+ run with denoise_weight > 0 is a mixed objective (a supervised anchor)"
    )
    prior_weight: float | None = Field(None, ge=0, description="lambda, DreamBooth prior preservation on class images; None = preset's (dreambooth 1, else 0)")
    prediction_target: Literal["scheduler", "epsilon", "v_prediction"] = Field(
        "scheduler", description="what the denoise term regresses: the scheduler's prediction_type, or eps / v explicitly"
    )
    min_snr_gamma: float | None = Field(None, gt=0, description="min-SNR-gamma loss weighting of the denoise terms (Hang et al. 2023; 5 there); None = off")
    noise_offset: float = Field(0.0, ge=0, description="add noise_offset * N(0, 1) per channel to the training noise (darker/brighter images); 0.05-0.1 typical")
    masked_loss: bool = Field(False, description="inpainting (data.inpaint): the denoise terms average their error inside the mask only")
    conditioning_dropout: float | None = Field(
        None, ge=0, le=1 / 3, description="p: drop the text only, the image only and both, each with probability p "
        "(InstructPix2Pix classifier-free guidance); None = preset's (instructpix2pix 0.05, else 0)"
    )

    @model_validator(mode="after")
    def _valid_weights(self):
        if self.preset == "draft" and self.kl_coeff:
            raise ValueError("preset 'draft' means kl_coeff 0; use preset 'draftplus' for a KL term")
        reward, kl, denoise, prior, _ = self.weights
        if not (reward or kl or denoise or prior):
            raise ValueError("every term weight is 0: nothing to train")
        return self

    @property
    def weights(self) -> tuple[float, float, float, float, float]:
        """(reward, kl, denoise, prior, conditioning_dropout): the given values, the preset's where null."""
        given = (self.reward_weight, self.kl_coeff, self.denoise_weight, self.prior_weight, self.conditioning_dropout)
        return tuple(g if g is not None else d for g, d in zip(given, PRESET_WEIGHTS[self.preset]))  # type: ignore[return-value]

    @property
    def beta(self) -> float:
        return self.weights[1]
