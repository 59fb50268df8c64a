"""Every check that needs no cluster: bad input fails here, before Ray starts or anything is written."""

from __future__ import annotations

import sys
from pathlib import Path

from rayjobs.cluster.storage import check_writable
from rayjobs.config import Config
from rayjobs.config.reward import DiversityConfig
from rayjobs.errors import UserError, capped


def preflight(cfg: Config) -> Config:
    """Every check that needs no cluster: bad input fails here, before anything is written.

    Returns the config to run: the same, except that relative data paths are made absolute (Ray workers
    run in another directory) and a diversity metric whose weights are absent is replaced by its
    fallback (printed, and recorded in the run's config.yaml).
    """
    cfg = absolute_paths(cfg)
    import rewards
    from models.components import ModelNotFoundError
    from models.loading import check_model_source
    from rayjobs.data.batches import check_data, load_prompts

    warn_truncated(cfg, load_prompts(cfg))
    check_data(cfg)
    try:
        check_model_source(cfg.model.name_or_path)
    except ModelNotFoundError as err:
        raise UserError(f"model.name_or_path: {err}") from None
    check_model_options(cfg)
    check_lora_targets(cfg)
    for i, spec in enumerate(cfg.reward.specs()):
        where = f"reward.terms.{i}" if cfg.reward.terms else "reward"
        try:
            rewards.check(spec.name, spec.kwargs, "reward", where=f"{where}.kwargs")
        except rewards.MissingWeightsError as err:
            raise UserError(str(err)) from None  # already names the key
        except (rewards.UnknownNameError, ValueError) as err:
            raise UserError(f"{where}: {err}") from None
    check_writable(cfg.run.output_dir, "run.output_dir")
    if cfg.ray.storage_path:
        check_writable(cfg.ray.storage_path, "ray.storage_path")
    return _checked_diversity(cfg)


def warn_truncated(cfg: Config, prompts: list[str], limit: int = 10000) -> None:
    """One stderr line when prompts exceed the text encoder's context (77 CLIP tokens): they are cut, not an error."""
    from models.components import BUILT_IN, TOY, TOY_DIR

    name = cfg.model.name_or_path
    folder = TOY_DIR if name == TOY else Path(name).expanduser()
    try:
        if name in BUILT_IN:
            from models.tokenizer import build_clip_tokenizer

            tok = build_clip_tokenizer()
        elif (folder / "tokenizer").is_dir():
            from transformers import CLIPTokenizer

            tok = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
        else:
            return  # a hub id: no download just for a warning
    except (OSError, ValueError):
        return
    cut = sum(len(ids) > tok.model_max_length for ids in tok(prompts[:limit], truncation=False).input_ids)
    if cut:
        print(f"draftray: warning: {cut} of {min(len(prompts), limit)} prompts are longer than the text encoder's "
              f"{tok.model_max_length} tokens and will be truncated; shorten them to use every word", file=sys.stderr)  # fmt: skip


def check_resume(cfg: Config, run_dir: Path) -> None:
    """A run name that exists resumes its checkpoints: they must come from the same model and trainable set."""
    import yaml

    try:
        old = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return  # a new run (or nothing readable to compare)
    new = cfg.model_dump(mode="json")
    keys = [("model", "name_or_path")] + [("trainable", k) for k in ("kind", "lora_rank", "lora_targets", "text_encoder", "tokens", "unet_in_channels")]
    for section, key in keys:
        was, now = (old.get(section) or {}).get(key), new[section][key]
        if was is not None and was != now:
            raise UserError(
                f"run.name {run_dir.name}: its checkpoints ({run_dir}) hold {section}.{key} {was!r}, not {now!r}; "
                "give a new run.name to start a new run (or the same value to resume)"
            )


def check_model_options(cfg: Config) -> None:
    """model.vae must be a VAE folder (or a hub id); SDXL models take no InstructPix2Pix input channels."""
    from models.loading import is_sdxl_source, unet_in_channels
    from rayjobs.training.prepare import check_inpaint_channels

    vae = cfg.model.vae
    if vae is not None:
        path = Path(vae).expanduser()
        looks_local = path.is_absolute() or vae.startswith(".") or path.exists() or vae.count("/") != 1
        if looks_local and not (path / "config.json").is_file():
            raise UserError(f"model.vae: {vae!r} is not a VAE directory (no config.json there); give an AutoencoderKL folder or a hub id")
    check_inpaint_channels(unet_in_channels(cfg.model.name_or_path, cfg.model.revision), cfg.trainable.unet_in_channels)
    sdxl = is_sdxl_source(cfg.model.name_or_path, cfg.model.revision)
    if sdxl and (cfg.trainable.unet_in_channels != 4 or cfg.data.conditioning_column or cfg.data.eval_images):
        raise UserError("trainable.unet_in_channels: InstructPix2Pix training is for SD 1.x models; model.name_or_path is SDXL")


def check_lora_targets(cfg: Config) -> None:
    """trainable.lora_targets: each name must match a module of the UNet that LoRA can adapt.

    peft gives LoRA to every module whose name is a target or ends in '.' + target; it silently drops a target
    that matches nothing while another matches, and fails on every worker when none does. The UNet's modules come
    from the built-in tiny models, or from the UNet's config.json built on the meta device (no weights read); when
    that config cannot be read here (a hub id not in the cache), the worker reports it (docs/reliability.md,
    "Errors inside a worker").
    """
    if cfg.trainable.kind != "lora":
        return
    modules = unet_modules(cfg.model.name_or_path, cfg.model.revision)
    if modules is None:
        return
    import difflib

    import torch

    adaptable = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding, torch.nn.MultiheadAttention)
    tails = sorted({_tail(name) for name, module in modules.items() if isinstance(module, adaptable)})
    unmatched, unfit = [], []
    for target in dict.fromkeys(cfg.trainable.lora_targets):
        hits = [m for name, m in modules.items() if name == target or name.endswith("." + target)]
        if not hits:
            close = difflib.get_close_matches(target, tails, n=1)
            unmatched.append(f"{target!r}" + (f" (did you mean {close[0]}?)" if close else ""))
        elif not all(isinstance(m, adaptable) for m in hits):
            kinds = sorted({type(m).__name__ for m in hits if not isinstance(m, adaptable)})
            unfit.append(f"{target!r} names {', '.join(kinds)} modules, which LoRA cannot adapt")
    if unmatched or unfit:
        problems = ([f"{', '.join(unmatched)} match{'es' if len(unmatched) == 1 else ''} no module"] if unmatched else []) + unfit
        examples = ", ".join(tails[:20]) + (", ..." if len(tails) > 20 else "")
        raise UserError(
            f"trainable.lora_targets: in the UNet of model {capped(cfg.model.name_or_path, 120)}, {'; '.join(problems)}; "
            f"give ends of the names of its Linear, Conv or Embedding layers: {examples}"
        )


def _tail(name: str) -> str:
    """The shortest end of a module name that says what it is: 'to_q', and 'to_out.0' for a numbered one."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def unet_modules(name_or_path: str, revision: str | None = None) -> dict | None:
    """The UNet's modules by name: the built-in tiny models built (seconds at most), any other UNet built from its
    config.json on the meta device (no weights read or allocated); None when the config cannot be read here
    (a hub id not in the Hugging Face cache)."""
    from models.components import BUILT_IN, TOY, TOY_DIR

    if name_or_path in BUILT_IN:
        from models.loading import load_components

        return dict(load_components(name_or_path).unet.named_modules())
    try:
        import warnings

        import torch
        from diffusers import UNet2DConditionModel

        # a hub id's config only from the cache: check_model_options has just read it (fetched where allowed)
        source = str(TOY_DIR) if name_or_path == TOY else name_or_path
        with warnings.catch_warnings():  # huggingface_hub's deprecation notices about diffusers' own arguments
            warnings.simplefilter("ignore")
            config = UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision, local_files_only=True)
        with torch.device("meta"):
            return dict(UNet2DConditionModel.from_config(config).named_modules())
    except Exception:  # noqa: BLE001 - an unreadable or unusual config: the worker loads the model and reports it
        return None


DATA_PATHS = ("source", "class_dir", "prompts_file", "instruction_templates")


def absolute_paths(cfg: Config) -> Config:
    """The config with data.{source, class_dir, prompts_file, instruction_templates, eval_images}, run.output_dir and a
    local model.name_or_path resolved against this process's working directory."""
    cfg = cfg.model_copy(deep=True)
    for key in DATA_PATHS:
        value = getattr(cfg.data, key)
        if value is not None:
            setattr(cfg.data, key, str(Path(value).expanduser().resolve()))
    cfg.data.eval_images = [str(Path(p).expanduser().resolve()) for p in cfg.data.eval_images]
    cfg.run.output_dir = str(Path(cfg.run.output_dir).expanduser().resolve())
    model = Path(cfg.model.name_or_path).expanduser()
    if model.exists():
        cfg.model.name_or_path = str(model.resolve())
    if cfg.model.vae is not None and Path(cfg.model.vae).expanduser().exists():
        cfg.model.vae = str(Path(cfg.model.vae).expanduser().resolve())
    return cfg


def _checked_diversity(cfg: Config) -> Config:
    import rewards

    d = cfg.diversity
    try:
        rewards.check(d.name, d.kwargs, "diversity", where="diversity.kwargs")
        return cfg
    except rewards.MissingWeightsError as err:
        # A location the user named explicitly is an error; only absent default weights fall back.
        explicit = {src.key for src in rewards.sources_of(d.name, d.kwargs, "diversity")} & set(d.kwargs)
        if not d.fallback or explicit:
            raise UserError(str(err)) from None
        print(f"draftray: diversity: {d.name} unavailable ({err}); using {d.fallback} instead", file=sys.stderr)
        cfg = cfg.model_copy(deep=True)
        cfg.diversity = DiversityConfig(name=d.fallback, fallback=None)
        return _checked_diversity(cfg)
    except (rewards.UnknownNameError, ValueError) as err:
        raise UserError(f"diversity: {err}") from None
