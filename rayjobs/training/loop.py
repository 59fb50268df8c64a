"""The per-worker training loop: importable and runnable without Ray.

``train_loop(cfg, run_dir, ctx)`` runs on every rank. ``ctx`` (a WorkerContext)
is the only thing that differs between a plain in-process run (LocalContext)
and a Ray Train worker (rayjobs.cluster.worker.RayContext): rank, world size, device,
``report`` and the latest checkpoint. The loop calls ``objective(policy,
batch)`` and never branches on the preset.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import rewards
from models import perf
from models.export import export
from models.objective import DenoiseSettings, Objective, Weights, kl_term, score_parts
from models.policy import Policy
from models.sampler import SamplerSettings, sample
from models.textual_inversion import decay_norms_
from rayjobs.config import Config
from rayjobs.data.batches import Batches, mix_seed
from rayjobs.data.text_cache import TextEmbeddingCache
from rayjobs.errors import UserError
from rayjobs.runlog import STOP_REQUEST, RunLog
from rayjobs.training import checkpoint, sharding
from rayjobs.training.class_images import generate_class_images, missing_indices
from rayjobs.training.contexts import LocalContext, WorkerContext  # noqa: F401 (LocalContext: the loop's plain runner)
from rayjobs.training.guard import NonFiniteGuard, StepResult, checkpoint_location, describe_nonfinite_prompts, write_stop
from rayjobs.training.optim import EMA, build_optimizer, build_schedule
from rayjobs.training.prepare import prepare_components
from rayjobs.training.validation import validation_edits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EMA_PREFIX = "ema."  # checkpoint keys of the EMA averages


def sampler_settings(cfg: Config) -> SamplerSettings:
    s = cfg.sampler
    return SamplerSettings(
        steps=s.steps,
        guidance=s.guidance,
        eta=s.eta,
        truncation_steps=s.truncation_steps,
        height=s.height,
        width=s.width,
        negative_prompt=s.negative_prompt,
        gradient_checkpointing=cfg.trainable.gradient_checkpointing,
        vae_checkpointing=cfg.memory.vae_checkpointing,
        scheduler=s.scheduler,
        inpaint_strength=s.inpaint_strength,
        paste_back=s.paste_back,
    )


def _speed_up(cfg: Config, policy: Policy) -> None:
    """perf.attention and perf.channels_last on the UNet (and its frozen copy) and the VAE."""
    for unet in (policy.unet, policy._reference):
        if unet is not None:
            perf.set_attention(unet, cfg.perf.attention)
    if cfg.perf.channels_last:
        perf.channels_last(policy.unet, policy._reference, policy.components.vae)


def _compile(cfg: Config, ctx: WorkerContext, policy: Policy) -> perf.NoGradCompiled | None:
    """perf.compile: policy.net becomes a NoGradCompiled over the (wrapped) UNet, after the strategy wrapped it.
    Only ddp keeps plain modules to compile; fsdp/deepspeed own their forward."""
    p = cfg.perf
    if p.compile == "none":
        return None
    if p.compile_mode == "reduce-overhead" and ctx.device.type != "cuda":
        raise UserError(f"perf.compile_mode: reduce-overhead (CUDA graphs) needs a CUDA device; this worker runs on {ctx.device.type}")
    if cfg.ray.strategy != "ddp":
        raise UserError(f"perf.compile: {p.compile} runs with ray.strategy ddp only ({cfg.ray.strategy} wraps the UNet's forward itself)")
    policy.net = perf.compile_unet(policy.unet, policy.net, p.compile, p.compile_mode, p.compile_backend)
    return policy.net


def eval_metric_names(cfg: Config) -> set[str]:
    """Every metric an evaluation reports (Worker.evaluate), by name: what a sweep axis or scheduler may use."""
    labels = rewards.component_labels(cfg.reward.specs())
    fixed = {"eval/reward_mean", "eval/reward_std", "eval/kl", f"eval/diversity_{cfg.diversity.name}"}
    return fixed | {f"eval/reward_{label}" for label in labels}


class Worker:
    """Everything one rank holds: policy, objective, optimizer, schedule, reward, metric."""

    def __init__(self, cfg: Config, ctx: WorkerContext):
        self.cfg, self.ctx = cfg, ctx
        self.dtype = DTYPES[cfg.model.dtype]
        torch.manual_seed(cfg.train.seed)  # the same LoRA init on every rank, whatever the world size
        comps, tokens = prepare_components(cfg)
        t = cfg.trainable
        self.policy = Policy(comps, t.kind, t.lora_rank, t.lora_alpha, tuple(t.lora_targets), t.gradient_checkpointing, t.text_encoder, tokens)
        torch.manual_seed(mix_seed(cfg.train.seed, ctx.rank))  # from here on ranks draw differently
        self.policy.to(ctx.device, self.dtype)
        _speed_up(cfg, self.policy)  # perf.attention, perf.channels_last: same results, faster kernels
        if cfg.data.cache_text_embeddings:
            model_id = f"{cfg.model.name_or_path}@{cfg.model.revision}/{cfg.model.dtype}"
            self.policy.text_cache = TextEmbeddingCache(Path(cfg.run.output_dir) / ".cache" / "text", model_id, comps.is_sdxl)
        # float16 only: dynamic loss scaling (a no-op pass-through otherwise; model.dtype)
        scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.dtype == torch.float16)
        # ddp / fsdp / deepspeed (ray.strategy): wraps or shards the UNet, then builds the optimizer over it
        self.strategy = sharding.build(cfg, ctx, scaler)
        self.optimizer = self.strategy.setup(self.policy, lambda policy: build_optimizer(policy, cfg.optim))
        self.compiled = _compile(cfg, ctx, self.policy)  # perf.compile: None, or the policy's no-grad UNet calls
        self.reward = rewards.build_reward_sum(cfg.reward.specs())  # also the evaluation's, whatever the weights
        if isinstance(self.reward, torch.nn.Module):
            # Frozen reward weights in the compute dtype (bf16 on GPU): half the memory, bf16 activations.
            self.reward.to(ctx.device, self.dtype)
        self.reward = perf.reward_in(self.reward, cfg.perf.reward_dtype)  # perf.reward_dtype: its own precision
        self.diversity = rewards.build_diversity(cfg.diversity.name, **cfg.diversity.kwargs)
        self.settings = sampler_settings(cfg)
        o = cfg.objective
        w = o.weights
        supervised = DenoiseSettings(o.min_snr_gamma, o.noise_offset, o.prediction_target, w.conditioning_dropout, o.masked_loss)
        self.objective = Objective(
            Weights(reward=w.reward, kl_coeff=w.kl_coeff, denoise=w.denoise, prior=w.prior),
            self.settings, self.reward, supervised, cfg.memory.reward_checkpointing,
        )
        self.params = self.policy.parameters()  # after setup: FSDP's are DTensor shards
        self.schedule = build_schedule(self.optimizer, cfg.optim)
        self.ema = EMA(self.params, t.ema_decay) if t.ema_decay else None
        self._plain_depth = 0  # Worker.unwrapped nesting
        self.nonfinite_prompts = ""  # the last non-finite step's prompts, described (train_step)
        self.restored_from: str | None = None  # the checkpoint restore loaded (named in a stop message)
        self.batches = Batches(cfg, self.policy, ctx.rank)

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """float16's loss scaler; the strategy uses it in backward and step."""
        return self.strategy.scaler

    @scaler.setter
    def scaler(self, value: torch.amp.GradScaler) -> None:
        self.strategy.scaler = value

    def make_class_images(self) -> None:
        """DreamBooth's class images the class folder lacks, drawn by the model before it trains (every rank)."""
        if not self.cfg.objective.weights.prior:
            return
        todo = missing_indices(self.cfg)
        if self.ctx.world_size > 1:
            dist.barrier()  # every rank listed the folder before anyone writes to it
        with self.autocast():
            generate_class_images(self.cfg, self.policy, self.settings, todo[self.ctx.rank :: self.ctx.world_size])
        if self.ctx.world_size > 1:
            dist.barrier()
        self.batches = Batches(self.cfg, self.policy, self.ctx.rank)

    def after_step(self) -> None:
        """Constraints and averages applied after each optimizer step (config options, any preset)."""
        target = self.cfg.trainable.token_norm_target
        if target is not None and self.policy.token_rows():
            lr = next(g["lr"] for g in self.optimizer.param_groups if g["name"] == "tokens")  # this step's
            for rows in self.policy.token_rows():  # SDXL: each encoder's rows (their own scales)
                decay_norms_(rows.data, target, lr)
        if self.ema is not None:
            self.ema.update()

    def autocast(self):
        return torch.autocast(self.ctx.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def batch(self, step: int, micro: int) -> dict:
        """What the objective's terms need, seeded by (seed, rank, step, micro) (rayjobs/data/batches.py)."""
        return self.batches(step, micro)

    def train_step(self, step: int, stop_requested: bool = False) -> StepResult:
        """One optimizer step over grad_accum micro-batches; metrics averaged over ranks.

        ``stop_requested`` (rank 0's view of a stop request) travels in the same all-reduce as the metrics,
        so every rank's result has ``stop_requested`` set at the same step. ``finite`` is False when any
        rank saw a non-finite loss or gradient norm, in which case no update was applied (under deepspeed
        the engine updates in finish_grads and skips only a non-finite gradient norm itself). train_loop
        then stops or skips the step (NonFiniteGuard, train.on_nonfinite); ``nonfinite_prompts`` names the
        prompts of this rank's offending micro-batches.
        """
        accum = self.cfg.train.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        micro_bad, micro_prompts = [], []  # per micro-batch: a non-finite metric (no host sync unless needed)
        for micro in range(accum):
            batch = self.batch(step, micro)
            with self.strategy.accumulate(micro == accum - 1), self.autocast():  # gradients reduced on the last
                loss, metrics = self.objective(self.policy, batch)
                self.strategy.backward(loss / accum)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v.float() / accum
            micro_bad.append(~torch.isfinite(torch.stack([v.float().to(self.ctx.device) for v in metrics.values()])).all())
            micro_prompts.append(list(batch.get("prompts") or batch.get("captions") or batch.get("class_prompts") or []))
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        totals["grad_norm"] = self.strategy.finish_grads(self.optimizer, clip)  # the global norm, every rank
        keys = sorted(totals)
        stats = torch.stack([totals[k].to(self.ctx.device) for k in keys])  # [M]
        # float16: an overflowing gradient is the scaler's business (skip the step, halve the scale)
        tolerated = {"grad_norm"} if self.scaler.is_enabled() else set()
        bad = (~torch.isfinite(stats[[i for i, k in enumerate(keys) if k not in tolerated]])).any().float().reshape(1)
        stop = torch.tensor([float(stop_requested)], device=stats.device)
        stats = torch.cat([stats, stop, bad])  # [M + 2]
        if self.ctx.world_size > 1:
            dist.all_reduce(stats)  # sum over ranks
            stats[:-2] /= self.ctx.world_size
        values = stats.tolist()  # the one host sync per optimizer step
        out = dict(zip(keys, values[:-2]))
        finite = values[-1] == 0
        if finite:
            self._apply(out)
        else:
            self.nonfinite_prompts = describe_nonfinite_prompts(self.ctx.rank, micro_bad, micro_prompts)
        if self.compiled is not None:
            out["compile_s"] = self.compiled.stats.compile_s  # so far, this rank: first calls of each new shape
        if self.batches.skipped:
            out["data/skipped"] = float(self.batches.skipped)  # this rank's count (data.skip_bad)
        return StepResult(out, finite=finite, stop_requested=bool(values[-2]))

    def _apply(self, out: dict[str, float]) -> None:
        """The optimizer step of finite metrics. Under float16 an overflowing gradient (grad_norm not
        finite, the same on every rank after DDP's all-reduce) skips the update, and the scale backs off."""
        out["lr"] = self.schedule.get_last_lr()[0]
        overflow = not math.isfinite(out["grad_norm"])
        self.strategy.step(self.optimizer)
        if self.scaler.is_enabled():
            out["loss_scale"], out["overflow"] = self.scaler.get_scale(), float(overflow)
        if not overflow:
            self.after_step()
            self.schedule.step()

    @torch.no_grad()
    def evaluate(self, blend: tuple[float, ...] | None = None) -> tuple[dict[str, float], list[torch.Tensor]]:
        """Fixed eval prompts x fixed seeds: reward mean/std, KL to the reference, diversity. With data.inpaint each
        image repaints the masked part of one fixed data.source image (Batches.eval_inpaint).
        ``blend``: per-step AIG weights (models/inference.py) for inference-time points."""
        rewards_, parts, kls, images = [], {}, [], []
        seeds = self.cfg.data.eval_seeds
        inpaint = self.batches.eval_inpaint(len(seeds))  # data.inpaint: every cell repaints the same masked image
        with self.unwrapped():
            for prompt in self.cfg.data.eval_prompts:
                gens = [torch.Generator().manual_seed(s) for s in seeds]
                with self.autocast():
                    out = sample(self.policy, [prompt] * len(seeds), self.settings, gens, with_ref=True, track_grad=False,
                                 blend=blend, inpaint=inpaint)
                    total, components = score_parts(self.reward, out.images, [prompt] * len(seeds))  # [N], {name: [N]}
                rewards_.append(total.float())
                for name, r in components.items():
                    parts.setdefault(name, []).append(r.float())
                kls.append(kl_term(out.eps, out.eps_ref).float())
                images.append(out.images.float().cpu())  # [N, 3, H, W]
        r = torch.cat(rewards_)  # [P * N]
        metrics = {
            "eval/reward_mean": float(r.mean()),
            "eval/reward_std": float(r.std(unbiased=False)),
            "eval/kl": float(torch.cat(kls).mean()),
            f"eval/diversity_{self.cfg.diversity.name}": self.diversity(images),
        }
        metrics.update({f"eval/reward_{name}": float(torch.cat(vals).mean()) for name, vals in parts.items()})
        return metrics, images

    def validation_edits(self) -> list[torch.Tensor]:
        """data.eval_images edited by the eval prompts (rayjobs/training/validation.py); [] when none are set."""
        if not self.cfg.data.eval_images:
            return []
        with self.unwrapped(), self.autocast():
            return validation_edits(self.cfg, self.policy, self.settings)

    @contextlib.contextmanager
    def unwrapped(self):
        """policy.net and policy.unet are the plain full UNet meanwhile (not DDP, not FSDP shards), so rank 0
        can sample and export alone. Collective under fsdp (the full weights are gathered onto rank 0):
        every rank enters it at the same point (train_loop). Nested uses are free."""
        if self._plain_depth:
            yield
            return
        comps = self.policy.components
        net, unet = self.policy.net, comps.unet
        self._plain_depth += 1
        try:
            with self.strategy.plain_unet(self.policy) as plain:
                if plain is not None:  # None: not rank 0 under fsdp (nothing to run here)
                    self.policy.net = comps.unet = plain
                    if self.compiled is not None and plain is unet:  # ddp: evaluation samples through it too
                        self.policy.net = self.compiled.with_eager(plain)
                yield
        finally:
            self.policy.net, comps.unet = net, unet
            self._plain_depth -= 1

    def _ema_state(self) -> dict[str, torch.Tensor]:
        """The averages, prefixed: they travel with the weights (sharded like them under fsdp)."""
        return {f"{EMA_PREFIX}{k}": v for k, v in self.ema.state_dict().items()} if self.ema is not None else {}

    def save(self, directory: Path, step: int) -> None:
        """Every rank: the strategy writes what is sharded; checkpoint.save the rest (rank 0) and the RNG files,
        then this rank's manifest (the checkpoint is complete once every rank's is there)."""
        checkpoint.begin(directory, self.ctx.rank)
        weights, optimizer = self.strategy.save(directory, self.policy, self.optimizer, self._ema_state())
        checkpoint.save(directory, self.ctx.rank, step, weights, optimizer, self.schedule, self.scaler, self.ctx.world_size)

    def restore(self) -> int:
        """Loads the latest checkpoint if there is one; returns the optimizer steps already done."""
        with self.ctx.latest_checkpoint() as directory:
            if directory is None:
                return 0
            step, weights = checkpoint.load(directory, self.ctx.rank, self.optimizer, self.schedule, self.scaler)
            self.restored_from = checkpoint_location(self.ctx, step, directory)
            extra = self.strategy.load(directory, self.policy, self.optimizer, weights, self._ema_state())
        ema = {k[len(EMA_PREFIX) :]: v for k, v in extra.items()}
        if self.ema is not None and ema:
            self.ema.load_state_dict(ema)
        return step


def train_loop(cfg: Config, run_dir: Path, ctx: WorkerContext) -> None:
    """Train on this rank until cfg.train.steps, evaluating, logging and checkpointing on the way."""
    run_dir = Path(run_dir)
    worker = Worker(cfg, ctx)
    worker.make_class_images()  # before restore: drawn by the base model
    start = worker.restore()
    log = RunLog(run_dir) if ctx.rank == 0 else None
    total, every = cfg.train.steps, cfg.train.eval_every
    last_good = worker.restored_from  # the newest complete checkpoint of this run ("none yet": None)
    guard = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_skipped)
    try:
        if start == 0:
            with worker.unwrapped():  # every rank: collective under fsdp
                if log is not None:
                    _evaluate(worker, log, 0)
        if log is not None and start > 0:
            log.log(start, {"resumed_from_step": start})
        for step in range(start, total):
            t0 = time.perf_counter()
            result = worker.train_step(step, ctx.rank == 0 and (run_dir / STOP_REQUEST).exists())
            done = step + 1
            if result.stop_requested:  # a sweep's scheduler stopped this trial (rayjobs/tune/sweep.py)
                if log is not None:
                    log.log(step, {"stopped": "stop requested (early stopping)"})
                return  # every rank at the same step; Train ends the run cleanly and frees its resources
            metrics = result.metrics  # this step's record, logged and reported; the guard adds its counters to it
            metrics["finite"] = float(result.finite)  # the flag stays in the record as 1.0/0.0: readers of metrics.jsonl use it
            metrics["step_time_s"] = time.perf_counter() - t0
            # the same choice on every rank (finite is all-reduced); only rank 0 logs the skipped prompts
            if guard.should_stop(result, worker.nonfinite_prompts if log is not None else None):
                write_stop(run_dir, log, done, metrics, worker.nonfinite_prompts, last_good, guard.limit)
                return
            if log is not None:
                log.log(done, metrics)
            is_eval = done == total or (every and done % every == 0)
            is_ckpt = done == total or done % cfg.train.checkpoint_every == 0
            if is_eval:
                with worker.unwrapped():  # every rank: collective under fsdp
                    if log is not None:
                        metrics.update(_evaluate(worker, log, done))
            if is_eval or is_ckpt:
                _report(worker, ctx, done, metrics, is_ckpt)
                if is_ckpt:
                    last_good = checkpoint_location(ctx, done)
        if worker.ema is not None:
            worker.ema.swap()  # export the averaged weights (trainable.ema_decay); every rank: fsdp swaps shards
        with worker.unwrapped():  # every rank: collective under fsdp
            if log is not None:
                export(worker.policy, run_dir / "export")
                log.compare(0, total)
    finally:
        if log is not None:
            log.close()


def _evaluate(worker: Worker, log: RunLog, step: int) -> dict[str, float]:
    metrics, images = worker.evaluate()
    metrics["eval/grid"] = str(log.grid(step, images))
    edits = worker.validation_edits()
    if edits:
        metrics["eval/edit_grid"] = str(log.grid(step, edits, kind="edits"))
    log.log(step, metrics)
    return metrics


def _report(worker: Worker, ctx: WorkerContext, step: int, metrics: dict, with_checkpoint: bool) -> None:
    """Every rank reports at the same steps (Ray Train requires it); checkpoints from every rank."""
    payload = {k: v for k, v in metrics.items() if isinstance(v, (int, float))} | {"step": step}
    if not with_checkpoint:
        ctx.report(payload, None)
        return
    with tempfile.TemporaryDirectory(prefix="draftray-ckpt-") as tmp:
        worker.save(Path(tmp), step)
        ctx.report(payload, Path(tmp))
