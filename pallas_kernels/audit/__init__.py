"""Offline GPU audit: every kernel, compiled for A100 (sm_80) and H100 (sm_90) without a GPU.

`python -m pallas_kernels.audit` takes each op's `audit=True` cases (`ops/<op>/specs.py`),
lowers the public op with `impl="triton"` for CUDA under an abstract mesh whose abstract
device is the target GPU (`targets.py`), pulls every Triton kernel out of the lowered module
(`lowering.py`), compiles it with the triton wheel (`compile.py`) and reports registers,
spills, shared memory, occupancy and tensor-core use, failing on spills, too much shared
memory, a `tt.dot` without tensor-core instructions, or a case that does not lower or compile
(`report.py`). Importing this package is cheap; the submodules import jax or triton.
"""
