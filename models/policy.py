"""The policy: trainable UNet (LoRA through peft, or full), its frozen reference, and CFG.

The reference for the KL term (docs/design.md "Frozen reference") is the same UNet
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
from models.conditioning import Conditioning, as_conditioning
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
        # (prompts, encode, device) -> Conditioning [B]; used only while no text weight trains (rayjobs/data/text_cache.py)
        self.text_cache: Callable[[list[str], Callable, torch.device], Conditioning] | None = None
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
        """Set up the text encoders' trainable set (SDXL: both, as diffusers' SDXL DreamBooth LoRA trains
        both); True when text embeddings need gradient."""
        if kind not in ("lora", "full", "none"):
            raise ValueError(f"text_encoder must be 'lora', 'full' or 'none', got {kind!r}")
        self.text_lora_config = None
        if kind == "lora":
            self.text_lora_config = LoraConfig(
                r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian", target_modules=list(TEXT_LORA_TARGETS)
            )
        for encoder in self.components.text_encoders:
            if kind == "lora":
                encoder.add_adapter(self.text_lora_config)  # peft freezes every other weight, new rows included
            elif kind == "full":
                encoder.requires_grad_(True)
        for rows in self.token_rows():  # new token rows always train (the frozen base table is a buffer)
            rows.requires_grad_(True)
        return kind != "none" or bool(self.token_rows())

    def token_rows(self) -> list[torch.nn.Parameter]:
        """The textual-inversion rows [n_new, D_i] of each text encoder that has new tokens (SDXL: two)."""
        rows = [trainable_rows(encoder) for encoder in self.components.text_encoders]
        return [r for r in rows if r is not None]

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Trainable parameters by optimizer group: unet, text_encoder (both encoders on SDXL), tokens
        (the new embedding rows). Only non-empty groups appear."""
        rows = self.token_rows()
        text = [p for e in self.components.text_encoders for p in e.parameters()]
        groups = {
            "unet": [p for p in self.unet.parameters() if p.requires_grad],
            "text_encoder": [p for p in text if p.requires_grad and not any(p is r for r in rows)],
            "tokens": [r for r in rows if r.requires_grad],
        }
        return {name: params for name, params in groups.items() if params}

    def parameters(self) -> list[torch.nn.Parameter]:
        """Every trainable parameter (LoRA A/B matrices, UNet weights, text-encoder weights, token rows)."""
        return [p for params in self.param_groups().values() for p in params]

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters by name: UNet names as they are, text-encoder ones prefixed ``text_encoder.``
        (SDXL's second: ``text_encoder_2.``)."""
        named = {n: p for n, p in self.unet.named_parameters() if p.requires_grad}
        for prefix, encoder in zip(("text_encoder", "text_encoder_2"), self.components.text_encoders):
            named |= {f"{prefix}.{n}": p for n, p in encoder.named_parameters() if p.requires_grad}
        return named

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Text conditioning [B] the way StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) encodes
        it; with gradient only when a text encoder or placeholder rows train. Multi-vector placeholders
        are spelled out first. A ``text_cache`` serves prompts it has seen while nothing on the text path
        trains. SDXL's time ids are not set here: they depend on the image size (Conditioning.with_size)."""
        if self.text_cache is not None and not self.text_trainable:
            device = next(self.components.text_encoder.parameters()).device
            return self.text_cache(list(prompts), self._encode, device)
        return self._encode(prompts)

    def _encode(self, prompts: list[str]) -> Conditioning:
        prompts = [expand_prompt(p, self.tokens) for p in prompts] if self.tokens else list(prompts)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_trainable):
            if not self.components.is_sdxl:
                ids = _token_ids(self.components.tokenizer, prompts, self.components.text_encoder)
                return Conditioning(self.components.text_encoder(ids)[0])  # last hidden states [B, 77, D]
            states, pooled = [], None
            for tok, encoder in zip(self.components.tokenizers, self.components.text_encoders):
                out = encoder(_token_ids(tok, prompts, encoder), output_hidden_states=True)
                if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds [B, P]
                    pooled = out[0]
                states.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer, [B, 77, D_i]
            return Conditioning(torch.cat(states, dim=-1), pooled)  # [B, 77, D_1 + D_2], [B, P]

    def condition(self, prompts: list[str], negative_prompt: str, height: int, width: int) -> Conditioning:
        """The CFG batch [uncond; cond] of 2B rows, sized for ``height`` x ``width`` images.

        SDXL with ``force_zeros_for_empty_prompt`` (its released default) makes an empty negative prompt
        all-zero states and pooled embedding, as StableDiffusionXLPipeline does for negative_prompt=None.
        """
        if self.components.force_zeros_for_empty_prompt and not negative_prompt:
            cond = self.encode_prompts(list(prompts))
            both = Conditioning.cat([cond.zeros_like(), cond])  # [2B]
        else:
            both = self.encode_prompts([negative_prompt] * len(prompts) + list(prompts))  # [2B]
        return both.with_size(height, width)

    def eps(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float,
            extra: torch.Tensor | None = None) -> torch.Tensor:
        """CFG-combined noise prediction of the trained UNet (with grad if enabled). ``extra``: channels
        appended to the latents (an inpainting UNet's mask and masked-image latents, [B, 5, h, w])."""
        return guided_eps(self.net, self._unet_input(latents, extra), t, cond, guidance)

    @torch.no_grad()
    def eps_ref(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        """CFG-combined noise prediction of the frozen reference, on the same x_t."""
        with self.reference() as ref:
            return guided_eps(ref, self._unet_input(latents, extra), t, cond, guidance)

    def _unet_input(self, latents: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """latents [B, 4, h, w] and ``extra`` [B, E, h, w] concatenated along channels. Text-to-image sampling
        of an InstructPix2Pix UNet (8 input channels) runs its image-dropped branch: zeros fill the
        channels still missing, a zero conditioning image, which conditioning dropout trains (models/ip2p.py).
        Editing an input image is models/ip2p.edit. -> [B, in_channels, h, w]."""
        if extra is not None:
            latents = torch.cat([latents, extra.to(latents.dtype)], dim=1)  # [B, 4 + E, h, w]
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
        for module in (self.components.vae, *self.components.text_encoders, self.unet, self._reference):
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


def _token_ids(tokenizer, prompts: list[str], encoder: torch.nn.Module) -> torch.Tensor:
    """[B, 77] ids padded to the tokenizer's maximum length and truncated there, on the encoder's device."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    return ids.input_ids.to(next(encoder.parameters()).device)


def unet_eps(net: Callable, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning | torch.Tensor) -> torch.Tensor:
    """One UNet call: latents [B, C, h, w], cond [B] (a bare tensor is SD 1.x states) -> prediction [B, C_out, h, w]."""
    return net(latents, t, **as_conditioning(cond).unet_kwargs(), return_dict=False)[0]


def guided_eps(net: Callable, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float) -> torch.Tensor:
    """eps_u + w (eps_c - eps_u), one batched UNet call on [uncond; cond] as diffusers does.

    latents [B, C, h, w]; cond [2B] = cat(uncond, cond) (Policy.condition); returns [B, C, h, w].
    guidance <= 1 skips the unconditional half (diffusers: do_classifier_free_guidance = w > 1).
    """
    if guidance <= 1.0:
        return unet_eps(net, latents, t, cond[latents.shape[0]:])
    doubled = torch.cat([latents, latents])  # [2B, C, h, w]
    eps_u, eps_c = unet_eps(net, doubled, t, cond).chunk(2)  # 2 x [B, C, h, w]
    return eps_u + guidance * (eps_c - eps_u)
