"""``hdopt.report``: the talk's claims run on this machine, written up as one HTML page.

Each section composes a part of the library (:mod:`hdopt.dynamics`, :mod:`hdopt.distributed`,
:mod:`hdopt.finetune`, :mod:`hdopt.tint`) at a chosen scale and states, for each claim, the paper's number,
ours, a verdict and the command that reproduces it.
"""

from hdopt.report.claims import Claim, Section, Table
from hdopt.report.context import Context
from hdopt.report.runner import SECTION_KEYS, build_report
from hdopt.report.scales import SCALES, Budget, budget

__all__ = [
    "SCALES",
    "SECTION_KEYS",
    "Budget",
    "Claim",
    "Context",
    "Section",
    "Table",
    "budget",
    "build_report",
]
