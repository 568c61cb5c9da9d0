"""Offline GPU audit: every kernel, compiled for A100 (sm_80) and H100 (sm_90) without a GPU.

`python -m pallas_kernels.audit` takes each op's `audit=True` cases (`ops/<op>/specs.py`),
lowers the public op with `impl="triton"` for CUDA under an abstract mesh whose abstract
device is the target GPU (`targets.py`), pulls every Triton kernel out of the lowered module
(`lowering.py`), compiles it with the triton wheel (`compile.py`) and reports registers,
spills, shared memory, occupancy and tensor-core use, failing on spills, too much shared
memory, a `tt.dot` without tensor-core instructions, or a case that does not lower or compile
(`report.py`).

Mosaic GPU kernels: for an op whose dispatch candidates include "mosaic"
(`registry.implementations`), its audit cases (backward ones included) that the
implementation's `refuses` accepts are lowered with `impl="mosaic"` for sm_90 too, and each
`mosaic_gpu_v2` custom call's payload (NVVM-level MLIR) is read (`mosaic.py`): grid, cluster,
threads, the launch's shared memory, wgmma, TMA, mbarrier and setmaxnreg ops. A row per kernel
(`report.MosaicRow`, its own table) fails on a lowering error, a forward case without a Mosaic
kernel, shared memory over the target's per-block limit, or no wgmma in an attention/matmul
kernel (`registry.WGMMA_EXPECTED`). Registers and spills read "n/a offline" (jaxlib compiles
the payload only in its CUDA plugin) and fail nothing. A Hopper-only implementation gets an
sm_80 row "not applicable: Hopper-only".

Importing this package is cheap; the submodules import jax or triton.
"""
