"""`module:Attr` plug-ins (reward.name, reward.terms[].name, diversity.name): only a registered builder, or a
subclass of a registered class, is ever called. Anything else is refused by name before it is called or
instantiated, so a config cannot run os.system, subprocess.run or eval with its kwargs (docs/security.md)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rewards

ROOT = Path(__file__).parents[1]
ARBITRARY = ["os:system", "subprocess:run", "builtins:eval", "builtins:exec", "shutil:rmtree", "pathlib:Path"]


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A plug-in module on sys.path: a subclass of a registered reward, a registered function, a bare nn.Module."""
    (tmp_path / "myplug.py").write_text(textwrap.dedent("""
        import torch
        import rewards
        from rewards.simple import Colorfulness

        class Vivid(Colorfulness):              # a subclass of a registered reward: implements the contract
            pass

        @rewards.register_reward("myplug_brightness")
        def brightness(scale=1.0):
            return lambda images, prompts: scale * images.mean(dim=(1, 2, 3))

        class Bare(torch.nn.Module):            # callable like a reward, but never declared one
            def forward(self, images, prompts):
                return images.mean(dim=(1, 2, 3))

        def helper(**kwargs):                   # any other callable
            return kwargs
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("myplug", None)


@pytest.mark.parametrize("name", ARBITRARY)
@pytest.mark.parametrize("call", ["check", "build_reward", "build_diversity"])
def test_an_arbitrary_callable_is_refused_before_it_runs(name, call, tmp_path):
    marker = tmp_path / "ran"
    kwargs = {"command": f"touch {marker}"} if name == "os:system" else {}
    with pytest.raises(rewards.UnknownNameError, match=rf"'{name}' is not a registered"):
        if call == "check":
            rewards.check(name, kwargs, "reward")
        elif call == "build_reward":
            rewards.build_reward(name, **kwargs)
        else:
            rewards.build_diversity(name, **kwargs)
    assert not marker.exists()


def test_a_reward_is_not_a_diversity_metric(plugins):
    """The mark names the kind: a registered reward cannot stand where a diversity metric is asked for."""
    with pytest.raises(rewards.UnknownNameError, match="not a registered diversity metric"):
        rewards.build_diversity("myplug:Vivid")
    with pytest.raises(rewards.UnknownNameError, match="not a registered diversity metric"):
        rewards.build_diversity("rewards.simple:Colorfulness")


def test_registered_plugins_and_their_subclasses_work(plugins):
    images = torch.rand(2, 3, 8, 12)
    vivid = rewards.build_reward("myplug:Vivid")
    assert torch.equal(vivid(images, ["a", "b"]), rewards.build_reward("colorfulness")(images, ["a", "b"]))
    bright = rewards.build_reward("myplug:brightness", scale=2.0)
    assert torch.allclose(bright(images, ["a", "b"]), 2.0 * images.mean(dim=(1, 2, 3)))
    rewards.check("myplug:Vivid", {}, "reward")


@pytest.mark.parametrize("attr", ["Bare", "helper"])
def test_an_unregistered_module_or_function_is_refused(plugins, attr):
    with pytest.raises(rewards.UnknownNameError, match=r"decorate it with @rewards.register_reward\(name\)"):
        rewards.build_reward(f"myplug:{attr}")


def test_the_cli_refuses_os_system_with_one_line_and_runs_nothing(tmp_path):
    """The defect as found: `reward.name: os:system` with a command in kwargs ran the command in preflight."""
    marker, out = tmp_path / "ran", tmp_path / "runs"
    config = tmp_path / "evil.yaml"
    config.write_text(f"reward:\n  name: os:system\n  kwargs:\n    command: touch {marker}\nrun:\n  output_dir: {out}\n")
    proc = subprocess.run([sys.executable, "-m", "rayjobs.cli", "train", str(config)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "reward: reward 'os:system' is not a registered reward" in lines[0]
    assert not marker.exists() and not out.exists()
