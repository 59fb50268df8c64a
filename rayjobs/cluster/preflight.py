"""Every check that needs no cluster: bad input fails here, before Ray starts or anything is written."""

from __future__ import annotations

import sys
from pathlib import Path

from rayjobs.cluster.storage import check_writable
from rayjobs.config import Config
from rayjobs.config.reward import DiversityConfig
from rayjobs.errors import UserError


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
