"""Argument checks whose errors name the argument, what was expected and what came."""

from __future__ import annotations

from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _dtype_names(dtypes: Iterable) -> str:
  return ", ".join(jnp.dtype(d).name for d in dtypes)


def array(op: str, name: str, x, *, ndim: int | tuple[int, ...] | None = None,
          dtypes: Iterable | None = FLOAT_DTYPES, layout: str | None = None) -> None:
  """Check that `x` is an array of the given rank and dtype."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{op}: `{name}` expected an array, got {type(x).__name__}")
  ranks = (ndim,) if isinstance(ndim, int) else ndim
  if ranks is not None and x.ndim not in ranks:
    want = " or ".join(str(r) for r in ranks)
    where = f" {layout}" if layout else ""
    raise ValueError(f"{op}: `{name}` expected rank {want}{where}, got shape {tuple(x.shape)}")
  if dtypes is not None:
    dtypes = tuple(dtypes)
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in dtypes]:
      raise TypeError(f"{op}: `{name}` expected dtype in ({_dtype_names(dtypes)}), got {x.dtype}")


def same_dtype(op: str, names: tuple[str, ...], arrays: tuple) -> None:
  dtypes = {jnp.dtype(a.dtype) for a in arrays if a is not None}
  if len(dtypes) > 1:
    got = ", ".join(f"{n}={a.dtype}" for n, a in zip(names, arrays) if a is not None)
    raise TypeError(f"{op}: {', '.join(f'`{n}`' for n in names)} expected one dtype, got {got}")


def dim(op: str, name: str, x, axis: int, expected: int, what: str) -> None:
  """Check `x.shape[axis] == expected`; `what` says where the expectation comes from."""
  if x.shape[axis] != expected:
    raise ValueError(f"{op}: `{name}` expected {what} = {expected} at axis {axis}, "
                     f"got shape {tuple(x.shape)}")


def shape(op: str, name: str, x, expected: tuple[int, ...], what: str = "") -> None:
  if tuple(x.shape) != tuple(expected):
    note = f" ({what})" if what else ""
    raise ValueError(f"{op}: `{name}` expected shape {tuple(expected)}{note}, "
                     f"got {tuple(x.shape)}")


def int_vector(op: str, name: str, x, length: int, what: str = "batch") -> None:
  """An int32 `[length]` array such as `lengths` or `q_offset`."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{op}: `{name}` expected an int32 array of shape ({length},), "
                    f"got {type(x).__name__}")
  if jnp.dtype(x.dtype) != jnp.int32:
    raise TypeError(f"{op}: `{name}` expected dtype int32, got {x.dtype}")
  if tuple(x.shape) != (length,):
    raise ValueError(f"{op}: `{name}` expected shape ({length},) [{what}], got {tuple(x.shape)}")


def positive_int(op: str, name: str, value, *, allow_none: bool = True) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{op}: `{name}` expected a positive int{' or None' if allow_none else ''}, "
                     f"got {value!r}")


def positive_float(op: str, name: str, value, *, allow_none: bool = True) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not value > 0:
    raise ValueError(f"{op}: `{name}` expected a positive float{' or None' if allow_none else ''}, "
                     f"got {value!r}")


def config_type(op: str, config, cls: type | tuple[type, ...], name: str = "config") -> None:
  """An explicit kernel config must be one of the op's config classes (or None: resolved
  later)."""
  classes = cls if isinstance(cls, tuple) else (cls,)
  if config is not None and not isinstance(config, classes):
    expected = " or ".join(c.__name__ for c in classes)
    raise TypeError(f"{op}: `{name}` expected {expected} or None, "
                    f"got {type(config).__name__}")


def decode_options(op: str, scale, sliding_window, logit_softcap) -> None:
  """The scalar options every decode-attention op shares."""
  positive_float(op, "scale", scale)
  positive_int(op, "sliding_window", sliding_window)
  positive_float(op, "logit_softcap", logit_softcap)


def choice(op: str, name: str, value, options: tuple) -> None:
  if value not in options:
    raise ValueError(f"{op}: `{name}` expected one of {options}, got {value!r}")
