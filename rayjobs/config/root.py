"""The config schema: every field says its meaning and unit; "per worker" where so.

``Config()`` with no arguments IS the embedded default (== configs/toy.yaml):
DRaFT+ on the shipped toy-world model against the toy appeal reward
(docs/toy-world.md), small enough for a 2-core CPU in minutes. YAML presets in configs/ override only what differs.
Unknown keys are errors. Larger sections have their own files: rayjobs/config/model.py (model, memory),
rayjobs/config/objective.py (sampler, objective), rayjobs/config/data.py (data),
rayjobs/config/reward.py (reward, diversity), rayjobs/config/cluster.py (ray), rayjobs/config/perf.py (perf),
rayjobs/config/sweep.py (sweep). Derived sizes:

    global batch (prompts per optimizer step) = train.batch_size * train.grad_accum * ray.num_workers
    images per evaluation                     = len(data.eval_prompts) * len(data.eval_seeds)
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from rayjobs.config.base import DirName, Seed, Strict
from rayjobs.config.cluster import RayConfig
from rayjobs.config.data import DataConfig
from rayjobs.config.model import MemoryConfig, ModelConfig
from rayjobs.config.objective import ObjectiveConfig, SamplerConfig
from rayjobs.config.perf import PerfConfig
from rayjobs.config.reward import DiversityConfig, RewardConfig
from rayjobs.config.sweep import SweepConfig


class PlaceholderToken(Strict):
    """A textual-inversion token: `token` in a prompt stands for num_vectors learned embedding rows."""

    token: str = Field(..., min_length=1, description="the placeholder as written in prompts, e.g. '<sks>' (must be new to the vocabulary)")
    num_vectors: int = Field(1, ge=1, description="embedding vectors it expands to (token, token_1, ... as diffusers names them)")
    init_token: str | None = Field(None, description="an existing single token whose embedding initialises the rows (e.g. 'dog'); None = random")


class TrainableConfig(Strict):
    kind: Literal["lora", "full", "none"] = Field(
        "lora", description="the UNet's trainable set: 'lora' (peft adapters), 'full' (every weight), 'none' (frozen: textual inversion alone)"
    )
    lora_rank: int = Field(4, ge=1, description="LoRA rank r")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; scale = alpha / r. None = r (scale 1)")
    lora_targets: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2", "conv_out"],
        min_length=1,
        description="UNet module names (suffixes) that get LoRA. Default: attention, feed-forward and convolutions "
        "(the random tiny model barely moves with attention-only LoRA); SD presets use attention only",
    )
    gradient_checkpointing: bool = Field(False, description="recompute UNet activations of the K gradient steps in backward (less memory, ~30% slower)")
    text_encoder: Literal["none", "lora", "full"] = Field(
        "none", description="the text encoder's trainable set (DreamBooth option): LoRA on q/k/v/out projections (rank lora_rank), or every weight"
    )
    tokens: list[PlaceholderToken] = Field(
        [], description="textual inversion: new tokens whose embedding rows train (every other row stays bit-identical)"
    )
    token_norm_target: float | None = Field(
        None, gt=0, description="after each step pull the new rows' norms toward this value (cloneofsimo's clip_ti_decay; 0.4 there); None = off"
    )
    unet_in_channels: Literal[4, 8, 9] = Field(
        4, description="the UNet's input channels. 8 = InstructPix2Pix: a 4-channel UNet gains 4 zero-initialised channels for "
        "the conditioning image's latents. 9 = an inpainting model (latents, mask, masked-image latents): the base must be one"
    )
    ema_decay: float | None = Field(None, gt=0, lt=1, description="exponential moving average of the trainable weights (exported instead of them); None = off")

    @model_validator(mode="after")
    def _something_trains(self):
        if self.kind == "none" and self.text_encoder == "none" and not self.tokens:
            raise ValueError("nothing to train: kind 'none' needs text_encoder or tokens")
        names = [t.token for t in self.tokens]
        if len(set(names)) != len(names):
            raise ValueError(f"tokens must be distinct, got {names}")
        return self


PARAM_GROUPS = ("unet", "text_encoder", "tokens")  # the optimizer's parameter groups (models/policy.py)


class Phase(Strict):
    """One phase of a training schedule: ``steps`` optimizer steps with these groups training."""

    steps: int = Field(..., ge=1, description="optimizer steps of this phase")
    lr: dict[str, float] = Field(..., min_length=1, description="parameter group (unet, text_encoder, tokens) -> its learning rate in this phase")


# torch.optim.AdamW raises on a beta outside [0, 1) -- in a worker, after Ray started: checked here instead.
Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW betas (beta1, beta2), each 0 <= beta < 1")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    warmup_steps: int = Field(5, ge=0, description="linear warmup from 0 to lr, optimizer steps")
    grad_clip: float = Field(10.0, ge=0, description="max global gradient norm (0 disables clipping)")
    text_encoder_lr: float | None = Field(None, gt=0, description="learning rate of the text encoder's trainable weights; None = lr")
    token_lr: float | None = Field(None, gt=0, description="learning rate of textual-inversion rows; None = lr (TI write-ups use ~5e-4 to 5e-3)")
    name: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw: torch AdamW; adamw8bit: bitsandbytes' 8-bit AdamW (pip install 'draftray[8bit]'; CUDA, or CPU with bitsandbytes >= 0.48)"
    )
    phases: list[Phase] = Field(
        [],
        description="a schedule of which parameter groups train (pivotal tuning: [{steps: 500, lr: {tokens: 5e-3}}, "
        "{steps: 500, lr: {unet: 1e-4}}]); steps must sum to train.steps; a group absent from a phase has lr 0 there. "
        "Empty = every group trains throughout at its own lr",
    )

    @model_validator(mode="after")
    def _phases_name_groups(self):
        for i, phase in enumerate(self.phases):
            bad = sorted(set(phase.lr) - set(PARAM_GROUPS))
            if bad:
                raise ValueError(f"phases.{i}.lr: unknown parameter group(s) {bad}; use {list(PARAM_GROUPS)}")
        return self

    def group_lr(self, group: str) -> float:
        return {"unet": self.lr, "text_encoder": self.text_encoder_lr or self.lr, "tokens": self.token_lr or self.lr}[group]


class TrainConfig(Strict):
    steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="prompts (images) per micro-batch, per worker")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step, per worker")
    eval_every: int = Field(25, ge=0, description="optimizer steps between evaluations (0: only before and after training)")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints (and always at the end)")
    seed: Seed = Field(
        0, description="base seed, 0 <= seed < 2**32; rank r draws prompts and noise from a seed mixed from (seed, r, step, micro-batch)"
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a non-finite reward, loss or gradient norm (on any rank): 'stop' ends the run with a message naming the step, "
        "the prompts and the last good checkpoint; 'skip' applies no update for that step (weights, optimizer and LR schedule "
        "untouched), counts it (skipped_nonfinite) and goes on",
    )
    max_skipped: int = Field(10, ge=1, description="on_nonfinite=skip: this many consecutive skipped steps stop the run as 'stop' does")


class RunConfig(Strict):
    name: DirName | None = Field(
        None, description="run directory name (letters, digits, ._-; not dots alone); starting a run with an existing name resumes it. "
        "None = <preset>-<timestamp>"
    )
    output_dir: str = Field("runs", description="parent directory of run directories")


class Config(Strict):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    memory: MemoryConfig = MemoryConfig()
    trainable: TrainableConfig = TrainableConfig()
    sampler: SamplerConfig = SamplerConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    reward: RewardConfig = RewardConfig()
    diversity: DiversityConfig = DiversityConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    perf: PerfConfig = PerfConfig()  # speed switches, results unchanged (rayjobs/config/perf.py)
    sweep: SweepConfig | None = Field(None, description="only read by `draftray sweep` (see SweepConfig)")

    @model_validator(mode="after")
    def _sections_agree(self):
        """Checks across sections, each naming the field to change."""
        w = self.objective.weights
        if w.denoise and self.data.source is None:
            raise ValueError("data.source: the denoise term (objective.denoise_weight > 0) needs an image dataset")
        if w.prior and self.data.class_dir is None:
            raise ValueError("data.class_dir: the prior term (objective.prior_weight > 0) needs class_dir and class_prompt")
        if self.optim.phases and sum(p.steps for p in self.optim.phases) != self.train.steps:
            raise ValueError(f"optim.phases: steps sum to {sum(p.steps for p in self.optim.phases)}, train.steps is {self.train.steps}")
        if self.data.conditioning_column and self.trainable.unet_in_channels != 8:
            raise ValueError("trainable.unet_in_channels: a conditioning image (data.conditioning_column) needs 8 UNet input channels")
        if self.trainable.unet_in_channels == 9 and not self.data.inpaint:
            raise ValueError("data.inpaint: an inpainting UNet (trainable.unet_in_channels: 9) trains on masks; set data.inpaint: true")
        size = self.data.resolution or self.sampler.height
        if self.data.inpaint and (w.reward or w.kl_coeff) and not self.sampler.height == self.sampler.width == size:
            raise ValueError(f"sampler.height: masked generation repaints data.source images of {size} px squares; set sampler.height and width to {size}")
        if self.objective.masked_loss and not self.data.inpaint:
            raise ValueError("objective.masked_loss: needs masks (data.inpaint: true)")
        if self.data.eval_images and self.trainable.unet_in_channels != 8:
            raise ValueError("data.eval_images: validation edits need an InstructPix2Pix UNet (trainable.unet_in_channels: 8)")
        if self.data.cache_text_embeddings and (self.trainable.text_encoder != "none" or self.trainable.tokens):
            raise ValueError("data.cache_text_embeddings: the text encoder trains (trainable.text_encoder or tokens); its states cannot be cached")
        if self.perf.compile_mode == "reduce-overhead" and not self.ray.use_gpu:
            raise ValueError("perf.compile_mode: reduce-overhead (CUDA graphs) needs CUDA workers (ray.use_gpu: true)")
        self._strategy_fits()
        return self

    def _strategy_fits(self) -> None:
        """ray.strategy fsdp/deepspeed shard the full UNet in float32 (docs/sharding.md); LoRA stays on ddp."""
        r, t = self.ray, self.trainable
        if r.strategy == "ddp":
            return
        if self.perf.compile != "none":  # also checked in the worker (rayjobs/training/loop.py: _compile); here: up front
            raise ValueError(f"perf.compile: {self.perf.compile} runs with ray.strategy ddp only ({r.strategy} wraps the UNet's forward itself)")
        if t.kind != "full":
            raise ValueError(f"ray.strategy: {r.strategy} shards full fine-tuning (trainable.kind: full); LoRA's few weights train with ddp")
        if t.text_encoder != "none" or t.tokens:
            raise ValueError(f"ray.strategy: {r.strategy} shards the UNet only; trainable.text_encoder / trainable.tokens train with ddp")
        if self.model.dtype == "float16":
            raise ValueError(f"model.dtype: float16 loss scaling runs with ray.strategy ddp only; use bfloat16 with {r.strategy}")
        if self.optim.name != "adamw":
            raise ValueError(f"optim.name: {self.optim.name} runs with ray.strategy ddp only; {r.strategy} steps torch AdamW")
        if r.strategy == "deepspeed" and r.zero_stage == 3 and t.ema_decay:
            # ZeRO-3 leaves each rank an empty placeholder per parameter: the EMA would average nothing
            raise ValueError("trainable.ema_decay: the EMA reads whole parameters, which ray.zero_stage 3 partitions; use zero_stage 2 or ray.strategy fsdp")


# ---- loading ---------------------------------------------------------------------------------


