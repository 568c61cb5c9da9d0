"""RMSNorm and LayerNorm over the last axis, optionally fused with the residual add."""

from pallas_kernels.ops.normalization.api import layer_norm as layer_norm
from pallas_kernels.ops.normalization.api import rms_norm as rms_norm
from pallas_kernels.ops.normalization.config import NormConfig as NormConfig
