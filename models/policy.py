"""The policy: trainable UNet (LoRA through peft, or full), its frozen reference, and CFG.

The reference for the KL term (DESIGN.md "Frozen reference") is the same UNet
with its LoRA adapters disabled (no second copy in memory) or, for full
fine-tuning, a frozen copy. ``Policy.net`` is what the training forward calls;
the Ray layer may replace it with a DistributedDataParallel wrapper of
``Policy.unet``.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Literal

import torch
from peft import LoraConfig

from models.components import Components

Trainable = Literal["lora", "full"]
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class Policy:
    """A diffusion model whose UNet is being fine-tuned, plus its frozen reference."""

    def __init__(
        self,
        components: Components,
        trainable: Trainable = "lora",
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
        gradient_checkpointing: bool = False,
    ):
        self.components = components
        self.trainable = trainable
        self.gradient_checkpointing = gradient_checkpointing
        unet = components.unet
        unet.requires_grad_(False)
        if trainable == "lora":
            self.lora_config = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha if lora_alpha is not None else lora_rank,
                init_lora_weights="gaussian",  # B = 0: the adapted UNet equals the base at init
                target_modules=list(lora_targets),
            )
            unet.add_adapter(self.lora_config)
            self._reference = None
        elif trainable == "full":
            self.lora_config = None
            self._reference = copy.deepcopy(unet).requires_grad_(False).eval()
            unet.requires_grad_(True)
        else:
            raise ValueError(f"trainable must be 'lora' or 'full', got {trainable!r}")
        unet.train()
        self.net: Callable[..., torch.Tensor] = unet

    @property
    def unet(self) -> torch.nn.Module:
        return self.components.unet

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters (LoRA A/B matrices, or every UNet weight)."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.unet.named_parameters() if p.requires_grad}

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, 77, D] the way StableDiffusionPipeline encodes them (frozen, no grad)."""
        tok = self.components.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        encoder = self.components.text_encoder
        device = next(encoder.parameters()).device
        with torch.no_grad():
            return encoder(ids.input_ids.to(device))[0]

    def eps(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float) -> torch.Tensor:
        """CFG-combined noise prediction of the trained UNet (with grad if enabled)."""
        return guided_eps(self.net, latents, t, cond, guidance)

    @torch.no_grad()
    def eps_ref(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float) -> torch.Tensor:
        """CFG-combined noise prediction of the frozen reference, on the same x_t."""
        with self.reference() as ref:
            return guided_eps(ref, latents, t, cond, guidance)

    @contextlib.contextmanager
    def reference(self):
        """Yields the frozen reference network (the UNet with adapters off, or the frozen copy)."""
        if self._reference is not None:
            yield self._reference
            return
        self.unet.disable_adapters()
        try:
            yield self.unet
        finally:
            self.unet.enable_adapters()

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "Policy":
        """Move to the caller's device; frozen weights in the compute dtype, trainable ones in float32.

        float32 trainables avoid "Attempting to unscale FP16 gradients" and keep
        AdamW updates exact; run forwards under torch.autocast when dtype is not float32.
        """
        for module in (self.components.vae, self.components.text_encoder, self.unet, self._reference):
            if module is not None:
                module.to(device=device)
                if dtype != torch.float32:
                    module.to(dtype=dtype)
        for param in self.parameters():
            param.data = param.data.float()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies of the trainable weights, keyed by their UNet parameter names."""
        return {n: p.detach().clone() for n, p in self.named_trainable().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = self.named_trainable()
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(f"trainable weights mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])


def guided_eps(net: Callable, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """eps_u + w (eps_c - eps_u), one batched UNet call on [uncond; cond] as diffusers does.

    latents [B, C, h, w]; cond [2B, L, D] = cat(uncond_embeds, cond_embeds); returns [B, C, h, w].
    guidance <= 1 skips the unconditional half (diffusers: do_classifier_free_guidance = w > 1).
    """
    if guidance <= 1.0:
        batch = latents.shape[0]
        return net(latents, t, encoder_hidden_states=cond[batch:], return_dict=False)[0]
    doubled = torch.cat([latents, latents])  # [2B, C, h, w]
    eps_u, eps_c = net(doubled, t, encoder_hidden_states=cond, return_dict=False)[0].chunk(2)  # 2 x [B, C, h, w]
    return eps_u + guidance * (eps_c - eps_u)
