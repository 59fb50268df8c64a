"""The config schema: every field says its meaning and unit; "per worker" where so.

``Config()`` with no arguments IS the embedded default (== configs/toy.yaml):
DRaFT+ on the shipped toy-world model against the toy appeal reward
(docs/toy-world.md), small enough for a 2-core CPU in minutes. YAML presets in configs/ override only what differs.
Unknown keys are errors. Derived sizes:

    global batch (prompts per optimizer step) = train.batch_size * train.grad_accum * ray.num_workers
    images per evaluation                     = len(data.eval_prompts) * len(data.eval_seeds)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rayjobs.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name_or_path: str = Field(
        "toy",
        description="'toy' (the shipped pretrained toy-world model), 'tiny' (random weights, seeded, built in code), "
        "a local diffusers-layout directory, or a hub id",
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) when name_or_path is a hub id")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="compute dtype of the frozen weights (autocast); trainable weights always stay float32. "
        "No float16: it needs loss scaling and SD's VAE overflows in it",
    )


class TrainableConfig(_Strict):
    kind: Literal["lora", "full"] = Field("lora", description="'lora': UNet LoRA through peft; 'full': every UNet weight")
    lora_rank: int = Field(4, ge=1, description="LoRA rank r")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; scale = alpha / r. None = r (scale 1)")
    lora_targets: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2", "conv_out"],
        min_length=1,
        description="UNet module names (suffixes) that get LoRA. Default: attention, feed-forward and convolutions "
        "(the random tiny model barely moves with attention-only LoRA); SD presets use attention only",
    )
    gradient_checkpointing: bool = Field(False, description="recompute UNet activations of the K gradient steps in backward (less memory, ~30% slower)")


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
    height: int = Field(32, ge=8, description="image height, pixels (multiple of the VAE factor, 8 for SD)")
    width: int = Field(32, ge=8, description="image width, pixels")
    negative_prompt: str = Field("", description="text of the unconditional branch of CFG")

    @model_validator(mode="after")
    def _k_le_t(self):
        if self.truncation_steps > self.steps:
            raise ValueError(f"truncation_steps (K={self.truncation_steps}) must be <= steps (T={self.steps})")
        return self


class ObjectiveConfig(_Strict):
    preset: Literal["draftplus", "draft"] = Field(
        "draftplus", description="draftplus: reward + kl_coeff * KL; draft: reward only (kl_coeff 0)"
    )
    reward_weight: float = Field(1.0, gt=0, description="weight of -reward in the loss")
    kl_coeff: float | None = Field(
        None, ge=0, description="beta, weight of the KL on CFG-combined eps (per-element mean). None = preset's (draftplus 0.03, draft 0). "
        "Relative to the reward's scale: 0.03 suits the toy appeal reward (~2; docs/reproduction.md), SD presets set their own"
    )

    @model_validator(mode="after")
    def _preset_kl(self):
        if self.preset == "draft" and self.kl_coeff:
            raise ValueError("preset 'draft' means kl_coeff 0; use preset 'draftplus' for a KL term")
        return self

    @property
    def beta(self) -> float:
        if self.kl_coeff is not None:
            return self.kl_coeff
        return {"draftplus": 0.03, "draft": 0.0}[self.preset]


DEFAULT_REWARD = "toy_appeal"  # the shipped toy reward (docs/toy-world.md)


class _Normalized(_Strict):
    """An affine normalisation of a reward, a * r + b: give scale/shift (a, b) or mean/std ((r - mean) / std)."""

    scale: float | None = Field(None, description="a in a * r + b (default 1)")
    shift: float | None = Field(None, description="b in a * r + b (default 0)")
    mean: float | None = Field(None, description="with std: normalise as (r - mean) / std, e.g. the base model's eval mean")
    std: float | None = Field(None, gt=0, description="with mean: the reward's spread (its units)")

    @model_validator(mode="after")
    def _valid_affine(self):
        from rewards.combine import affine

        affine(self.scale, self.shift, self.mean, self.std)  # ValueError -> one line naming the field
        return self

    def term(self, name: str, kwargs: dict, weight: float = 1.0):
        from rewards.combine import TermSpec, affine

        a, b = affine(self.scale, self.shift, self.mean, self.std)
        return TermSpec(name, dict(kwargs), weight, a, b)


class RewardTerm(_Normalized):
    name: str = Field(description="registered reward name (see rewards.REWARDS)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="the reward's own settings (e.g. weight locations)")
    weight: float = Field(1.0, description="weight of this normalised reward in the sum")


class RewardConfig(_Normalized):
    """One reward (name, kwargs, optional normalisation), or a weighted sum of normalised rewards (terms).

    The objective maximises R = sum_i weight_i * (a_i * r_i + b_i); kl_coeff is relative to R's scale,
    so normalise rewards that live far from 1 (PickScore ~21, HPSv2 ~0.27; REFERENCES.md). Each
    component's raw score is logged as reward/<name> (training) and eval/reward_<name>.
    """

    name: str | None = Field(
        None,
        description="registered reward name (see rewards.REWARDS); toy_appeal when neither name nor terms is given. "
        "With terms it must be null: a preset extending a single-reward base writes name: null and kwargs: null",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="the reward's own settings, passed to its builder")
    terms: list[RewardTerm] = Field(default_factory=list, description="a weighted sum of rewards instead of name/kwargs")

    @model_validator(mode="before")
    @classmethod
    def _default_reward(cls, data):
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (k == "kwargs" and v is None)}
            if not data.get("terms") and "name" not in data:
                data["name"] = DEFAULT_REWARD
        return data

    @model_validator(mode="after")
    def _one_form(self):
        if not self.terms:
            if self.name is None:
                raise ValueError("give a reward name, or terms (a weighted sum)")
            return self
        single = [k for k in ("name", "kwargs", "scale", "shift", "mean", "std") if getattr(self, k)]
        if single:
            raise ValueError(f"give either one reward (name/kwargs) or terms (a weighted sum), not both (set {single} to null)")
        return self

    def specs(self) -> list:
        """The rewards.combine.TermSpec list this config describes (one item for a single reward)."""
        if self.terms:
            return [t.term(t.name, t.kwargs, t.weight) for t in self.terms]
        assert self.name is not None  # _one_form
        return [self.term(self.name, self.kwargs)]


class DiversityConfig(_Strict):
    name: str = Field("toy_lpips", description="registered diversity metric (see rewards.DIVERSITY_METRICS)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="the metric's own settings")
    fallback: str | None = Field(
        "pairwise_rms",
        description="metric used instead when this one's default weights are absent (e.g. lpips without AlexNet "
        "weights); the switch is printed and recorded in the run's config.yaml. A location set in kwargs that is "
        "missing is always an error. None = stop with the missing-weights error",
    )


# Toy-world captions (rewards/toyworld.py): the shipped toy model was trained on this grammar.
# Training prompts name shape and colour, sometimes size and background; the rest is left to the seed.
TRAIN_PROMPTS = [
    "a red circle", "a blue square", "a yellow triangle", "a green star",
    "a purple circle on a white background", "an orange square on a black background",
    "a white triangle on a blue background", "a black star on a yellow background",
    "a small green circle", "a large red square", "a small blue star", "a large yellow circle on a purple background",
]
# Evaluation prompts: held out from training, two fully and two partly specified.
EVAL_PROMPTS = [
    "a red star",
    "a blue circle on a white background",
    "a yellow square",
    "a green triangle on a black background",
]


class DataConfig(_Strict):
    prompts: list[str] = Field(TRAIN_PROMPTS, min_length=1, description="training prompts, drawn uniformly (ignored when prompts_file is set)")
    prompts_file: str | None = Field(None, description="text file, one prompt per line (blank lines skipped); replaces prompts")
    eval_prompts: list[str] = Field(EVAL_PROMPTS, min_length=1, description="fixed evaluation prompts (rows of the sample grid)")
    eval_seeds: list[int] = Field([0, 1, 2, 3, 4, 5], min_length=2, description="one image per seed per eval prompt (grid columns); >= 2 for diversity")


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    warmup_steps: int = Field(5, ge=0, description="linear warmup from 0 to lr, optimizer steps")
    grad_clip: float = Field(10.0, ge=0, description="max global gradient norm (0 disables clipping)")


class TrainConfig(_Strict):
    steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="prompts (images) per micro-batch, per worker")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step, per worker")
    eval_every: int = Field(25, ge=0, description="optimizer steps between evaluations (0: only before and after training)")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints (and always at the end)")
    seed: int = Field(0, description="base seed; rank r draws prompts and noise from a seed mixed from (seed, r, step, micro-batch)")


class RayConfig(_Strict):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL; False = CPU and gloo")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPU cores reserved per worker")
    address: str | None = Field(None, description="Ray cluster to join ('auto', 'ray://host:10001'); None = $RAY_ADDRESS, else start a local Ray")
    max_failures: int = Field(2, ge=0, description="times the worker group restarts from the latest checkpoint after a failure")
    storage_path: str | None = Field(None, description="where Ray Train keeps checkpoints (s3://, gs://, NFS for multi-node), under <storage_path>/<run name>; None = <run dir>/checkpoints")


class RunConfig(_Strict):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]+$", description="run directory name; starting a run with an existing name resumes it. None = <preset>-<timestamp>")
    output_dir: str = Field("runs", description="parent directory of run directories")


class ParamSpec(_Strict):
    """How a sweep draws one config key: exactly one of the four fields."""

    grid: list[Any] | None = Field(None, min_length=1, description="every value, each in its own trial (Tune grid_search)")
    choice: list[Any] | None = Field(None, min_length=1, description="one value drawn uniformly per sample")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], drawn uniformly per sample")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high] with 0 < low, drawn log-uniformly per sample")

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {', '.join(given) or 'none'})")
        bounds = self.uniform or self.loguniform
        if bounds is not None and not (bounds[0] < bounds[1] and (self.uniform or bounds[0] > 0)):
            raise ValueError(f"bounds must be low < high (and low > 0 for loguniform), got {list(bounds)}")
        return self


class InferenceKnobs(_Strict):
    """Points evaluated on every checkpoint of each trial without more training (models/inference.py);
    they join the front marked by kind. Each costs one evaluation (eval prompts x seeds) per trial."""

    lora_scales: list[float] = Field([], description="LoRA scales s, 0 <= s < 1 (s = 0 is the base model; 1 is the trained point itself)")
    aig: list[str] = Field([], description="annealed importance guidance schedules: linear, power_<p>, step_<f>, e.g. [linear, power_2, step_0.5]")

    @model_validator(mode="after")
    def _valid(self):
        from models.inference import parse_aig

        bad = [s for s in self.lora_scales if not 0.0 <= s < 1.0]
        if bad:
            raise ValueError(f"lora_scales must be in [0, 1), got {bad}")
        for label in self.aig:
            parse_aig(label)
        return self


class ASHAConfig(_Strict):
    """Asynchronous successive halving (Tune's ASHAScheduler) on one eval metric: at each rung a trial
    below the top 1/reduction_factor of the trials that reached the rung is stopped. Rungs are at
    grace_period * reduction_factor**k optimizer steps; a trial is only judged at its evaluations, so
    rungs should fall on multiples of train.eval_every."""

    metric: str | None = Field(None, description="the eval metric judged (maximised); None = sweep.reward_metric")
    grace_period: int = Field(..., ge=1, description="optimizer steps every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="keep the top 1/reduction_factor at each rung")


class SweepConfig(_Strict):
    """`draftray sweep`: Ray Tune trials, each a full training run with the swept keys changed.

    trials = (product of grid sizes) * num_samples. Every trial evaluates on the same
    data.eval_prompts x data.eval_seeds every train.eval_every steps; each evaluation is a
    candidate point (reward, diversity) of the Pareto front.
    """

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]+$", description="sweep directory name under run.output_dir; None = sweep-<timestamp>")
    params: dict[str, ParamSpec] = Field(..., min_length=1, description="dotted config key (e.g. objective.kl_coeff) -> how to draw it")
    num_samples: int = Field(1, ge=1, description="Tune samples: repeats of the grid; draws of choice/uniform/loguniform keys")
    seed: int = Field(0, description="seed of the random draws")
    max_concurrent: int | None = Field(
        None, ge=1, description="trials at once; None = cluster CPUs (GPUs with ray.use_gpu) // what one trial's workers take"
    )
    search: Literal["basic", "optuna"] = Field(
        "basic",
        description="basic: Tune's grid/random generator (every grid value x num_samples draws); optuna: Optuna's "
        "multi-objective sampler (NSGA-II) maximising reward_metric and diversity_metric together, num_samples trials, "
        "no grid keys (use choice)",
    )
    scheduler: ASHAConfig | None = Field(None, description="early stopping of weak trials (None = every trial runs to train.steps)")
    max_failures: int = Field(
        1, ge=0, description="times a failed trial is restarted (from its last checkpoint) before it is recorded as failed in trials.csv"
    )
    checkpoint_evals: bool = Field(
        True,
        description="checkpoint at every evaluation and keep them all, so every point of the front has its weights (and its "
        "inference-time points); False = train.checkpoint_every and only the last 3 (saves disk with full fine-tuning)",
    )
    reward_metric: str = Field("eval/reward_mean", description="the front's reward axis (maximised)")
    diversity_metric: str | None = Field(None, description="the front's diversity axis (maximised); None = eval/diversity_<diversity.name>")
    inference: InferenceKnobs = InferenceKnobs()

    @model_validator(mode="after")
    def _search_fits(self):
        if self.search == "optuna":
            grid = [k for k, spec in self.params.items() if spec.grid is not None]
            if grid:
                raise ValueError(f"search optuna draws every key; use choice instead of grid for {', '.join(grid)}")
        return self


class Config(_Strict):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    trainable: TrainableConfig = TrainableConfig()
    sampler: SamplerConfig = SamplerConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    reward: RewardConfig = RewardConfig()
    diversity: DiversityConfig = DiversityConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    sweep: SweepConfig | None = Field(None, description="only read by `draftray sweep` (see SweepConfig)")


# ---- loading ---------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """YAML file (None = embedded default) + dotted ``key=value`` overrides -> validated Config.

    Raises UserError with one line naming the file or field on any problem.
    """
    data: dict = {}
    if path is not None:
        data = _read_yaml(Path(path))
    for item in overrides:
        apply_override(data, item)
    return validate(data)


def validate(data: dict, where: str = "config") -> Config:
    """A nested dict -> Config, or UserError with one line naming the first bad field."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            raise UserError(f"{where} {field}: unknown key (see rayjobs/config.py for the fields)") from None
        msg = e["msg"].removeprefix("Value error, ")
        got = "" if isinstance(e["input"], dict) else f" (got {e['input']!r})"
        raise UserError(f"{where} {field}: {msg}{got}") from None


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    if path.resolve() in chain:
        raise UserError(f"config file {path}: 'extends' forms a cycle")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"config file {path}: cannot read ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"config file {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: top level must be a mapping of sections")
    base = data.pop("extends", None)
    if base is None:
        return data
    # A preset builds on a base: `extends: other.yaml` (relative to this file), then this file's keys win.
    return _merge(_read_yaml(path.parent / str(base), chain + (path.resolve(),)), data)


def _merge(base: dict, top: dict) -> dict:
    """Deep merge: sections merge key by key, any other value in ``top`` replaces the base's."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_override(data: dict, item: str) -> None:
    """``key=value`` (value parsed as YAML) into the nested dict ``data``."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"override {item!r}: expected key=value with a dotted key, e.g. objective.kl_coeff=0.5")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    set_dotted(data, key, value, f"override {item!r}")


def set_dotted(data: dict, key: str, value: Any, where: str = "") -> None:
    """data['a']['b'] = value for key 'a.b', creating sections on the way."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{where or key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what the run directory's config.yaml holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
