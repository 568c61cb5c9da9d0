"""Matmul with fused epilogue (bias, activation, residual) and the gated SwiGLU/GeGLU matmul."""

from pallas_kernels.ops.matmul.api import gated_matmul as gated_matmul
from pallas_kernels.ops.matmul.api import matmul as matmul
from pallas_kernels.ops.matmul.config import MatmulConfig as MatmulConfig
