"""Two Ray nodes on one host (ray.cluster_utils.Cluster, 1 CPU each), shared local storage: a 2-worker run
spreads over both nodes, and local storage is refused; in the slow tier a sweep runs 2 trials at once across them
and a lost node's run resumes on the other, bit for bit.

A separate cluster from tests/test_ray.py's (module-scoped: it is shut down before that module starts). Each test
starts from two live nodes (the ``nodes`` fixture), whatever ran before it.
"""

import contextlib
import json
import os
from pathlib import Path

import pytest
from rayrun import assert_bitwise_equal, checkpoint_state, one_process
from shortrun import SHORT

from rayjobs.config import load_config
from rayjobs.errors import UserError
from rayjobs.runlog import PLACEMENT_GROUPS, read_metrics

pytestmark = pytest.mark.ray

FAST = [*SHORT, "sampler.truncation_steps=1", "train.batch_size=1", "train.eval_every=0", "model.name_or_path=tiny",
        "reward.name=colorfulness", "diversity.name=pairwise_rms"]  # fmt: skip


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    saved = os.environ.get("PYTHONPATH")
    # The nodes' workers inherit this environment: they can import tests/faults.py. Restored afterwards.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), saved]))
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1"})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
        ray.shutdown()
        cluster.shutdown()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.fixture
def nodes(two_nodes):
    """The module's cluster with its two nodes alive: a test that lost one (or failed before re-adding it) does
    not change what the next test sees."""
    while len(two_nodes.list_all_nodes()) < 2:
        two_nodes.add_node(num_cpus=1)
    two_nodes.wait_for_nodes()
    return two_nodes


def _cfg(tmp_path, *extra):
    return load_config(None, FAST + [f"run.output_dir={tmp_path / 'runs'}", *extra])


def test_a_multi_node_run_without_shared_storage_is_refused(nodes, tmp_path):
    from rayjobs.cluster.driver import fit

    with pytest.raises(UserError, match=r"^ray.storage_path: this cluster has 2 nodes.*set ray.storage_path to s3://"):
        fit(_cfg(tmp_path, "run.name=local"))
    assert not (tmp_path / "runs" / "local").exists()  # refused before anything was written


def test_two_workers_spread_over_both_nodes_with_shared_storage(nodes, tmp_path):
    import ray

    from rayjobs.cluster.driver import fit

    shared = tmp_path / "shared"
    run = fit(_cfg(tmp_path, "run.name=spread", "ray.num_workers=2", "train.steps=2", "train.checkpoint_every=1", f"ray.storage_path={shared}"))
    pg = (run / PLACEMENT_GROUPS).read_text().split()[0]
    placed = set(ray.util.placement_group_table()[pg]["bundles_to_node_id"].values())
    assert len(placed) == 2  # one worker per node
    stored = shared / "spread"
    assert sorted(p.name for p in stored.glob("step_*")) == ["step_000001", "step_000002"]  # Ray Train's checkpoints
    assert {"rng_rank0.pt", "rng_rank1.pt", "trainable.safetensors"} <= {p.name for p in (stored / "step_000002").iterdir()}
    assert [m["step"] for m in read_metrics(stored) if "loss" in m] == [1, 2]  # synced by rank 0
    assert (stored / "export" / "pytorch_lora_weights.safetensors").is_file() and (stored / "samples" / "step_000002.png").is_file()


@pytest.mark.slow
def test_a_sweep_runs_two_trials_at_once_across_the_nodes(nodes, tmp_path):
    from rayjobs.tune.sweep import run_sweep

    meet = tmp_path / "rendezvous"  # each trial's worker waits there for the other: they must train at once
    cfg = _cfg(tmp_path, "train.steps=2", "train.eval_every=2", f"ray.storage_path={tmp_path / 'shared'}",
               "reward.name=faults:Rendezvous", f"reward.kwargs={{directory: '{meet}', parties: 2}}",
               "sweep={name: two, params: {objective.kl_coeff: {grid: [0.0, 1.0]}}, inference: {lora_scales: [0.5]}}")  # fmt: skip
    out = run_sweep(cfg)  # a trial that waited alone would fail after its timeout, and the sweep with it
    assert len(list(meet.iterdir())) == 2 and (out / "pareto.csv").is_file()
    for trial in (out / "trials").iterdir():  # the knobs found the checkpoints in the storage
        assert [r["step"] for r in read_metrics(trial, "inference.jsonl")] == [2]
    assert (tmp_path / "shared" / "two" / "pareto.csv").is_file() and (tmp_path / "shared" / "two" / "summary.md").is_file()


def test_sync_copies_only_what_changed_and_pull_restores_it(tmp_path):
    from rayjobs.cluster.storage import pull_run_dir, sync_run_dir

    run, store = tmp_path / "runs" / "r", str(tmp_path / "store")
    (run / "samples").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "w").write_text("Ray Train uploads these itself")
    (run / ".placement_groups").write_text("local bookkeeping")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "samples" / "step_000001.png").write_bytes(b"png")
    seen: dict = {}
    assert sync_run_dir(run, store, "r", seen) == 2 and sync_run_dir(run, store, "r", seen) == 0
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2}\n')
    assert sync_run_dir(run, store, "r", seen) == 1  # only the grown metrics file
    assert sorted(p.name for p in (tmp_path / "store" / "r").rglob("*")) == ["metrics.jsonl", "samples", "step_000001.png"]
    elsewhere = tmp_path / "node2" / "r"  # rank 0 on another node after a restart
    assert pull_run_dir(elsewhere, store, "r") == 2 and (elsewhere / "metrics.jsonl").read_text().count("step") == 2


class _Blocker:
    def ready(self) -> bool:
        return True


@pytest.mark.slow
def test_a_lost_node_resumes_on_the_remaining_one(nodes, tmp_path):
    """The node running the only worker is removed from the cluster mid-run (its raylet and workers killed): Ray
    Train restarts the worker group on the head node from the last checkpoint, and the run completes with the
    weights and AdamW state, bit for bit, of one uninterrupted process. A blocker actor holds the head's CPU at
    the start so that the worker lands on the second node."""
    import threading
    import time

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rayjobs.cluster.driver import fit

    head = ray.get_runtime_context().get_node_id()  # the driver's node
    held = ray.remote(num_cpus=1)(_Blocker).options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
    ray.get(held.ready.remote(), timeout=60)
    marker, log = tmp_path / "held", tmp_path / "nodes.jsonl"
    cfg = _cfg(tmp_path, "run.name=lost", "train.steps=4", "train.checkpoint_every=1", "ray.max_failures=1",
               f"ray.storage_path={tmp_path / 'shared'}", "reward.name=faults:NodeHold",
               f"reward.kwargs={{at_call: 3, marker: '{marker}', log: '{log}'}}")  # fmt: skip
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run=fit(cfg)))
    runner.start()
    try:
        deadline = time.time() + 180
        while not marker.exists() and runner.is_alive() and time.time() < deadline:
            time.sleep(0.2)
        lost = marker.read_text()
        assert lost != head
        ray.kill(held)  # the head's CPU is free for the restarted worker
        node = next(n for n in nodes.worker_nodes if n.node_id == lost)
        nodes.remove_node(node, allow_graceful=False)
        runner.join(timeout=300)
    finally:
        with contextlib.suppress(Exception):  # already gone when the run got that far
            ray.kill(held)
    run = result["run"]
    calls = [json.loads(line)["node"] for line in log.read_text().splitlines()]
    assert calls[:3] == [lost] * 3 and set(calls[3:]) == {head}  # steps 1-3 on the lost node, the rest on the head
    resumed = [m["resumed_from_step"] for m in read_metrics(run) if "resumed_from_step" in m]
    assert resumed == [2]  # from the step-2 checkpoint, not from scratch
    assert [m["step"] for m in read_metrics(run) if "loss" in m][-2:] == [3, 4]
    assert (tmp_path / "shared" / "lost" / "step_000004" / "manifest.json").is_file()
    straight = one_process(tmp_path / "ref", "lost", *FAST, "train.steps=4", "train.checkpoint_every=1")  # NodeHold scores as colorfulness
    assert_bitwise_equal(checkpoint_state(tmp_path / "shared" / "lost" / "step_000004"), checkpoint_state(straight / "checkpoints" / "local_step_000004"))
