"""Paged decode attention: one new token per sequence over KV pages named by a block table."""

from pallas_kernels.ops.paged_attention.api import paged_attention as paged_attention
from pallas_kernels.ops.paged_attention.config import (
    PagedAttentionConfig as PagedAttentionConfig)
