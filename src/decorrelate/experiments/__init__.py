"""The one experiment layer: plans (lists of run configs over named axes), one runner, one report.

* :mod:`.plan` — :class:`Plan`, :class:`Run`, :func:`grid` (every combination of named axes);
* :mod:`.kinds` — what the runner needs to know about each sort of run (``train``, …);
* :mod:`.runner` — :func:`run_plan`: ``jobs`` worker processes, the one reuse check, resume;
* :mod:`.report` — mean ± std over seeds, markdown + CSV tables, claims tables;
* experiments built on them: :mod:`.compare` (``decorrelate compare``, the demo), :mod:`.specs`
  (benchmark specs), :mod:`.fixedpoint_sweep` (``decorrelate fixedpoint``'s learning-rate
  sweeps), :mod:`.papers` (``decorrelate reproduce PAPER``).

The shipped configuration files (``*.yaml``, ``--config NAME``) live in this folder too.
"""

from .plan import Plan, Run, axis_label, grid
from .report import Claim, Column, Finding, Table, group_results, mean_std, write_table
from .runner import Result, run_plan

__all__ = [
    "Claim",
    "Column",
    "Finding",
    "Plan",
    "Result",
    "Run",
    "Table",
    "axis_label",
    "grid",
    "group_results",
    "mean_std",
    "run_plan",
    "write_table",
]
