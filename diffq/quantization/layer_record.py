"""One quantized layer as a record: its manifest entry (kind, geometry, formats, compute dtype) and
the way back from that entry plus its buffers to a QuantLinear / QuantConv2d.

Shared by ``diffq.save``/``diffq.load`` (:mod:`diffq.checkpoint`) and diffusers' ``save_pretrained`` /
``from_pretrained`` (:mod:`diffq.quantization.diffusers_backend`). Meta buffers give a shape-only
layer (a model skeleton that weights are loaded into).
"""

from __future__ import annotations

import torch

from diffq.errors import CheckpointError, DiffqError
from diffq.formats import QTensor, QuantSpec, decode_scale, unpack_bits
from diffq.modules import ActQuantizer, QuantConv2d, QuantLinear, ShiftedActQuantizer


def layer_info(m: QuantLinear | QuantConv2d) -> dict:
    """A quantized layer's manifest entry without its tensors: kind, geometry, formats, compute dtype."""
    info = {
        "kind": "conv" if isinstance(m, QuantConv2d) else "linear",
        "in_features": m.in_features,
        "out_features": m.out_features,
        "weight": m.wspec.to_dict(),
        "dtype": str(m.compute_dtype).replace("torch.", ""),
        "act": None,
    }
    if isinstance(m, QuantConv2d):
        info.update(kernel_size=list(m.kernel_size), stride=list(m.stride), dilation=list(m.dilation),
                    padding=m.padding if isinstance(m.padding, str) else list(m.padding))
    if m.act is not None:
        info["act"] = {
            "spec": m.act.spec.to_dict(),
            "splits": list(m.act.splits) if m.act.splits else None,
            "static": m.act.static,
        }
        if m.act.center:
            info["act"]["center"] = True
    return info


def rebuild_layer(info: dict, buf: dict[str, torch.Tensor]) -> QuantLinear | QuantConv2d:
    """The quantized layer a manifest entry and its buffers describe (meta buffers: a shape-only skeleton)."""
    try:
        wspec = QuantSpec.from_dict(info["weight"])
        n, k_in = info["out_features"], info["in_features"]
        ksz = info.get("kernel_size", [1, 1])
        k = k_in * ksz[0] * ksz[1]
        codes = (unpack_bits(buf["qweight"], wspec.bits, signed=wspec.is_int and wspec.symmetric)
                 if wspec.packed else buf["qweight"])
        if tuple(codes.shape) != (n, k):
            raise CheckpointError(f"weight codes have shape {tuple(codes.shape)}, expected {(n, k)}")
        gscale = buf.get("wscale_global")
        zero = buf.get("wzero")
        q = QTensor(
            codes=codes, scale=decode_scale(buf["wscale"], wspec, gscale), spec=wspec, shape=torch.Size((n, k)),
            zero=None if zero is None else zero.float(), scale_stored=buf["wscale"], global_scale=gscale,
        )
        act = None
        if info.get("act"):
            a = info["act"]
            kw = {"splits": tuple(a["splits"]) if a["splits"] else None, "amax": buf.get("act.amax"),
                  "bucket_to_group": buf.get("act.bucket_to_group"), "center": bool(a.get("center", False))}
            aspec = QuantSpec.from_dict(a["spec"])
            shift = buf.get("act.shift")  # act_unsigned: Q(x + c) - c after a GELU/SiLU
            if shift is not None and tuple(shift.shape) != (k_in,):
                raise CheckpointError(f"activation shift has shape {tuple(shift.shape)}, expected ({k_in},)")
            act = ActQuantizer(aspec, **kw) if shift is None else ShiftedActQuantizer(aspec, shift, **kw)
        dtype = getattr(torch, str(info["dtype"]), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise CheckpointError(f"layer compute dtype {info['dtype']!r} is not a floating-point torch dtype")
        common = {"bias": buf.get("bias"), "act": act, "lr_down": buf.get("lr_down"),
                  "lr_up": buf.get("lr_up"), "smooth": buf.get("smooth"), "dtype": dtype}
        if info["kind"] == "conv":
            pad = info["padding"]
            return QuantConv2d(q, in_channels=k_in, kernel_size=tuple(ksz), stride=tuple(info["stride"]),
                               padding=pad if isinstance(pad, str) else tuple(pad),
                               dilation=tuple(info["dilation"]), **common)
        return QuantLinear(q, **common)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        if isinstance(e, DiffqError):
            raise
        raise CheckpointError(f"checkpoint layer cannot be rebuilt ({type(e).__name__}: {e}); re-save it") from e
