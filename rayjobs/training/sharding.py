"""How ranks share the trainable UNet (ray.strategy): ddp, fsdp (torch FSDP2) or deepspeed (ZeRO 1/2/3).

One small interface, so ``Worker.train_step`` never branches on the strategy's name:

    setup(policy, build_optimizer) -> optimizer   wrap/shard the UNet, build the optimizer over what it trains
    accumulate(last)                              context of one micro-batch; ddp/deepspeed reduce when ``last``
    backward(loss)                                loss already divided by grad_accum
    finish_grads(optimizer, max_norm) -> norm     unscale, clip to the GLOBAL norm (all ranks agree on it)
    step(optimizer)                               the optimizer update (skipped on a float16 overflow)
    plain_unet(policy)                            context: the full, unwrapped UNet on rank 0 (collective)
    save(directory, policy, optimizer, extra) / load(...)   trainable weights + optimizer state (+ ``extra``, the EMA)

DeepSpeed's engine owns clipping and the update: its ``finish_grads`` runs ``engine.step()`` (which clips,
and skips the update itself when the global gradient norm is not finite) and its ``step`` does nothing.
docs/sharding.md says when to use which, and what each costs per rank.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
import torch.distributed as dist

from rayjobs.training import checkpoint

DCP_DIR = "dcp"  # FSDP: torch.distributed.checkpoint files, one __<rank>_0.distcp per rank + .metadata
DS_DIR, DS_TAG = "deepspeed", "ckpt"  # DeepSpeed: <DS_DIR>/<DS_TAG>/{mp_rank_00_model_states.pt, zero_pp_rank_<r>_...}


def build(cfg, ctx, scaler: torch.amp.GradScaler):
    """The strategy of ``cfg.ray.strategy``."""
    # one rank without a process group (LocalContext) has nothing to shard; with one, the layout is kept
    # (e.g. an fsdp checkpoint resumed on a single worker)
    name = cfg.ray.strategy if dist.is_available() and dist.is_initialized() else "ddp"
    if name == "fsdp":
        return FSDP(ctx, scaler)
    if name == "deepspeed":
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else 0.0  # DeepSpeed: 0 = no clipping
        return DeepSpeed(ctx, scaler, cfg.ray.zero_stage, cfg.train.grad_accum, clip)
    return DDP(ctx, scaler, cfg.ray.ddp_bucket_cap_mb, cfg.ray.ddp_gradient_as_bucket_view)


class DDP:
    """A full copy of the trainable weights per rank; gradients all-reduced in backward (one rank: no wrapper)."""

    def __init__(self, ctx, scaler: torch.amp.GradScaler, bucket_cap_mb: float = 25.0, gradient_as_bucket_view: bool = False):
        """``bucket_cap_mb`` / ``gradient_as_bucket_view``: DDP's gradient buckets (ray.ddp_*): each bucket's
        all-reduce overlaps the rest of the backward; views save one copy of the gradients."""
        self.ctx, self.scaler = ctx, scaler
        self.bucket_cap_mb, self.gradient_as_bucket_view = bucket_cap_mb, gradient_as_bucket_view
        self.net: torch.nn.Module | None = None
        self.params: list[torch.nn.Parameter] = []

    def setup(self, policy, build_optimizer):
        if self.ctx.world_size > 1:
            # DDP averages gradients across ranks in backward. LoRA/full leave no unused parameters.
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.net = policy.net = torch.nn.parallel.DistributedDataParallel(
                policy.unet, device_ids=ids, bucket_cap_mb=self.bucket_cap_mb, gradient_as_bucket_view=self.gradient_as_bucket_view
            )
        self.params = policy.parameters()
        return build_optimizer(policy)

    def accumulate(self, last: bool):
        return self.net.no_sync() if (self.net is not None and not last) else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def finish_grads(self, optimizer, max_norm: float) -> torch.Tensor:
        self.scaler.unscale_(optimizer)  # clip the true gradients (float16 loss scaling)
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm).float()

    def step(self, optimizer) -> None:
        self.scaler.step(optimizer)  # optimizer.step() unless float16 found an inf
        self.scaler.update()

    @contextlib.contextmanager
    def plain_unet(self, policy):
        yield policy.unet  # every rank holds the full weights

    def save(self, directory: Path, policy, optimizer, extra: dict) -> tuple[dict, object]:
        """Writes what is sharded (collective) and returns (weights, optimizer) for checkpoint.save's rank-0
        files. ``extra``: more named tensors to keep (the EMA), keys distinct from the trainable names."""
        return policy.trainable_state_dict() | extra, optimizer

    def load(self, directory: Path, policy, optimizer, weights: dict, extra: dict) -> dict:
        """Restores weights (+ optimizer where sharded) from ``directory`` and ``weights`` (rank 0's file,
        checkpoint.load); returns the saved ``extra`` entries (``extra`` = their current values: the layout)."""
        if not set(weights) - set(extra):
            raise RuntimeError(f"ray.strategy: {directory} holds no {checkpoint.WEIGHTS}: written by fsdp/deepspeed, resume with that strategy")
        policy.load_trainable_state_dict({k: v for k, v in weights.items() if k not in extra})
        return {k: v for k, v in weights.items() if k in extra}


class FSDP(DDP):
    """torch FSDP2 (fully_shard): parameters, gradients and AdamW state sharded over ranks (a 1/world_size
    slice each); each UNet block all-gathers its weights for its forward/backward and frees them after."""

    def setup(self, policy, build_optimizer):
        from torch.distributed.fsdp import fully_shard

        unet = policy.unet
        # one all-gather unit per UNet block (peak memory ~ one full block), the root takes the rest
        for name in ("down_blocks", "up_blocks"):
            for block in getattr(unet, name, []):
                fully_shard(block)
        if getattr(unet, "mid_block", None) is not None:
            fully_shard(unet.mid_block)
        fully_shard(unet)
        self.unet, self.net = unet, None
        self.params = policy.parameters()  # now DTensor shards
        return build_optimizer(policy)

    # accumulate: inherited no-op. Every micro-batch reduce-scatters, so gradients accumulate sharded
    # (4 bytes x params / world_size); skipping the sync would hold the full unsharded gradients meanwhile.

    def finish_grads(self, optimizer, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)  # DTensor: the global norm, replicated
        return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float()

    @contextlib.contextmanager
    def plain_unet(self, policy):
        """Collective: every rank gathers; rank 0 gets a plain float32 UNet holding the full weights (a
        transient extra copy on rank 0 only), the others None. Rank-0-only work (evaluation, the
        export) then runs on it without any collective, so nothing waits on the other ranks."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        plain = _plain_copy(policy, full, self.ctx) if self.ctx.rank == 0 else None
        del full  # the host copy: not held while rank 0 works
        yield plain

    def save(self, directory: Path, policy, optimizer, extra: dict) -> None:
        """Collective: DCP writes one shard file per rank (rank-distinct names) and rank 0 the metadata."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.unet, optimizer)
        checkpoint.save_sharded(Path(directory) / DCP_DIR, {"model": model, "optim": optim, "extra": extra})
        return {}, None

    def load(self, directory: Path, policy, optimizer, weights: dict, extra: dict) -> dict:
        """DCP loads in place into this run's shards, resharding: the number of ranks may differ."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not (Path(directory) / DCP_DIR).is_dir():
            raise RuntimeError(f"ray.strategy: {directory} holds no {DCP_DIR}/: not written by fsdp, resume with its strategy")
        model, optim = get_state_dict(self.unet, optimizer)
        state = {"model": model, "optim": optim, "extra": {k: v.detach().clone() for k, v in extra.items()}}
        checkpoint.load_sharded(Path(directory) / DCP_DIR, state)
        set_state_dict(self.unet, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return state["extra"]


def _plain_copy(policy, full: dict, ctx) -> torch.nn.Module:
    """Rank 0: a plain float32 UNet holding ``full`` (a gathered state dict on the host), on this rank's device."""
    with policy.reference() as ref:  # the frozen copy of the same architecture (full fine-tuning)
        plain = copy.deepcopy(ref).to(torch.float32)
    plain.load_state_dict(full)
    return plain.to(ctx.device).requires_grad_(False)


class DeepSpeed(DDP):
    """DeepSpeed ZeRO stage 1 (optimizer state sharded), 2 (+ gradients) or 3 (+ parameters: the engine's
    hooks all-gather each module's weights for its forward/backward and free them after).
    Our torch AdamW is handed to the engine (no FusedAdam: runs on CPU too); LR schedule and EMA stay ours
    (the EMA reads whole parameters: the config refuses it with stage 3)."""

    # ZeRO-3: parameters under this many elements stay whole on every rank (fewer tiny all-gathers);
    # None = DeepSpeed's default (1e5). tests/test_sharding.py sets 0 so every toy UNet weight is sharded.
    persistence_threshold: int | None = None

    def __init__(self, ctx, scaler, zero_stage: int, grad_accum: int, grad_clip: float):
        super().__init__(ctx, scaler)
        self.zero_stage, self.grad_accum, self.grad_clip = zero_stage, grad_accum, grad_clip

    def setup(self, policy, build_optimizer):
        import deepspeed

        optimizer = build_optimizer(policy)
        zero = {"stage": self.zero_stage}
        if self.zero_stage == 3 and self.persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = self.persistence_threshold
        config = {
            "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: batches are ours (train.batch_size)
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": self.grad_clip,  # the global norm, as clip_grad_norm_ (optim.grad_clip)
            "zero_optimization": zero,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(model=policy.unet, optimizer=optimizer, config=config, dist_init_required=False)
        self.net = policy.net = self.engine
        self.params = policy.parameters()
        return optimizer  # the torch AdamW the engine steps: its param_groups carry our LR schedule

    def accumulate(self, last: bool):
        self.engine.set_gradient_accumulation_boundary(last)  # ZeRO reduces gradients at the boundary
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # already divided by grad_accum

    def finish_grads(self, optimizer, max_norm: float) -> torch.Tensor:
        """The engine clips to the global norm (its config) and steps here; a non-finite norm skips its update."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else float(norm))

    def step(self, optimizer) -> None:
        pass  # done in finish_grads

    @contextlib.contextmanager
    def plain_unet(self, policy):
        """ZeRO 1/2 keep the full (updated) parameters on every rank: the UNet itself. ZeRO-3 as fsdp:
        collective, one module at a time gathered into rank 0's host memory (the engine's consolidated
        state dict, what its save_16bit_model writes); rank 0 gets a plain float32 copy, the others None."""
        if self.zero_stage < 3:
            yield policy.unet
            return
        full = self.engine._zero3_consolidated_16bit_state_dict()  # "16bit": the module's dtype, float32 here
        plain = _plain_copy(policy, full, self.ctx) if self.ctx.rank == 0 else None
        del full
        yield plain

    def save(self, directory: Path, policy, optimizer, extra: dict):
        """Collective: rank 0 writes the module (ZeRO-3: each rank its parameter partition), each rank its ZeRO
        optimizer partition (float32 master weights + AdamW moments); all names rank-distinct."""
        extra = {k: v.detach().cpu() for k, v in extra.items()}  # the EMA: whole on every rank, kept by rank 0
        self.engine.save_checkpoint(str(Path(directory) / DS_DIR), tag=DS_TAG, client_state={"extra": extra}, save_latest=False)
        return {}, None

    def load(self, directory: Path, policy, optimizer, weights: dict, extra: dict) -> dict:
        """Same number of ranks only: each loads its own ZeRO partition file."""
        written = len(list((Path(directory) / DS_DIR / DS_TAG).glob("zero_pp_rank_*_optim_states.pt")))
        if written != self.ctx.world_size:
            raise RuntimeError(
                f"ray.num_workers: this DeepSpeed checkpoint was written by {written} ranks, resumed on {self.ctx.world_size}; "
                "ZeRO partitions need the same number (or convert it with DeepSpeed's ds_to_universal)"
            )
        path, client = self.engine.load_checkpoint(str(Path(directory) / DS_DIR), tag=DS_TAG, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {directory}/{DS_DIR}")
        return client.get("extra", {})

