"""Errors raised inside a Ray Train worker (docs/reliability.md, "Errors inside a worker"), without a cluster.

Which errors a retry would only repeat (not retried) and which it can get past (retried); the one line the user
sees, built from Ray Train's own error objects; and the bad LoRA targets that preflight refuses before Ray starts
(docs/errors.md, the third table: one test id per row).
"""

import pickle
import re
from pathlib import Path

import pytest
import ray.exceptions
import ray.train

# Ray Train's wrapper of a worker's exception and its report of a dead worker: internal classes, imported here
# only to build exactly what the controller hands over (rayjobs/cluster/worker.py reads them through .args).
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback, WorkerHealthCheckFailedError

from rayjobs.cli import main
from rayjobs.cluster.storage import StorageError
from rayjobs.cluster.worker import (
    DeterministicWorkerError,
    StopOnDeterministicError,
    config_field,
    is_deterministic,
    training_failure,
    worker_exception,
)
from rayjobs.errors import TrainingStopped, UserError

DOC = Path(__file__).parents[1] / "docs" / "errors.md"
PEFT = "Target modules {'nope'} not found in the base model. Please check the target modules and try again."


def raised(exc: BaseException) -> UserExceptionWithTraceback:
    """What a worker's poll reports when the training function raised ``exc``."""
    try:
        raise exc
    except BaseException as err:  # noqa: BLE001
        import traceback

        return UserExceptionWithTraceback(err, traceback_str=traceback.format_exc())


def killed() -> WorkerHealthCheckFailedError:
    """What a worker's poll reports when its process was SIGKILLed (an OOM kill, a lost node)."""
    return WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: Worker(rank=0)", failure=ray.exceptions.ActorDiedError())


def group_error(failures: dict) -> ray.train.WorkerGroupError:
    """The error ``fit`` raises once the retries are spent (pickled, as it crosses from the controller)."""
    return pickle.loads(pickle.dumps(ray.train.WorkerGroupError("[Rank 0 Error Snippet]: ...", failures)))


class PeftLike(ValueError):
    """A library's own subclass of ValueError (peft's NoMatchingPeftModuleError is one)."""


@pytest.mark.parametrize(
    "err", [ValueError("x"), TypeError("x"), KeyError("x"), IndexError("x"), AttributeError("x"), NotImplementedError("x"),
            ImportError("x"), UserError("perf.compile: x"), PeftLike(PEFT)],  # fmt: skip
)
def test_configuration_shape_and_type_errors_are_not_retried(err):
    assert is_deterministic(err)


@pytest.mark.parametrize(
    "err", [RuntimeError("NCCL error"), OSError(5, "Input/output error"), ConnectionResetError(), TimeoutError(),
            StorageError("upload failed 3 times"), MemoryError(), ray.exceptions.ActorDiedError(), killed()],  # fmt: skip
)
def test_what_a_retry_can_get_past_is_retried(err):
    assert not is_deterministic(worker_exception(err))


def test_a_model_that_is_missing_is_not_retried_although_an_oserror():
    from models.components import ModelNotFoundError

    assert isinstance(ModelNotFoundError("x"), OSError) and is_deterministic(ModelNotFoundError("model path '/m' does not exist: ..."))


def test_the_worker_exception_is_unwrapped_from_what_ray_reports():
    err = ValueError("bad")
    assert worker_exception(raised(err)) is err
    assert worker_exception(pickle.loads(pickle.dumps(raised(err)))).args == ("bad",)  # as it reaches the driver
    dead = killed()
    assert worker_exception(dead) is dead  # a dead worker has no exception of its own


def test_deterministic_error_names_type_message_and_field_in_one_line():
    """The defect: 'training failed (Training failed due to worker errors:) ...' and the advice to resume."""
    err = training_failure(group_error({0: raised(PeftLike(PEFT))}), max_failures=3)
    assert isinstance(err, UserError) and err.exit_code == 2
    text = str(err)
    assert text.startswith("trainable.lora_targets: training failed on worker rank 0 with PeftLike: Target modules {'nope'} not found"), text
    assert "not retried" in text and "fix trainable.lora_targets" in text
    assert "resume" not in text and "\n" not in text


def test_the_first_deterministic_rank_is_shown_beside_collateral_errors():
    failures = {0: raised(RuntimeError("Connection closed by peer")), 1: raised(KeyError("prompt")), 2: killed()}
    text = str(training_failure(group_error(failures), max_failures=0))
    assert "worker rank 1 with KeyError: 'prompt'" in text and "resume" not in text, text


def test_a_long_multiline_message_is_capped_to_one_line():
    err = training_failure(group_error({0: raised(TypeError("unexpected shapes\n" + "x" * 10_000))}), max_failures=1)
    text = str(err)
    assert "\n" not in text and len(text) < 500 and "TypeError: unexpected shapes" in text, text
    assert "training failed on worker rank 0" in text and text.startswith("training")  # no field known: none named


def test_a_user_error_inside_the_worker_is_shown_as_it_is():
    message = "perf.compile_mode: reduce-overhead (CUDA graphs) needs a CUDA device; this worker runs on cpu"
    err = training_failure(group_error({0: raised(UserError(message))}), max_failures=3)
    assert isinstance(err, UserError) and str(err) == message


def test_retries_spent_on_a_killed_worker_say_so_and_that_the_run_resumes():
    err = training_failure(group_error({0: killed()}), max_failures=3)
    assert isinstance(err, TrainingStopped)
    text = str(err)
    assert text.startswith("training failed after 4 attempts (ray.max_failures=3) on worker rank 0: WorkerHealthCheckFailedError: A worker health check failed.;"), text
    assert "start the same run.name to resume" in text and "\n" not in text


def test_a_failure_before_any_checkpoint_does_not_advise_resuming(tmp_path):
    """No checkpoint was written: the same run.name starts again from step 0, and the line says that instead of
    'resume' (there is nothing to resume). has_checkpoints reads the run's checkpoint folder."""
    from rayjobs.cluster.recovery import has_checkpoints

    text = str(training_failure(group_error({0: killed()}), max_failures=1, checkpointed=False))
    assert "no checkpoint was written yet: the same run.name starts again from step 0" in text and "resume" not in text
    assert not has_checkpoints(str(tmp_path / "none")) and not has_checkpoints(str(tmp_path))
    (tmp_path / "step_000001").mkdir()
    assert has_checkpoints(str(tmp_path))


def test_retries_spent_on_a_transient_worker_error_name_it():
    text = str(training_failure(group_error({0: raised(OSError(5, "Input/output error"))}), max_failures=0))
    assert text.startswith("training failed after 1 attempt (ray.max_failures=0) on worker rank 0: OSError: [Errno 5] Input/output error;"), text


def test_a_storage_error_keeps_its_own_message():
    reason = "checkpoint upload of step_000003 to /store/r/step_000003 failed 2 times (last: [Errno 28] No space left on device)"
    err = training_failure(group_error({0: raised(StorageError(reason))}), max_failures=0)
    assert isinstance(err, TrainingStopped) and str(err).startswith(reason + "; the checkpoints before it are kept")


def test_the_callback_stops_at_a_deterministic_error_only():
    callback = StopOnDeterministicError()
    callback.after_exception(None, {0: killed(), 1: raised(RuntimeError("gloo: connection reset"))})  # retried: no raise
    with pytest.raises(DeterministicWorkerError, match="training failed on worker rank 0 with ValueError: bad input") as info:
        callback.after_exception(None, {0: raised(ValueError("bad input")), 1: killed()})
    # Ray Train's controller wraps it in a ControllerError (not retried), pickled to the driver: the same line
    controller = pickle.loads(pickle.dumps(ray.train.ControllerError(info.value)))
    err = training_failure(controller, max_failures=3)
    assert isinstance(err, UserError) and str(err) == str(info.value)


@pytest.mark.parametrize(
    "message, field",
    [("perf.compile: x", "perf.compile"), ("config train.steps: Input should be ...", "train.steps"),
     ("reward.terms.0.kwargs: bad", "reward.terms.0.kwargs"), ("torch.cat(): shapes differ", None), (PEFT, "trainable.lora_targets"),
     ("Target module LayerNorm((32,), eps=1e-05) is not supported. Currently, only ...", "trainable.lora_targets"),
     ("model path '/m' does not exist: give a diffusers-layout directory", "model.name_or_path"), ("bad input", None)],  # fmt: skip
)
def test_the_config_field_an_error_names(message, field):
    assert config_field(ValueError(message)) == field


# ---- refused before Ray starts (docs/errors.md, the third table) ------------------------------------------

def _one_line(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("draftray: error: "), (code, err)
    return err


CASES = {
    "lora-targets-match-nothing": ("[to_q, to_qq, nope]", ["trainable.lora_targets", "'to_qq' (did you mean to_q?), 'nope' match no module"]),
    "lora-targets-not-adaptable": ("[to_q, norm1]", ["trainable.lora_targets", "'norm1' names GroupNorm, LayerNorm modules, which LoRA cannot adapt"]),
}


@pytest.mark.parametrize("model", ["toy", "tiny"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_targets_are_checked_before_ray_starts(capsys, tmp_path, case, model):
    targets, words = CASES[case]
    err = _one_line(capsys, ["train", f"run.output_dir={tmp_path / 'runs'}", "run.name=r", f"model.name_or_path={model}",
                             f"trainable.lora_targets={targets}"])  # fmt: skip
    assert all(w in err for w in words) and f"model {model}," in err, err
    assert not (tmp_path / "runs").exists()  # nothing written


# docs/errors.md's rows of the lines a failed run prints, and the tests above that check them
WORKER_ROWS = {
    "worker-error": test_deterministic_error_names_type_message_and_field_in_one_line,
    "worker-error-retried": test_retries_spent_on_a_killed_worker_say_so_and_that_the_run_resumes,
}


def test_every_case_is_documented():
    """docs/errors.md's third table has exactly these rows."""
    rows = re.findall(r"^\| `test_worker_errors\.py::([a-z0-9-]+)` \|", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert sorted(rows) == sorted([*CASES, *WORKER_ROWS])
