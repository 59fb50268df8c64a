"""Ray Train (V2) glue: one TorchTrainer runs ``train_loop`` on every worker.

With no cluster address a local Ray is started (``address="local"``, so it
never attaches to another cluster on the host); ``ray.address`` / $RAY_ADDRESS
joins an existing one. Checkpoints live in <run dir>/checkpoints (or
``ray.storage_path``); starting a run with the same name resumes from the latest.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from datetime import datetime
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from rayjobs.config import Config, to_yaml
from rayjobs.config_reward import DiversityConfig
from rayjobs.errors import TrainingStopped, UserError
from rayjobs.runlog import METRICS_FILE, STOP_FILE, STOP_REQUEST, Watcher, new_records, read_metrics
from rayjobs.storage import check_storage, check_writable, cluster_nodes
from rayjobs.worker import CHECKPOINTS, _worker_entry

# torch, diffusers and the rewards are imported where used: a sweep's trial actors and Train's
# controller import this module too and need none of them (each import costs seconds per trial).

def preflight(cfg: Config) -> Config:
    """Every check that needs no cluster: bad input fails here, before anything is written.

    Returns the config to run: the same, except that relative data paths are made absolute (Ray workers
    run in another directory) and a diversity metric whose weights are absent is replaced by its
    fallback (printed, and recorded in the run's config.yaml).
    """
    cfg = absolute_paths(cfg)
    import rewards
    from models.components import ModelNotFoundError, check_model_source
    from rayjobs.batches import check_data, load_prompts

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
    from models.components import unet_in_channels
    from models.sdxl import is_sdxl_source
    from rayjobs.prepare import check_inpaint_channels

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


def run_dir_for(cfg: Config) -> Path:
    name = cfg.run.name or f"{cfg.objective.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.run.output_dir).resolve() / name


def connect(cfg: Config, verbose: bool = False) -> bool:
    """Joins the configured cluster or starts a local one; returns True if we started it."""
    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # Small runs report often: the controller's default 2 s poll would dominate (REFERENCES.md).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if address:
        try:
            ray.init(address=address, log_to_driver=verbose)
        except Exception as err:  # noqa: BLE001  (ray raises several types here)
            hint = (
                "; clusters use token auth by default since Ray 2.59: export RAY_AUTH_MODE=token and "
                "RAY_AUTH_TOKEN=<`ray get-auth-token` on the head>, or RAY_AUTH_MODE=disabled if the cluster has no auth"
            )
            raise UserError(f"ray.address {address!r}: cannot connect ({str(err).splitlines()[0]}){hint}") from None
        return False
    start_local_ray(log_to_driver=verbose)
    return True


def start_local_ray(**kwargs) -> None:
    """A new local cluster (``address="local"``) with its dashboard on a free port that every worker knows.

    Ray Train V2 removes the placement group of a Train run whose controller died (a trial stopped by a
    Tune scheduler) from a cleaner actor that asks the dashboard's state API. Without an address that
    API resolves /tmp/ray/ray_current_cluster, which names another cluster or none when the host has
    several Ray instances; the run's resources then leak and the sweep deadlocks (REFERENCES.md). The
    raylet and so every worker inherit RAY_API_SERVER_ADDRESS from this process.
    """
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # Ray starts workers at nice 15 by default: on a busy host any other process would starve training.
    os.environ.setdefault("RAY_worker_niceness", "0")
    kwargs.setdefault("log_to_driver", False)
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, configure_logging=False, **kwargs)


def fit(cfg: Config, verbose: bool = False) -> Path:
    """Runs (or resumes) training; returns the run directory."""
    cfg = preflight(cfg)
    run_dir = run_dir_for(cfg)
    check_resume(cfg, run_dir)
    started = connect(cfg, verbose)
    try:
        check_storage(cfg.ray.storage_path, cluster_nodes())
        if started:  # a local cluster never grows: a run larger than it would wait forever
            from rayjobs.sweep import check_resources

            check_resources([cfg])
        prepare_run_dir(cfg, run_dir)
        run_trainer(cfg, run_dir)
    finally:
        if started:
            ray.shutdown()
    return run_dir


def prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    """Creates the run directory with its resolved config.yaml (a second start with the same name resumes)."""
    if (run_dir / "config.yaml").exists():
        done = max((m["step"] for m in read_metrics(run_dir)), default=0)
        print(f"resuming {run_dir.name} (metrics up to step {done})", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    for leftover in (STOP_FILE, STOP_REQUEST):  # a resumed run starts without an old stop
        (run_dir / leftover).unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")


def run_trainer(cfg: Config, run_dir: Path, callbacks: list = (), progress: bool = True, keep: int | None = 3) -> None:
    """Fits one TorchTrainer on the connected cluster; failures and self-stops become TrainingStopped.
    ``keep``: checkpoints kept (None = all; a sweep keeps every evaluated one)."""
    try:
        _fit_trainer(cfg, run_dir, list(callbacks), progress, keep)
    except (ray.train.TrainingFailedError, ray.exceptions.RayError) as err:
        storage = re.search(r"StorageError: (.+)", str(err))  # a worker's upload failed on every retry
        if storage:
            raise TrainingStopped(
                f"{storage.group(1).strip()}; the checkpoints before it are kept: free space or fix ray.storage_path, "
                "then start the same run.name to resume"
            ) from err
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise TrainingStopped(
            f"training failed ({first.strip()}); checkpoints are kept, start the same run.name to resume; "
            "--verbose shows the workers' logs"
        ) from err
    stop = run_dir / STOP_FILE
    if stop.exists():
        raise TrainingStopped(stop.read_text(encoding="utf-8").strip())


def _fit_trainer(cfg: Config, run_dir: Path, callbacks: list, progress: bool, keep: int | None) -> ray.train.Result:
    r = cfg.ray
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "run_dir": str(run_dir)},
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers,
            use_gpu=r.use_gpu,  # adds GPU: 1 per worker
            resources_per_worker={"CPU": r.cpus_per_worker, **r.resources_per_worker},
            accelerator_type=r.accelerator_type,
        ),
        run_config=ray.train.RunConfig(
            name=run_dir.name if r.storage_path else CHECKPOINTS,  # same name in the same storage = resume
            storage_path=r.storage_path or str(run_dir),
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
            callbacks=callbacks,
        ),
    )
    with Progress(run_dir, cfg.train.steps) if progress else contextlib.nullcontext():
        return trainer.fit()


PROGRESS_TERMS = ("loss", "reward", "kl", "denoise", "prior", "loss_scale")


def progress_fields(rec: dict) -> dict[str, str]:
    """The objective's terms this run logs (a supervised run has no reward, a DRaFT run no KL)."""
    return {k: f"{rec[k]:.4g}" for k in PROGRESS_TERMS if isinstance(rec.get(k), (int, float))}


class Progress(Watcher):
    """A live progress line on stderr (step, loss, reward, KL, it/s), read from metrics.jsonl."""

    def __init__(self, run_dir: Path, total: int):
        super().__init__()
        self.path, self.total = Path(run_dir) / METRICS_FILE, total

    def begin(self) -> None:
        from tqdm import tqdm

        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.bar = tqdm(total=self.total, file=sys.stderr, desc="train", dynamic_ncols=True, mininterval=0.5)

    def poll(self) -> None:
        records, self.offset = new_records(self.path, self.offset)
        for rec in records:
            if "loss" in rec:
                self.bar.n = rec["step"]
                self.bar.set_postfix(progress_fields(rec), refresh=False)
                self.bar.refresh()
            elif "eval/reward_mean" in rec:
                self.bar.write(f"eval step {rec['step']}: reward {rec['eval/reward_mean']:.4g} ± {rec['eval/reward_std']:.3g}, kl {rec['eval/kl']:.3g}", file=sys.stderr)

    def end(self) -> None:
        self.bar.close()
