import pytest

from pallas_kernels import selfcheck


@pytest.mark.slow
def test_selfcheck_passes_and_covers_every_op(capsys):
  assert selfcheck.main([]) == 0
  out = capsys.readouterr().out
  for op in ("attention", "decode_attention", "paged_attention", "matmul", "gated_matmul",
             "rms_norm", "layer_norm"):
    assert f"\n{op} " in out
  assert f"{4 * len(selfcheck.CHECKS)} passed, 0 failed" in out
