"""The settings every short test run starts from, in one place: the embedded toy model with 3 sampler steps,
one evaluation prompt and two seeds. Modules add what their assertions need (``[*SHORT, "train.batch_size=2"]``).

FAST is the 1-prompt DRaFT+ run of the Ray tests (K = 2, no evaluation between steps).
"""

SHORT = ["sampler.steps=3", "data.eval_prompts=[a red circle]", "data.eval_seeds=[0,1]"]
FAST = [*SHORT, "sampler.truncation_steps=2", "train.batch_size=1", "train.eval_every=0"]
