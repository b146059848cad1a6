"""Training instrumentation: per-sample per-layer gradient norms, routing, DP, and the tracker."""

from .engine import EngineError as EngineError
from .engine import EngineResult as EngineResult
from .engine import GradNormEngine as GradNormEngine
from .engine import UnsupportedLayerError as UnsupportedLayerError
from .functional import per_sample_grad_norms as per_sample_grad_norms
