"""`draftray weights list` / `draftray weights fetch NAME...`: the reward and LPIPS weight locations.

Each registered reward or diversity metric that lists weight sources (rewards.sources.Source) is a
NAME; `list` shows each default location and whether it resolves on this machine, `fetch` downloads
the defaults into the Hugging Face or torch hub cache (network needed).
"""

from __future__ import annotations

from rayjobs.errors import UserError, first_line
from rayjobs.tools.score import columns


def _with_weights() -> dict[str, str]:
    """Name -> kind ("reward" / "diversity") of every registered builder that lists weight sources."""
    import rewards

    names = {n: "reward" for n, b in rewards.REWARDS.items() if hasattr(b, "sources")}
    names.update({n: "diversity" for n, b in rewards.DIVERSITY_METRICS.items() if hasattr(b, "sources") and n not in names})
    return names


def weights_list() -> int:
    import rewards
    from rewards import sources

    rows = []
    for name, kind in _with_weights().items():
        for src in rewards.sources_of(name, {}, kind):
            try:
                status = f"found: {sources.resolve(src)}"
            except sources.MissingWeightsError:
                status = "missing"
            rows.append([name, src.key, src.spec, status])
    print(columns(["name", "key", "spec", "status"], rows))
    return 0


def weights_fetch(names: list[str]) -> int:
    import rewards
    from rewards import sources

    known = _with_weights()
    for name in names:
        if name not in known:
            raise UserError(f"weights fetch {name}: not a reward or diversity metric with weights; choose from {', '.join(known)}")
    for name in names:
        for src in rewards.sources_of(name, {}, known[name]):
            try:
                path = sources.fetch(src)
            except Exception as err:  # noqa: BLE001  (no network, hub errors, bad URLs)
                raise UserError(f"weights fetch {name}: cannot download {src.spec} ({first_line(err)})") from None
            print(f"{name} {src.key}: {path}")
    return 0
