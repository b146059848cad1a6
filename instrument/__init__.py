"""Training instrumentation: per-sample per-layer gradient norms, routing, DP, and the tracker."""

from .dp import DPConfig as DPConfig
from .engine import EngineError as EngineError
from .engine import EngineResult as EngineResult
from .engine import GradNormEngine as GradNormEngine
from .engine import UnsupportedLayerError as UnsupportedLayerError
from .functional import per_sample_grad_norms as per_sample_grad_norms
from .policy import Policy as Policy
from .policy import PolicyError as PolicyError
from .policy import Rule as Rule
from .tracker import Tracker as Tracker
from .tracker import attach as attach
