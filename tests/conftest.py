import pytest

from pallas_kernels._core import device

HAS_GPU = device.current_target().is_gpu

# Every kernel test runs once per backend mode: the plain-JAX reference path, the Pallas
# kernel in interpret mode on CPU, and the compiled kernel on a GPU (skipped, visibly,
# without one). (impl, interpret)
IMPL_MODES = [
    pytest.param(("xla", False), id="xla"),
    pytest.param(("triton", True), id="triton-interpret"),
    pytest.param(("triton", False), id="triton-gpu",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")]),
]


@pytest.fixture(params=IMPL_MODES)
def impl_mode(request):
  return request.param


@pytest.fixture(params=IMPL_MODES[1:])
def kernel_mode(request):
  """Only the Pallas paths: for tests of kernel-specific behaviour (block edges, configs)."""
  return request.param
