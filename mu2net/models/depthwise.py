"""Depthwise convolution for CPU training: a sum of strided slices with a hand-written backward.

The forward is ``k*k`` strided slices of the padded input times per-channel weights, which XLA
fuses into one loop (~8x faster on CPU than a grouped convolution). Its automatic backward is
not: the kernel gradient becomes ``k*k`` reductions over slices of the padded input, each
materialised on its own, and dominates the training step of the early, high-resolution blocks
(``benchmarks/roofline.py``). The backward here computes the same gradients with the cheap
shapes: the kernel gradient of tap ``(i, j)`` multiplies the whole padded input by the output
cotangent padded to an offset (no slice of the large operand), a stride-2 convolution is split
into its 2x2 input phases so every tap is a stride-1 shift, and the input gradient is the same
tap sum over the padded cotangent with the kernel flipped (per phase for a strided 5x5 conv).
The forward and therefore every prediction are bit-identical to the plain slice sum; gradients
agree to float32 rounding (``tests/test_models_efficientnet.py``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def out_size(size: int, kernel: int, stride: int) -> int:
    """Output length of a ``kernel``-wide window with symmetric padding ``kernel // 2``."""
    pad = kernel // 2
    return (size + 2 * pad - kernel) // stride + 1


def _pad(x: jax.Array, pad: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def slice_sum(xp: jax.Array, kernel: jax.Array, stride: int, ho: int, wo: int) -> jax.Array:
    """``sum_ij xp[:, s*o + i, s*u + j] * kernel[i, j]`` over the taps: the forward maths."""
    b, _, _, c = xp.shape
    out = None
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            tap = jax.lax.slice(
                xp,
                (0, i, j, 0),
                (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                (1, stride, stride, 1),
            )
            term = tap * kernel[i, j]
            out = term if out is None else out + term
    return out


def _shifted_products(xp: jax.Array, ct: jax.Array, kh: int, kw: int) -> jax.Array:
    """``d kernel[i, j] = sum xp[:, i:i+ho, j:j+wo] * ct`` (stride 1), by shifting ``ct``."""
    ho, wo = ct.shape[1], ct.shape[2]
    hp, wp = xp.shape[1], xp.shape[2]
    rows = []
    for i in range(kh):
        row = []
        for j in range(kw):
            shifted = jnp.pad(ct, ((0, 0), (i, hp - ho - i), (j, wp - wo - j), (0, 0)))
            row.append((xp * shifted).sum((0, 1, 2)))
        rows.append(jnp.stack(row))
    return jnp.stack(rows)


def _kernel_grad(xp: jax.Array, ct: jax.Array, k: int, stride: int) -> jax.Array:
    """Kernel gradient; stride 2 by the input's phases (tap ``2q + a`` reads phase ``a``)."""
    if stride == 1:
        return _shifted_products(xp, ct, k, k)
    grad = jnp.zeros((k, k, xp.shape[-1]), xp.dtype)
    for a in range(stride):
        for b in range(stride):
            phase = xp[:, a::stride, b::stride]
            taps = (k - a + stride - 1) // stride, (k - b + stride - 1) // stride
            # The taps of a phase read its first ho + taps - 1 rows (it may hold one more).
            need_h, need_w = ct.shape[1] + taps[0] - 1, ct.shape[2] + taps[1] - 1
            phase = phase[:, :need_h, :need_w]
            grad = grad.at[a::stride, b::stride].set(_shifted_products(phase, ct, *taps))
    return grad


def _phase_input_grad(x: jax.Array, kernel: jax.Array, ct: jax.Array, stride: int) -> jax.Array:
    """Input gradient of a strided conv, phase by phase.

    Per input phase a stride-1 flipped-kernel tap sum, then the phases interleaved back (one
    transpose).
    """
    k = kernel.shape[0]
    pad = k // 2
    b, h, w, c = x.shape
    hh, wh = -(-(h + 2 * pad) // stride), -(-(w + 2 * pad) // stride)
    ho, wo = ct.shape[1], ct.shape[2]
    rows = []
    for a in range(stride):
        row = []
        for bb in range(stride):
            sub = kernel[a::stride, bb::stride]
            th, tw = sub.shape[0], sub.shape[1]
            ctp = jnp.pad(ct, ((0, 0), (th - 1, hh - ho), (tw - 1, wh - wo), (0, 0)))
            row.append(slice_sum(ctp, sub[::-1, ::-1], 1, hh, wh))
        rows.append(jnp.stack(row))
    phases = jnp.transpose(jnp.stack(rows), (2, 3, 0, 4, 1, 5))
    full = phases.reshape(b, hh * stride, wh * stride, c)
    return full[:, pad : pad + h, pad : pad + w]


def _input_grad(x: jax.Array, kernel: jax.Array, ct: jax.Array, stride: int) -> jax.Array:
    """Input gradient, by the formulation measured fastest for the shape.

    Stride 1: the flipped-kernel tap sum over the padded cotangent. Stride 2 with a 5x5 kernel:
    by phases (~8x faster than XLA's transposed strided slices at 16x16x144); with a 3x3
    kernel XLA's own backward is slightly faster (2.0 vs 2.5 ms at 32x32x96). The barrier
    keeps XLA from fusing the result into the next layer's backward, which made the whole
    step slower (benchmarks/roofline.py).
    """
    k = kernel.shape[0]
    pad = k // 2
    if stride == 1:
        grad = slice_sum(_pad(ct, pad), kernel[::-1, ::-1], 1, x.shape[1], x.shape[2])
    elif k >= 5:
        grad = _phase_input_grad(x, kernel, ct, stride)
    else:
        _, vjp = jax.vjp(lambda z: padded_slice_sum(z, kernel, stride), x)
        grad = vjp(ct)[0]
    return jax.lax.optimization_barrier(grad)


def padded_slice_sum(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """The depthwise conv without bias: ``x`` padded by ``k // 2``, then :func:`slice_sum`.

    Differentiated by JAX this is the slow reference backward (tests, benchmarks).
    """
    k = kernel.shape[0]
    ho, wo = out_size(x.shape[1], k, stride), out_size(x.shape[2], k, stride)
    return slice_sum(_pad(x, k // 2), kernel, stride, ho, wo)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _depthwise(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int) -> jax.Array:
    return padded_slice_sum(x, kernel, stride) + bias


def _depthwise_fwd(x, kernel, bias, stride):
    return _depthwise(x, kernel, bias, stride), (x, kernel)


def _depthwise_bwd(stride, residuals, ct):
    x, kernel = residuals
    xp = _pad(x, kernel.shape[0] // 2)
    return (
        _input_grad(x, kernel, ct, stride),
        _kernel_grad(xp, ct, kernel.shape[0], stride),
        ct.sum((0, 1, 2)),
    )


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv(x: jax.Array, p: dict, stride: int) -> jax.Array:
    """Depthwise conv (``kernel [k, k, C]``, ``bias [C]``, symmetric padding ``k // 2``).

    Args:
        x: ``[B, H, W, C]`` activations.
        p: ``{"kernel": [k, k, C], "bias": [C]}``.
        stride: 1 or 2.
    """
    return _depthwise(x, p["kernel"], p["bias"], stride)
