"""Pieces every op shares: dispatch, config resolution, argument checks, device facts."""

from pallas_kernels._core import compat as compat  # installs the deprecation-warning filter
