"""The Align paper's alignment probe (Boopathy & Fiete 2022).

The rules themselves (``align-zero``, ``align-ada``, ``align-prop``, ``last-layer``) live in
:mod:`decorrelate.rules.align`; the alignment score in :mod:`decorrelate.metrics`; the NTK
models and the vanilla RNN (``rnn-ntk``) in :mod:`decorrelate.models`; the recurrent Add task
is the data set ``add-task`` (:mod:`decorrelate.data.addtask`); the paper's experiments are
:mod:`decorrelate.experiments.papers.boopathy2022` (``decorrelate reproduce boopathy2022``).
Here: :class:`AlignmentProbe` — backprop that logs the alignment score of its own weight change
(``alignment_score: true``).
"""

from ..rules import align as _rules  # noqa: F401  (registers the align rules by name)
from ..rules.probe import AlignmentProbe

__all__ = ["AlignmentProbe"]
