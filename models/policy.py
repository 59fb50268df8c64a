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
from models.textual_inversion import expand_prompt, trainable_rows

Trainable = Literal["lora", "full", "none"]
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP attention (diffusers' DreamBooth LoRA)


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
        text_encoder: Trainable = "none",
        tokens: dict[str, int] | None = None,
    ):
        """``text_encoder``: its trainable set (LoRA on TEXT_LORA_TARGETS with the same rank, or full).
        ``tokens``: textual-inversion placeholders already added to the components
        (models/textual_inversion.add_placeholder) -> their vector counts; their rows train."""
        self.components = components
        self.tokens = dict(tokens or {})
        # (prompts, encode, device) -> [B, L, D]; used only while no text weight trains (rayjobs/text_cache.py)
        self.text_cache: Callable[[list[str], Callable, torch.device], torch.Tensor] | None = None
        self.text_trainable = self._text_trainable(text_encoder, lora_rank, lora_alpha)
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
        elif trainable == "none":
            self.lora_config, self._reference = None, None
        else:
            raise ValueError(f"trainable must be 'lora', 'full' or 'none', got {trainable!r}")
        unet.train()
        self.net: Callable[..., torch.Tensor] = unet

    @property
    def unet(self) -> torch.nn.Module:
        return self.components.unet

    def _text_trainable(self, kind: Trainable, rank: int, alpha: float | None) -> bool:
        """Set up the text encoder's trainable set; True when text embeddings need gradient."""
        encoder = self.components.text_encoder
        if kind == "lora":
            self.text_lora_config = LoraConfig(
                r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian", target_modules=list(TEXT_LORA_TARGETS)
            )
            encoder.add_adapter(self.text_lora_config)
        elif kind == "full":
            self.text_lora_config = None
            encoder.requires_grad_(True)
            rows = trainable_rows(encoder)
            if rows is not None:  # the frozen base table is a buffer; only the new rows are a parameter
                rows.requires_grad_(True)
        elif kind == "none":
            self.text_lora_config = None
        else:
            raise ValueError(f"text_encoder must be 'lora', 'full' or 'none', got {kind!r}")
        return kind != "none" or trainable_rows(encoder) is not None

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Trainable parameters by optimizer group: unet, text_encoder, tokens (the new embedding rows).
        Only non-empty groups appear."""
        rows = trainable_rows(self.components.text_encoder)
        groups = {
            "unet": [p for p in self.unet.parameters() if p.requires_grad],
            "text_encoder": [p for p in self.components.text_encoder.parameters() if p.requires_grad and p is not rows],
            "tokens": [rows] if rows is not None and rows.requires_grad else [],
        }
        return {name: params for name, params in groups.items() if params}

    def parameters(self) -> list[torch.nn.Parameter]:
        """Every trainable parameter (LoRA A/B matrices, UNet weights, text-encoder weights, token rows)."""
        return [p for params in self.param_groups().values() for p in params]

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters by name: UNet names as they are, text-encoder ones prefixed ``text_encoder.``."""
        named = {n: p for n, p in self.unet.named_parameters() if p.requires_grad}
        text = self.components.text_encoder.named_parameters()
        return named | {f"text_encoder.{n}": p for n, p in text if p.requires_grad}

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, 77, D] the way StableDiffusionPipeline encodes them; with gradient only when
        the text encoder or placeholder rows train. Multi-vector placeholders are spelled out first.
        A ``text_cache`` serves prompts it has seen while nothing on the text path trains."""
        if self.text_cache is not None and not self.text_trainable:
            device = next(self.components.text_encoder.parameters()).device
            return self.text_cache(list(prompts), self._encode, device)
        return self._encode(prompts)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tok = self.components.tokenizer
        prompts = [expand_prompt(p, self.tokens) for p in prompts] if self.tokens else list(prompts)
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        encoder = self.components.text_encoder
        device = next(encoder.parameters()).device
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_trainable):
            return encoder(ids.input_ids.to(device))[0]

    def eps(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float) -> torch.Tensor:
        """CFG-combined noise prediction of the trained UNet (with grad if enabled)."""
        return guided_eps(self.net, self._unet_input(latents), t, cond, guidance)

    @torch.no_grad()
    def eps_ref(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float) -> torch.Tensor:
        """CFG-combined noise prediction of the frozen reference, on the same x_t."""
        with self.reference() as ref:
            return guided_eps(ref, self._unet_input(latents), t, cond, guidance)

    def _unet_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Text-to-image sampling of an InstructPix2Pix UNet (8 input channels) runs its image-dropped
        branch: a zero conditioning image, which conditioning dropout trains (models/ip2p.py).
        Editing an input image is models/ip2p.edit. [B, 4, h, w] -> [B, in_channels, h, w]."""
        missing = self.unet.config.in_channels - latents.shape[1]
        if missing <= 0:
            return latents
        return torch.cat([latents, latents.new_zeros(latents.shape[0], missing, *latents.shape[2:])], dim=1)

    @contextlib.contextmanager
    def reference(self):
        """Yields the frozen reference network (the UNet with adapters off, or the frozen copy)."""
        if self._reference is not None:
            yield self._reference
            return
        if self.trainable == "none":  # the UNet is frozen: it is its own reference (the text path may train)
            yield self.unet
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
        Under float16 the VAE stays float32: SD's VAE overflows in float16 (components.vae_precision).
        """
        for module in (self.components.vae, self.components.text_encoder, self.unet, self._reference):
            if module is not None:
                module.to(device=device)
                upcast = module is self.components.vae and dtype == torch.float16
                if dtype != torch.float32 and not upcast:
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
