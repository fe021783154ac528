"""The trial engine: one trial from a frozen TrialConfig to final metrics (DDP, mixed precision, resume).

It imports the model (`hisf.model`), never the reverse, and treats every method alike.
"""

from hisf.engine.step import (LOSS_TERMS, NanGuard, NonFiniteLossError, Precision, StepResult, compile_losses,
                              compile_stats, deterministic_mode, loss_terms, release_compiled, resolve_precision,
                              seed_everything, train_step)
from hisf.engine.callbacks import GroupCallback, StopTrial, TrialCallback
from hisf.engine.trial import INPUT_ERRORS, run_group, run_trial

__all__ = ["GroupCallback", "INPUT_ERRORS", "LOSS_TERMS", "NanGuard", "NonFiniteLossError", "Precision", "StepResult", "StopTrial", "TrialCallback",
           "compile_losses", "compile_stats", "deterministic_mode", "loss_terms", "release_compiled", "resolve_precision",
           "run_group", "run_trial", "seed_everything", "train_step"]
