"""Pareto front of a sweep: hand-checked dominance, points read from trial run directories, table and plot."""

import json

import pytest
import yaml

from rayjobs.pareto import collect_points, pareto_mask, plot_front, write_points, write_summary


def test_pareto_mask_hand_cases():
    #          a: best reward  b: dominated by a  c: best diversity  d: in between  e: duplicate of d
    values = [(3.0, 1.0), (2.0, 0.5), (1.0, 3.0), (2.0, 2.0), (2.0, 2.0)]
    assert pareto_mask(values) == [True, False, True, True, True]  # equal points do not dominate each other
    assert pareto_mask([(1.0, 1.0)]) == [True]
    assert pareto_mask([(1.0, 1.0), (1.0, 2.0)]) == [False, True]  # ties in reward: more diversity wins


def _trial(root, name, kl, rows):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"objective": {"kl_coeff": kl}, "optim": {"lr": 0.01}}))
    lines = [{"step": 1, "loss": 0.1}] + [{"step": s, "eval/reward_mean": r, "eval/diversity_x": v, "eval/kl": 0.0} for s, r, v in rows]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.fixture
def trials(tmp_path):
    root = tmp_path / "trials"
    _trial(root, "t0", 0.0, [(0, 1.0, 0.5), (10, 3.0, 0.1)])
    _trial(root, "t1", 1.0, [(0, 1.0, 0.5), (10, 2.0, 0.4)])
    (root / "not-a-trial").mkdir()
    return root


def test_collect_points_reads_every_evaluation(trials):
    pts = collect_points(trials, ["objective.kl_coeff"], "eval/reward_mean", "eval/diversity_x")
    assert [(p["trial"], p["step"], p["objective.kl_coeff"]) for p in pts] == [("t0", 0, 0.0), ("t0", 10, 0.0), ("t1", 0, 1.0), ("t1", 10, 1.0)]
    assert [p["on_front"] for p in pts] == [True, True, True, True]  # base (0.5 div), high reward, middle


def test_table_and_plot_written(trials, tmp_path):
    keys = ["objective.kl_coeff"]
    pts = collect_points(trials, keys, "eval/reward_mean", "eval/diversity_x")
    write_points(pts, keys, tmp_path / "points.csv")
    text = write_summary(pts, keys, tmp_path / "summary.md")
    plot_front(pts, keys, tmp_path / "pareto.png", "eval/reward_mean", "eval/diversity_x")
    header = (tmp_path / "points.csv").read_text().splitlines()[0]
    assert header == "trial,objective.kl_coeff,step,kind,knob,reward,diversity,kl,on_front,grid"
    assert "| 0 | 10 | trained | 3 | 0.1 | 0 | yes |" in text and "| 1 | 10 | trained | 2 | 0.4 | 0 | yes |" in text
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inference_points_join_the_front(trials, tmp_path):
    """inference.jsonl points (rayjobs/knobs.py) are read with their kind and knob, and can be on the front."""
    rows = [{"step": 10, "kind": "lora_scale", "knob": "0.5", "eval/reward_mean": 2.5, "eval/diversity_x": 0.35, "eval/kl": 0.01},
            {"step": 10, "kind": "aig", "knob": "power_2", "eval/reward_mean": 1.5, "eval/diversity_x": 0.2, "eval/kl": 0.0}]  # fmt: skip
    (trials / "t0" / "inference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = ["objective.kl_coeff"]
    pts = collect_points(trials, keys, "eval/reward_mean", "eval/diversity_x")
    extra = [p for p in pts if p["kind"] != "trained"]
    assert [(p["kind"], p["knob"], p["on_front"]) for p in extra] == [("lora_scale", "0.5", True), ("aig", "power_2", False)]
    text = write_summary(pts, keys, tmp_path / "summary.md")
    assert "| 0 | 10 | lora_scale 0.5 | 2.5 | 0.35 |" in text
    plot_front(pts, keys, tmp_path / "pareto.png", "eval/reward_mean", "eval/diversity_x")
    assert (tmp_path / "pareto.png").stat().st_size > 0
