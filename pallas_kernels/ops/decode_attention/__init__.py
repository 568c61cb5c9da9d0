"""Decode attention (flash-decoding): one new token per sequence over its KV cache."""

from pallas_kernels.ops.decode_attention.api import decode_attention as decode_attention
from pallas_kernels.ops.decode_attention.config import (
    DecodeAttentionConfig as DecodeAttentionConfig)
