"""Group-wise asymmetric integer quantisation of K/V (FlexGen's compression) and the `int4` cache.

A token's K (or V) row of one sequence, kv_dim = Hkv * D elements, is cut into groups of
`quant_group` (64) contiguous elements; each group keeps an fp16 scale and zero point (its min) and
`quant_bits`-bit codes packed 8 / bits to a byte. The host holds only codes, scales and zeros; the
new token's row is quantised on the device before its D2H, and fetched rows are dequantised on the
device before attention (spec.policies.stored_bytes_per_token counts exactly these bytes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from infinigen_sim.spec.ops import Op
from profiler.runtime.kv_cache import OffloadedCache, Planes, RowSpec
from profiler.runtime.transfer import FetchResult


def n_groups(n: int, group: int) -> int:
    return -(-n // group)


def quantize(x: Tensor, bits: int = 4, group: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """x (..., n) -> codes (..., n_pad * bits / 8) uint8, scale and zero (..., n_groups) fp16.

    Rows are padded to whole groups; scale = (max - min) / (2^bits - 1) and zero = min are rounded
    to fp16 first and the codes computed against the rounded values, so that
    |x - dequantize(...)| <= scale / 2 up to fp16 rounding of scale and zero.
    """
    n = x.shape[-1]
    lead, G = x.shape[:-1], n_groups(n, group)
    xg = F.pad(x.float(), (0, G * group - n)).view(*lead, G, group)  # (..., G, group)
    levels = 2**bits - 1
    lo, hi = xg.amin(-1), xg.amax(-1)
    scale = ((hi - lo) / levels).clamp_min(1e-6).to(torch.float16)
    zero = lo.to(torch.float16)
    codes = ((xg - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).round().clamp_(0, levels)
    per_byte = 8 // bits
    codes = codes.to(torch.uint8).view(*lead, G * group // per_byte, per_byte)
    shifts = torch.arange(0, 8, bits, device=x.device, dtype=torch.uint8)  # (per_byte,)
    packed = (codes << shifts).sum(-1, dtype=torch.uint8)  # disjoint bit fields: sum == or
    return packed, scale, zero


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, n: int, bits: int = 4, group: int = 64,
               dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
    """Inverse of `quantize`: (..., n) in `dtype`, written into `out` (..., n) when given."""
    lead, G = codes.shape[:-1], scale.shape[-1]
    dtype = out.dtype if out is not None else dtype
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
    unpacked = (codes.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., bytes, per_byte)
    values = unpacked.reshape(*lead, G, group).to(dtype)
    zero, scale = zero.to(dtype).unsqueeze(-1), scale.to(dtype).unsqueeze(-1)  # (..., G, 1)
    if out is not None and G * group == n:
        return torch.addcmul(zero, values, scale, out=out.view(*lead, G, group)).view(*lead, n)
    x = torch.addcmul(zero, values, scale).reshape(*lead, G * group)[..., :n]  # zero + code * scale
    return x if out is None else out.copy_(x)


class QuantizedCache(OffloadedCache):
    """`int4`: flexgen with group-wise quantised K/V in host memory, dequantised on the device."""

    def _row_specs(self, batch: int) -> list[RowSpec]:
        p = self.policy
        kv_dim, G = self.spec.kv_dim, n_groups(self.spec.kv_dim, p.quant_group)
        code_bytes = G * p.quant_group * p.quant_bits // 8
        one = [((batch, code_bytes), torch.uint8), ((batch, G), torch.float16), ((batch, G), torch.float16)]
        assert kv_dim <= G * p.quant_group
        return one + one  # K's codes, scale, zero, then V's

    def allocate_device(self, batch: int, max_rows: int, prompt_len: int) -> None:
        super().allocate_device(batch, max_rows, prompt_len)
        kv = super()._row_specs(batch)
        # dequantised rows, double-buffered like the fetched codes (+1 row for the new token)
        self.kv_bufs = [Planes.allocate(self.host_rows + 1, kv, self.rt.device) for _ in range(2)]

    def _encode(self, layer: int, k_rows: Tensor, v_rows: Tensor) -> tuple[Tensor, ...]:
        p = self.policy
        with self.timer.span(Op.QUANTIZE, layer):
            m, B = k_rows.shape[:2]
            k_q = quantize(k_rows.reshape(m, B, -1), p.quant_bits, p.quant_group)  # (m, B, kv_dim)
            v_q = quantize(v_rows.reshape(m, B, -1), p.quant_bits, p.quant_group)
        return (*k_q, *v_q)

    def _decode(self, layer: int, fetched: FetchResult) -> tuple[Tensor, Tensor]:
        p, n = self.policy, fetched.rows
        out = self.kv_bufs[layer % 2].t
        with self.timer.span(Op.DEQUANTIZE, layer):
            for dst, (codes, scale, zero) in zip(out, (fetched.planes[:3], fetched.planes[3:]), strict=True):
                B = codes.shape[1]
                dequantize(codes[:n], scale[:n], zero[:n], self.spec.kv_dim, p.quant_bits, p.quant_group,
                           out=dst[:n].view(n, B, -1))  # (n, B, Hkv, D) viewed as (n, B, kv_dim)
        return out
