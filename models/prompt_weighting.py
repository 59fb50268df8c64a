"""Weighted prompts (``(oil on canvas)+++``, ``(word)1.3``, ``(word)--``) through compel, for SD 1.x and SDXL.

diffusers' pipelines have no prompt-weighting syntax; they accept precomputed ``prompt_embeds``.
:func:`weighted_embeddings` turns prompts into exactly those keyword arguments with compel
(https://github.com/damian0815/compel), so ``pipe(**weighted_embeddings(pipe, prompt), ...)`` is
the weighted version of ``pipe(prompt, ...)``. A prompt without weights gives the embeddings of
the pipeline's own ``encode_prompt`` (compel's no-weights bypass; tested), so switching weighting
on changes nothing until a weight is written.

Encoders, as diffusers' ``encode_prompt`` reads them (and compel's documented setups):
- SD 1.x: the last hidden states after the final layer norm.
- SDXL: the penultimate hidden states, not normalised, of both encoders concatenated along the
  feature axis; the pooled (projected) output of the second one only (``requires_pooled=[False, True]``).
- The SDXL refiner (no first encoder): the second encoder alone, pooled too.
Each encoder gets its own ``Compel`` (rather than compel's deprecated list form, which prints to
stdout), so a multi-vector textual-inversion token is expanded with that encoder's own tokenizer.
Long prompts are not truncated: compel encodes them in 77-token chunks, and the negative is padded
to the same length.

compel is an optional dependency (``pip install 'draftray[compel]'``); it is imported only when a
function here is called.
"""

from __future__ import annotations

import contextlib

import torch

INSTALL_HINT = "pip install 'draftray[compel]'"


class CompelMissingError(ImportError):
    """compel is not installed: the message says how to install it."""


def _compel():
    try:
        import compel
    except ImportError as err:
        raise CompelMissingError(f"prompt weighting needs compel, which is not installed: {INSTALL_HINT}") from err
    return compel


class _TextualInversionExpander:
    """compel's hook for multi-vector textual-inversion tokens (``<cat>`` -> ``<cat> <cat>_1 ...``).

    compel's own DiffusersTextualInversionManager always decodes with ``pipe.tokenizer``; SDXL's second
    encoder (and the refiner's only one) must use its own tokenizer, whose token ids may differ.
    """

    def __init__(self, pipe, tokenizer):
        self.pipe, self.tokenizer = pipe, tokenizer

    def expand_textual_inversion_token_ids_if_necessary(self, token_ids: list[int]) -> list[int]:
        if not token_ids or not hasattr(self.pipe, "maybe_convert_prompt"):
            return token_ids
        prompt = self.pipe.maybe_convert_prompt(self.tokenizer.decode(token_ids), self.tokenizer)
        return self.tokenizer.encode(prompt, add_special_tokens=False)


def _encoder(pipe, tokenizer, text_encoder, sdxl: bool, pooled: bool):
    compel = _compel()
    kind = compel.ReturnedEmbeddingsType
    return compel.Compel(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        textual_inversion_manager=_TextualInversionExpander(pipe, tokenizer),
        truncate_long_prompts=False,
        returned_embeddings_type=kind.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED if sdxl else kind.LAST_HIDDEN_STATES_NORMALIZED,
        requires_pooled=pooled,
    )


def _pad_tokens(embeds: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """Appends 77-token chunks of the empty prompt's embedding until ``embeds`` has ``length`` tokens
    (what compel's pad_conditioning_tensors_to_same_length does within one encoder)."""
    chunks = (length - embeds.shape[1]) // empty.shape[1]
    return torch.cat([embeds, empty.expand(embeds.shape[0], -1, -1).repeat(1, chunks, 1)], dim=1) if chunks else embeds


def _encode_all(pipe, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[len(texts), T, D] embeddings of every text (padded to one T) and, for SDXL, the pooled [len(texts), P]."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if not sdxl:
        return _encoder(pipe, pipe.tokenizer, pipe.text_encoder, False, False)(texts), None
    second = _encoder(pipe, pipe.tokenizer_2, pipe.text_encoder_2, True, True)
    embeds, pooled = second(texts)
    if pipe.text_encoder is None:  # the refiner
        return embeds, pooled
    first = _encoder(pipe, pipe.tokenizer, pipe.text_encoder, True, False)
    left = first(texts)
    length = max(left.shape[1], embeds.shape[1])  # the two tokenizers may chunk a long prompt differently
    left, embeds = _pad_tokens(left, length, first([""])), _pad_tokens(embeds, length, second([""])[0])
    return torch.cat([left, embeds], dim=-1), pooled


@contextlib.contextmanager
def _lora_scale(pipe, scale: float | None):
    """A text-encoder LoRA at ``scale``, as ``encode_prompt(lora_scale=...)`` applies it (compel calls the encoders directly)."""
    from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

    encoders = [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e is not None]
    active = scale is not None and scale != 1.0 and USE_PEFT_BACKEND
    for encoder in encoders if active else ():
        scale_lora_layers(encoder, scale)
    try:
        yield
    finally:
        for encoder in encoders if active else ():
            unscale_lora_layers(encoder, scale)


def weighted_embeddings(
    pipe, prompt: str | list[str], negative_prompt: str | list[str] | None = None, lora_scale: float | None = None
) -> dict[str, torch.Tensor]:
    """The ``prompt_embeds`` (+ ``negative_prompt_embeds``; SDXL: + the pooled ones) keyword arguments of
    ``pipe`` (a StableDiffusion, StableDiffusionXL or StableDiffusionXLImg2Img pipeline) for weighted prompts.

    An empty ``negative_prompt`` on an SDXL pipeline with ``force_zeros_for_empty_prompt`` returns no
    negative embeddings, so the pipeline zeroes them itself, as it does for ``negative_prompt=None``;
    otherwise the negative (default "") is encoded with compel and padded to the prompt's length.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt or ""] if negative_prompt is None or isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) not in (1, len(prompts)):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts (give 1 or as many)")
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    zeros = sdxl and not any(negatives) and bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
    texts = prompts if zeros else prompts + negatives
    with _lora_scale(pipe, lora_scale), torch.no_grad():
        embeds, pooled = _encode_all(pipe, texts)
    n = len(prompts)
    out = {"prompt_embeds": embeds[:n]}
    if not zeros:
        out["negative_prompt_embeds"] = embeds[n:].repeat(n, 1, 1) if len(negatives) == 1 else embeds[n:]
    if sdxl:
        out["pooled_prompt_embeds"] = pooled[:n]
        if not zeros:
            out["negative_pooled_prompt_embeds"] = pooled[n:].repeat(n, 1) if len(negatives) == 1 else pooled[n:]
    return out
