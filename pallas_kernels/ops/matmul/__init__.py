"""Matmul with fused epilogue (bias, activation, residual) and the gated SwiGLU/GeGLU matmul:
Triton kernels (Ampere and Hopper), a warp-specialised Mosaic GPU kernel (Hopper), the reference."""

from pallas_kernels.ops.matmul.api import gated_matmul as gated_matmul
from pallas_kernels.ops.matmul.api import matmul as matmul
from pallas_kernels.ops.matmul.config import MatmulConfig as MatmulConfig
from pallas_kernels.ops.matmul.mosaic import MosaicMatmulConfig as MosaicMatmulConfig
