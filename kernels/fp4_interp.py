"""Make Triton's CPU interpreter decode NVFP4 (E4M3) ``tl.dot_scaled`` scales.

Triton 3.8's interpreter (``triton.runtime.interpreter._prepare_dot_scaled_operand``) decodes every
``dot_scaled`` scale as E8M0 (``2^(byte - 127)``), whatever its type, so a kernel with
float8e4nv block scales (NVFP4) computes garbage under ``TRITON_INTERPRET=1`` while the compiled
kernel is right. :func:`install` wraps that function: scales of type float8e4nv are decoded as
E4M3 (through the interpreter's own FP8 decoder) and multiplied in the way the original multiplies
E8M0 scales; every other case is passed through unchanged. Only the interpreter is touched (the
compiled path never calls it); installing twice is a no-op.
"""

from __future__ import annotations

import functools


def install() -> bool:
    """Patch the interpreter once; False when this Triton has no such function (nothing to fix)."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return False
    orig = getattr(interp, "_prepare_dot_scaled_operand", None)
    if orig is None or not hasattr(interp, "_mxfp_value_handle_to_float32"):
        return False
    if getattr(orig, "_diffq_e4m3", False):
        return True

    @functools.wraps(orig)
    def prepare(value_handle, scale_handle, format_enum, k_pack, is_rhs):
        if scale_handle is None or scale_handle.dtype != tl.float8e4nv:
            return orig(value_handle, scale_handle, format_enum, k_pack, is_rhs)
        value = orig(value_handle, None, format_enum, k_pack, is_rhs)
        scale = interp._mxfp_value_handle_to_float32(scale_handle).astype(np.float32)
        if is_rhs:  # rhs values are [K, N], its scales [N, K / block]
            scale = np.swapaxes(np.repeat(scale, value.shape[-2] // scale.shape[-1], axis=-1), -1, -2)
        else:
            scale = np.repeat(scale, value.shape[-1] // scale.shape[-1], axis=-1)
        return value * scale

    prepare._diffq_e4m3 = True
    interp._prepare_dot_scaled_operand = prepare
    return True
