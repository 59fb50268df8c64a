"""Pareto front of a sweep: hand-checked dominance, points read from trial run directories, every output file."""

import json

import pytest
import yaml

from rayjobs.runlog import write_status
from rayjobs.tune.pareto import collect_rows, fields_of, mark_front, pareto_mask, read_csv, rebuild, write_csv, write_front


@pytest.mark.parametrize(
    "values, expected",
    [
        #  a: best reward  b: dominated by a  c: best diversity  d: in between  e: duplicate of d
        ([(3.0, 1.0), (2.0, 0.5), (1.0, 3.0), (2.0, 2.0), (2.0, 2.0)], [True, False, True, True, True]),
        ([(1.0, 1.0)], [True]),  # a single point is the front
        ([(1.0, 1.0), (1.0, 2.0)], [False, True]),  # tie in reward: more diversity wins
        ([(2.0, 1.0), (1.0, 1.0)], [True, False]),  # tie in diversity: more reward wins
        ([(5.0, 5.0), (1.0, 4.0), (4.0, 1.0), (4.9, 4.9)], [True, False, False, False]),  # all dominated by one
        ([(1.0, 1.0), (1.0, 1.0)], [True, True]),  # exact duplicates do not dominate each other
    ],
)
def test_pareto_mask_hand_cases(values, expected):
    assert pareto_mask(values) == expected


def _trial(root, name, kl, rows, status=None):
    d = root / name
    (d / "samples").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"objective": {"kl_coeff": kl}, "optim": {"lr": 0.01}}))
    lines = [{"step": 1, "loss": 0.1}]
    for s, r, v in rows:
        grid = d / "samples" / f"step_{s:06d}.png"
        grid.write_bytes(b"\x89PNG fake")
        lines.append({"step": s, "eval/reward_mean": r, "eval/reward_std": 0.1, "eval/diversity_x": v, "eval/kl": 0.0,
                      "eval/reward_a": r / 2, "eval/grid": str(grid)})  # fmt: skip
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if status:
        write_status(d, *status)
    for s, _, _ in rows[1:]:  # a checkpoint per evaluation after step 0
        _checkpoint(d / "checkpoints" / f"step_{s:06d}", s)


def _checkpoint(directory, step):
    """A complete checkpoint (rayjobs/training/checkpoint.py: files + manifest) of one dummy weight at ``step``."""
    import torch

    from rayjobs.training import checkpoint

    schedule = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), lambda _: 1.0)
    checkpoint.save(directory, 0, step, {"w": torch.zeros(1)}, None, schedule)


@pytest.fixture
def trials(tmp_path):
    root = tmp_path / "trials"
    _trial(root, "t0", 0.0, [(0, 1.0, 0.5), (10, 3.0, 0.1)], ("done", ""))
    _trial(root, "t1", 1.0, [(0, 1.0, 0.5), (10, 2.0, 0.4)])
    _trial(root, "t2", 0.1, [], ("failed", "training failed (worker died)"))
    (root / "not-a-trial").mkdir()
    return root


def test_collect_rows_reads_every_evaluation_and_failures(trials):
    rows = collect_rows(trials, ["objective.kl_coeff"], "eval/reward_mean", "eval/diversity_x")
    assert [(r["trial"], r.get("step"), r["config.objective.kl_coeff"], r["status"]) for r in rows] == [
        ("t0", 0, 0.0, "done"), ("t0", 10, 0.0, "done"), ("t1", 0, 1.0, "done"), ("t1", 10, 1.0, "done"), ("t2", None, 0.1, "failed")]  # fmt: skip
    assert rows[-1]["error"] == "training failed (worker died)"
    assert rows[1]["checkpoint"].endswith("checkpoints/step_000010") and rows[0]["checkpoint"] == ""  # step 0 = base model
    assert rows[1]["reward/a"] == 1.5 and rows[1]["reward_std"] == 0.1
    front = mark_front(rows)
    assert [(r["trial"], r["step"]) for r in front] == [("t0", 10), ("t1", 10), ("t0", 0), ("t1", 0)]  # highest reward first
    assert rows[-1]["on_front"] is False  # the failed trial has no point


def test_trials_csv_round_trips(trials, tmp_path):
    keys = ["objective.kl_coeff"]
    rows = collect_rows(trials, keys, "eval/reward_mean", "eval/diversity_x")
    mark_front(rows)
    fields = fields_of(rows, keys)
    assert fields[:5] == ["trial", "status", "error", "config.objective.kl_coeff", "kl_coeff"] and "reward/a" in fields and fields[-2:] == ["checkpoint", "grid"]
    write_csv(rows, fields, tmp_path / "trials.csv")
    back = read_csv(tmp_path / "trials.csv")
    assert back == rows  # typed back exactly


def test_every_output_written_and_rebuilt_from_trials_csv(trials, tmp_path):
    out = tmp_path
    (out / "sweep.yaml").write_text(yaml.safe_dump({"diversity": {"name": "x"}, "sweep": {"params": {"objective.kl_coeff": {"grid": [0.0, 1.0]}}}}))
    keys = ["objective.kl_coeff"]
    rows = collect_rows(trials, keys, "eval/reward_mean", "eval/diversity_x")
    mark_front(rows)
    write_csv(rows, fields_of(rows, keys), out / "trials.csv")
    front = write_front(out, rows, keys, "eval/reward_mean", "eval/diversity_x")
    doc = json.loads((out / "pareto.json").read_text())
    assert doc["reward_metric"] == "eval/reward_mean" and len(doc["points"]) == len(front) == 4
    top = doc["points"][0]
    assert top["reproduce"] == f"draftray train {out}/trials/t0/config.yaml run.name=t0-step10 train.steps=10"
    assert (out / top["front_grid"]).read_bytes() == b"\x89PNG fake"  # same eval grid, copied per front point
    assert len(list((out / "front").glob("*.png"))) == 4
    summary = (out / "summary.md").read_text()
    assert "| t2 | failed | 0.1 |" in summary and "- t2: training failed (worker died)" in summary
    assert "| t0 | done | 0 | 10 | trained | 3 | 0.1 | 0 |" in summary and top["reproduce"] in summary
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "pareto.csv").read_text().splitlines()) == 5
    before = {p: (out / p).read_text() for p in ("pareto.csv", "pareto.json", "summary.md")}
    for p in before:
        (out / p).unlink()
    assert rebuild(out) == out.resolve()  # `draftray pareto SWEEP_DIR`
    assert {p: (out / p).read_text() for p in before} == before


def test_inference_points_join_the_front(trials, tmp_path):
    """inference.jsonl points (rayjobs/tune/inference_points.py) are read with their kind and knob, and can be on the front."""
    rows = [{"step": 10, "kind": "lora_scale", "knob": "0.5", "eval/reward_mean": 2.5, "eval/diversity_x": 0.35, "eval/kl": 0.01},
            {"step": 10, "kind": "aig", "knob": "power_2", "eval/reward_mean": 1.5, "eval/diversity_x": 0.2, "eval/kl": 0.0}]  # fmt: skip
    (trials / "t0" / "inference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = ["objective.kl_coeff"]
    rows = collect_rows(trials, keys, "eval/reward_mean", "eval/diversity_x")
    mark_front(rows)
    extra = [r for r in rows if r["kind"] not in ("trained", "")]
    assert [(r["kind"], r["knob"], r["on_front"], r["checkpoint"][-11:]) for r in extra] == [
        ("lora_scale", "0.5", True, "step_000010"), ("aig", "power_2", False, "step_000010")]  # fmt: skip
    write_csv(rows, fields_of(rows, keys), tmp_path / "trials.csv")
    assert read_csv(tmp_path / "trials.csv")[2]["knob"] == "0.5"  # a knob label stays text
    front = write_front(tmp_path, rows, keys, "eval/reward_mean", "eval/diversity_x")
    assert "| t0 | done | 0 | 10 | lora_scale 0.5 | 2.5 | 0.35 |" in (tmp_path / "summary.md").read_text()
    assert "LoRA scale 0.5" in next(r["reproduce"] for r in front if r["kind"] == "lora_scale")


def test_an_interrupted_sweep_lists_every_trial_and_how_to_finish_it(tmp_path):
    """Trial 0 done, trial 1 interrupted before its first evaluation, trial 2 never started (a row of its own,
    rayjobs/tune/sweep.py: _unstarted): trials.csv lists the three with their states; the outputs built from it
    (`draftray pareto`) keep the rows without metrics off the front and the plot, and summary.md counts the states
    and gives the command that finishes the sweep."""
    from rayjobs.tune.pareto import unstarted_row

    root = tmp_path / "trials"
    _trial(root, "_trial_abcde_00000", 0.0, [(0, 1.0, 0.5), (10, 3.0, 0.1)], ("done", ""))
    _trial(root, "_trial_abcde_00001", 1.0, [], ("interrupted", ""))
    keys = ["objective.kl_coeff"]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"diversity": {"name": "x"}, "sweep": {"params": {keys[0]: {"grid": [0.0, 1.0, 10.0]}}}}))
    rows = collect_rows(root, keys, "eval/reward_mean", "eval/diversity_x") + [unstarted_row(2, {keys[0]: 10.0}, keys, 10.0)]
    mark_front(rows)
    write_csv(rows, fields_of(rows, keys), tmp_path / "trials.csv")
    back = read_csv(tmp_path / "trials.csv")
    assert [(r["trial"], r["status"], r.get("step")) for r in back] == [
        ("_trial_abcde_00000", "done", 0), ("_trial_abcde_00000", "done", 10), ("_trial_abcde_00001", "interrupted", None), ("#2", "not_started", None)]  # fmt: skip
    assert back[-1] == {"trial": "#2", "status": "not_started", "error": "", "config.objective.kl_coeff": 10.0, "kl_coeff": 10.0, "kind": "",
                        "knob": "", "on_front": False, "checkpoint": "", "grid": ""}  # fmt: skip
    assert rebuild(tmp_path) == tmp_path.resolve()
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith(f"Trials: 1 done, 1 interrupted, 1 not_started (3 in all).\n\nThe sweep was interrupted: `draftray sweep --resume {tmp_path}`")
    assert "| _trial_abcde_00001 | interrupted | 1 |  |  |  |  |  |" in summary and "| #2 | not_started | 10 |  |  |  |  |  |" in summary
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(read_csv(tmp_path / "pareto.csv")) == 2


def test_the_plot_and_summary_of_a_sweep_without_any_evaluation(tmp_path):
    """Interrupted before any evaluation: nothing to plot or rank, and still every output is written."""
    from rayjobs.tune.pareto import unstarted_row

    keys = ["objective.kl_coeff"]
    rows = [unstarted_row(i, {keys[0]: kl}, keys, kl) for i, kl in enumerate([0.0, 1.0])]
    assert write_front(tmp_path, rows, keys, "eval/reward_mean", "eval/diversity_x") == []
    assert (tmp_path / "pareto.png").is_file() and "Trials: 2 not_started (2 in all)." in (tmp_path / "summary.md").read_text()
