"""Textual inversion: token naming as diffusers, only the new rows train, norm decay, export round trip."""

import pytest
import torch
from safetensors.torch import load_file

from models.components import build_tiny
from models.textual_inversion import (
    TI_FILE,
    ExtendedEmbedding,
    add_placeholder,
    decay_norms_,
    expand_prompt,
    export_textual_inversion,
    trainable_rows,
)

VOCAB = 49408  # CLIP BPE vocabulary of the tiny model


def encode(comps, prompts):
    """Text embeddings [B, 77, D] of already-expanded prompts through our text encoder (with grad)."""
    tok = comps.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return comps.text_encoder(ids.input_ids)[0]


def sample(pipe, prompt, output_type="pt"):
    """2-step DDIM sample of the tiny pipeline, fixed seed: images [1, 3, 32, 32] (or latents)."""
    return pipe(prompt, num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type=output_type).images


def test_add_placeholder_names_ids_and_init(tiny):
    table = tiny.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = add_placeholder(tiny.tokenizer, tiny.text_encoder, "<cat>", 3, "cat", None)
    assert ids == [VOCAB, VOCAB + 1, VOCAB + 2]
    assert tiny.tokenizer.convert_ids_to_tokens(ids) == ["<cat>", "<cat>_1", "<cat>_2"]
    cat_id = tiny.tokenizer.encode("cat", add_special_tokens=False)[0]
    rows = trainable_rows(tiny.text_encoder)
    assert rows.shape == (3, 32) and all(torch.equal(r, table[cat_id]) for r in rows)
    assert isinstance(tiny.text_encoder.get_input_embeddings(), ExtendedEmbedding)
    assert tiny.text_encoder.config.vocab_size == VOCAB + 3
    # a second placeholder appends rows and keeps the first ones
    gen = torch.Generator().manual_seed(0)
    assert add_placeholder(tiny.tokenizer, tiny.text_encoder, "<dog>", 1, None, gen) == [VOCAB + 3]
    assert torch.equal(trainable_rows(tiny.text_encoder)[:3], rows.detach())


def test_random_init_has_mean_norm_and_is_seeded(tiny):
    mean_norm = tiny.text_encoder.get_input_embeddings().weight.norm(dim=-1).mean()
    add_placeholder(tiny.tokenizer, tiny.text_encoder, "<x>", 2, None, torch.Generator().manual_seed(1))
    rows = trainable_rows(tiny.text_encoder).detach()
    assert torch.allclose(rows.norm(dim=-1), mean_norm.expand(2), rtol=1e-5)
    assert not torch.equal(rows[0], rows[1])
    other = build_tiny()
    add_placeholder(other.tokenizer, other.text_encoder, "<x>", 2, None, torch.Generator().manual_seed(1))
    assert torch.equal(trainable_rows(other.text_encoder).detach(), rows)


@pytest.mark.parametrize(
    "token, num_vectors, init, message",
    [
        ("<|endoftext|>", 1, "cat", "already in the tokenizer vocabulary"),
        ("<dog>", 2, "cat", "'<dog>_1' is already"),  # the expansion name exists (added below)
        ("<new>", 1, "a photo", "single token"),
    ],
)
def test_add_placeholder_errors_leave_model_untouched(tiny, token, num_vectors, init, message):
    add_placeholder(tiny.tokenizer, tiny.text_encoder, "<dog>_1", 1, "dog", None)
    n_tok, n_rows = len(tiny.tokenizer), tiny.text_encoder.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match=message) as err:
        add_placeholder(tiny.tokenizer, tiny.text_encoder, token, num_vectors, init, None)
    assert "\n" not in str(err.value)
    assert len(tiny.tokenizer) == n_tok and tiny.text_encoder.get_input_embeddings().num_embeddings == n_rows


def test_only_new_rows_train_under_adamw_weight_decay(tiny):
    te = tiny.text_encoder
    before = {n: t.detach().clone() for n, t in te.state_dict().items()}
    base_before = te.get_input_embeddings().weight.detach().clone()  # [V, D]
    add_placeholder(tiny.tokenizer, te, "<cat>", 2, "cat", None)
    params = [p for p in te.parameters() if p.requires_grad]
    assert params == [trainable_rows(te)]  # a naive trainer collecting requires_grad finds only the new rows
    start = params[0].detach().clone()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    target = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(0))  # [B, L, D]
    for _ in range(3):
        loss = (encode(tiny, [expand_prompt("a photo of <cat>", {"<cat>": 2}), "a dog"]) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay_norms_(params[0].data, 0.4, lr=1e-2)
    assert not torch.equal(params[0].detach(), start)
    embedding = te.get_input_embeddings()
    assert torch.equal(embedding.base_weight, base_before)
    assert torch.equal(embedding.weight[:VOCAB], base_before)
    after = te.state_dict()
    for name, tensor in before.items():
        if name != "embeddings.token_embedding.weight":
            assert torch.equal(after[name], tensor), name


def test_decay_norms_hand_values():
    rows = torch.tensor([[3.0, 4.0], [0.0, 0.1]])  # norms 5 and 0.1
    decay_norms_(rows, target_norm=0.4, lr=1e-3)  # lambda = min(1, 100 * 1e-3) = 0.1
    # norm 5 -> 5 + 0.1 (0.4 - 5) = 4.54; norm 0.1 -> 0.1 + 0.1 (0.4 - 0.1) = 0.13
    assert torch.allclose(rows, torch.tensor([[0.6 * 4.54, 0.8 * 4.54], [0.0, 0.13]]), atol=1e-6)
    rows = torch.tensor([[3.0, 4.0]])
    decay_norms_(rows, target_norm=0.4, lr=0.05)  # lambda = min(1, 5) = 1: straight to the target norm
    assert torch.allclose(rows, torch.tensor([[0.24, 0.32]]), atol=1e-6)


def test_expand_prompt_matches_diffusers_maybe_convert_prompt(tiny):
    pipe = tiny.pipeline()
    tokens = {"<cat>": 3, "<dog>": 1, "<s-x>": 2}
    for token, n in tokens.items():
        add_placeholder(pipe.tokenizer, pipe.text_encoder, token, n, "cat", None)
    prompts = ["a photo of <cat>", "<cat> and <dog> and <s-x>", "no placeholder", "<cat><cat>",
               "x<cat>y, <s-x>!", "<Cat> in capitals", "<dog>"]
    for prompt in prompts:
        assert expand_prompt(prompt, tokens) == pipe.maybe_convert_prompt(prompt, pipe.tokenizer), prompt
    assert expand_prompt("a photo of <cat>", tokens) == "a photo of <cat> <cat>_1 <cat>_2"


def test_export_loads_with_load_textual_inversion(tiny, tmp_path):
    add_placeholder(tiny.tokenizer, tiny.text_encoder, "<cat>", 2, None, torch.Generator().manual_seed(0))
    rows = trainable_rows(tiny.text_encoder)
    with torch.no_grad():
        rows.copy_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(3)))  # "trained" rows
    path = export_textual_inversion(tmp_path, {"<cat>": 2}, rows)
    assert path == tmp_path / TI_FILE
    saved = load_file(str(path))
    assert list(saved) == ["<cat>"] and torch.equal(saved["<cat>"], rows.detach())

    fresh = build_tiny().pipeline()
    base_latents = sample(fresh, "a photo of <cat>", "latent")
    fresh.load_textual_inversion(str(tmp_path))
    prompt = "a photo of <cat>"
    with torch.no_grad():
        ours = encode(tiny, [expand_prompt(prompt, {"<cat>": 2})])
        theirs = fresh.encode_prompt(prompt, "cpu", 1, False)[0]
        ours_pipe = tiny.pipeline()
        assert torch.allclose(ours, theirs, atol=1e-5)
        assert torch.allclose(sample(ours_pipe, prompt), sample(fresh, prompt), atol=1e-5)
        assert not torch.allclose(sample(fresh, prompt, "latent"), base_latents, atol=1e-3)


def test_export_several_placeholders_one_file_each(tmp_path):
    rows = torch.randn(3, 32)
    directory = export_textual_inversion(tmp_path, {"<a>": 1, "<b>": 2}, rows)
    assert directory == tmp_path
    assert torch.equal(load_file(str(tmp_path / "learned_embeds_0.safetensors"))["<a>"], rows[:1])
    assert torch.equal(load_file(str(tmp_path / "learned_embeds_1.safetensors"))["<b>"], rows[1:])
    with pytest.raises(ValueError, match="vectors"):
        export_textual_inversion(tmp_path, {"<a>": 2}, rows)
