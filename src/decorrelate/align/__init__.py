"""The Align paper's experiments (Boopathy & Fiete 2022): alignment probe, Add task, suites.

The rules themselves (``align-zero``, ``align-ada``, ``align-prop``, ``last-layer``) live in
:mod:`decorrelate.rules.align`; the alignment score in :mod:`decorrelate.metrics`; the NTK
models and the vanilla RNN in :mod:`decorrelate.models`. Here:

* :class:`AlignmentProbe` — backprop that logs the alignment score of its own weight change
  (it lives in :mod:`decorrelate.rules.probe`, beside the rules, so the training loop can use
  it without importing these experiments);
* the recurrent Add task (:func:`make_add_task`, :func:`add_targets`, :func:`train_add_task`);
* :func:`run_suite` — the named sweeps (``align-width``, ``align-width-conv``,
  ``align-lowdata``, ``align-rnn``; see :func:`suite_names`).
"""

from ..rules import align as _rules  # noqa: F401  (registers the align rules by name)
from ..rules.probe import AlignmentProbe
from .addtask import (
    AddTask,
    SequenceMSE,
    add_targets,
    build_rnn,
    make_add_task,
    shift,
    train_add_task,
)
from .suites import load_suite, run_suite, suite_names, train_classifier

__all__ = [
    "AddTask",
    "AlignmentProbe",
    "SequenceMSE",
    "add_targets",
    "build_rnn",
    "load_suite",
    "make_add_task",
    "run_suite",
    "shift",
    "suite_names",
    "train_add_task",
    "train_classifier",
]
