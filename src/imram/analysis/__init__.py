"""The paper's analyses (``imram analyze``): matching steps K (Table 4), memory aggregators
(Table 5), attention maps per step (Figure 3) and salient words per step (Table 6).

Each writes one output folder with a ``report.md`` (tables, PNG figures, what was run); the
sweeps train through the ordinary resumable runs of :func:`imram.training.trainer.train`.
"""

from imram.analysis.aggregators import run_aggregators
from imram.analysis.attention_maps import attention_maps
from imram.analysis.salient import salient_analysis
from imram.analysis.steps import run_steps

__all__ = ["attention_maps", "run_aggregators", "run_steps", "salient_analysis"]
