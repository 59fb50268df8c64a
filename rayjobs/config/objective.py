"""The sampler and objective sections of the config (rayjobs/config/root.py holds the rest)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from pydantic import Field, model_validator

from rayjobs.config.base import Strict


class SamplerConfig(Strict):
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


@dataclass(frozen=True)
class ObjectiveWeights:
    """The resolved term weights of one run: the objective's fields, the preset's where a field is null."""

    reward: float  # weight of -R(x_0, prompt)
    kl_coeff: float  # weight of the KL term mean((eps - eps_ref)^2); 0 is plain DRaFT
    denoise: float  # weight of the denoising MSE on data.source
    prior: float  # DreamBooth prior preservation on data.class_dir
    conditioning_dropout: float  # InstructPix2Pix: probability of dropping the text, the image, and both (each)


# The weights each preset implies when a field is left null (docs/design.md, the preset table).
PRESET_WEIGHTS = {
    "draftplus": ObjectiveWeights(reward=1.0, kl_coeff=0.03, denoise=0.0, prior=0.0, conditioning_dropout=0.0),
    "draft": ObjectiveWeights(reward=1.0, kl_coeff=0.0, denoise=0.0, prior=0.0, conditioning_dropout=0.0),
    "finetune": ObjectiveWeights(reward=0.0, kl_coeff=0.0, denoise=1.0, prior=0.0, conditioning_dropout=0.0),
    "dreambooth": ObjectiveWeights(reward=0.0, kl_coeff=0.0, denoise=1.0, prior=1.0, conditioning_dropout=0.0),
    "textual_inversion": ObjectiveWeights(reward=0.0, kl_coeff=0.0, denoise=1.0, prior=0.0, conditioning_dropout=0.0),
    "pivotal": ObjectiveWeights(reward=0.0, kl_coeff=0.0, denoise=1.0, prior=0.0, conditioning_dropout=0.0),
    "instructpix2pix": ObjectiveWeights(reward=0.0, kl_coeff=0.0, denoise=1.0, prior=0.0, conditioning_dropout=0.05),
}


class ObjectiveConfig(Strict):
    """loss = -reward_weight R + kl_coeff KL + denoise_weight D + prior_weight P (per sample, then mean).

    The preset only fills the weights left null (PRESET_WEIGHTS); what trains is the trainable section
    and what data is read follows from the non-zero weights (rayjobs/config/data.py).
    """

    preset: Literal["draftplus", "draft", "finetune", "dreambooth", "textual_inversion", "pivotal", "instructpix2pix"] = Field(
        "draftplus",
        description="draftplus: reward + kl_coeff * KL; draft: reward only (kl_coeff 0); finetune / textual_inversion / pivotal: "
        "denoise on data.source; dreambooth: denoise + prior on data.class_dir; instructpix2pix: denoise on edit triples with "
        "conditioning dropout",
    )
    reward_weight: float | None = Field(None, ge=0, description="weight of -reward in the loss; None = preset's (1 for draft/draftplus, else 0)")
    kl_coeff: float | None = Field(
        None, ge=0, description="weight of the KL term on the CFG-combined eps (per-element mean). None = preset's (draftplus 0.03, else 0). "
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
        w = self.weights
        if not (w.reward or w.kl_coeff or w.denoise or w.prior):
            raise ValueError("every term weight is 0: nothing to train")
        return self

    @property
    def weights(self) -> ObjectiveWeights:
        """The given values, the preset's where null."""
        given = dict(reward=self.reward_weight, kl_coeff=self.kl_coeff, denoise=self.denoise_weight, prior=self.prior_weight,
                     conditioning_dropout=self.conditioning_dropout)  # fmt: skip
        return replace(PRESET_WEIGHTS[self.preset], **{k: v for k, v in given.items() if v is not None})
