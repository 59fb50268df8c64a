"""The `ray:` section: workers, placement, storage and sharding of a Ray Train run (docs/cluster.md,
docs/sharding.md). Derived sizes:

    ranks = ray.num_workers;  GPUs per run = ray.num_workers if ray.use_gpu (one per worker)
    CPUs per run = ray.num_workers * ray.cpus_per_worker
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rayjobs.config.base import Strict


class RayConfig(Strict):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL; False = CPU and gloo")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPU cores reserved per worker")
    address: str | None = Field(None, description="Ray cluster to join ('auto', 'ray://host:10001'); None = $RAY_ADDRESS, else start a local Ray")
    max_failures: int = Field(2, ge=0, description="times the worker group restarts from the latest checkpoint after a failure")
    storage_path: str | None = Field(
        None,
        description="storage every node reaches: s3://, gs://, or a shared filesystem path (NFS/EFS/Filestore). Checkpoints, "
        "metrics, samples and the export land under <storage_path>/<run name>/. None = local: <run dir>/checkpoints "
        "(single node only; a multi-node cluster is refused up front)",
    )
    upload_attempts: int = Field(
        3, ge=1, description="tries of each write to ray.storage_path (a checkpoint upload, the run directory's copy) before the "
        "run fails; Ray itself retries only a few AWS error codes"
    )
    upload_backoff_s: float = Field(2.0, ge=0, description="seconds before the first retry of a failed upload, doubled after each (s)")
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="how ranks share the trainable weights (docs/sharding.md): ddp (a full copy per rank; LoRA, text encoder, "
        "tokens, float16), fsdp (torch FSDP2 fully_shard: parameters, gradients and AdamW state sharded; trainable.kind full, "
        "float32/bfloat16), deepspeed (ZeRO stage zero_stage; trainable.kind full, float32/bfloat16; pip install 'draftray[deepspeed]')",
    )
    zero_stage: Literal[1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage with strategy deepspeed: 1 shards the optimizer state, 2 also the gradients, 3 also the parameters (no trainable.ema_decay)")
    accelerator_type: str | None = Field(None, description="Ray accelerator type every worker needs, e.g. 'A100', 'H100' (Ray labels 40 GB and 80 GB A100s both 'A100')")
    resources_per_worker: dict[str, float] = Field(
        {}, description="extra custom resources each worker needs, e.g. {A100_80GB: 1} to tell 80 GB from 40 GB A100 nodes (cluster.yaml)"
    )
    driver_resources: dict[str, float] = Field(
        {},
        description="custom resources of the thin drivers (a submitted job's entrypoint, each Tune trial's driver), e.g. "
        "{draftray_head: 0.001} pins them to the CPU head of cluster.yaml; {} = anywhere",
    )
    ddp_bucket_cap_mb: float = Field(
        25.0, gt=0, description="ray.strategy ddp: MB of gradients per DDP all-reduce bucket (torch's default 25); each "
        "bucket's all-reduce starts as soon as its gradients are ready, overlapping communication with the rest of "
        "the backward. Larger: fewer, bigger messages (fast interconnects); smaller: earlier overlap",
    )
    ddp_gradient_as_bucket_view: bool = Field(
        False, description="ray.strategy ddp: gradients are views into DDP's buckets (no second copy of the gradients: "
        "saves one gradient's memory, about 4 bytes per trainable parameter); torch's default False"
    )
