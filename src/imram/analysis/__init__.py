"""The paper's analyses (``imram analyze``): matching steps K (Table 4), memory aggregators
(Table 5), attention maps per step (Figure 3), salient words per step (Table 6) and what
MEMBER's memory banks hold (``banks``).

Each writes one output folder with a ``report.md`` (tables, PNG figures, what was run); the
sweeps train through the ordinary resumable runs of :func:`imram.training.trainer.train`.
"""

from imram.analysis.aggregators import run_aggregators
from imram.analysis.attention_maps import attention_maps
from imram.analysis.banks import bank_analysis
from imram.analysis.salient import salient_analysis
from imram.analysis.steps import run_steps

__all__ = ["attention_maps", "bank_analysis", "run_aggregators", "run_steps", "salient_analysis"]
