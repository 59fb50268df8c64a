"""The base of every config section: unknown keys are errors, assignments are validated, floats are finite."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Strict(BaseModel):
    # allow_inf_nan=False: a .inf or .nan (YAML or override) in any float field -- nested, optional, in a
    # list, tuple or dict -- is refused here, naming the field, instead of surfacing as a NaN loss in a worker.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Seeds (train.seed, data.eval_seeds, sweep.seed): 0 <= seed < 2**32. rayjobs/data/batches.py mix_seed keeps
# the low 32 bits of the base seed (larger seeds would repeat smaller ones' draws); class images seed
# torch.Generator with train.seed * 1_000_003 + i, which must stay below 2**64; the sweep's seed goes to
# numpy RandomState (Tune's generator, Optuna's sampler), which takes 0 .. 2**32 - 1 only.
SEED_LIMIT = 2**32
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]


def _not_only_dots(name: str | None) -> str | None:
    # '.' and '..' match the name pattern but are run.output_dir itself and its parent, not a new directory.
    if name is not None and set(name) == {"."}:
        raise ValueError("dots alone are no directory name ('.' and '..' are run.output_dir itself and its parent); "
                         "include a letter, digit, '_' or '-'")
    return name


NAME_PATTERN = r"^[A-Za-z0-9._-]+$"
# A directory name under run.output_dir: letters, digits and ._- (the pattern), and not dots alone.
DirName = Annotated[str, Field(pattern=NAME_PATTERN), AfterValidator(_not_only_dots)]
