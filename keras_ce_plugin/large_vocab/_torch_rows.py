"""Gradient in the forward pass on torch, one token chunk's whole logits row at a time.

The torch backend's ``strategy="in_forward"`` (Liger Kernel's way): per token chunk,
one matmul gives the ``(tn, V)`` logits into a buffer that the chunk's elementwise
work overwrites in place (log-sum-exp, softmax, its gradient), then one matmul gives
the hidden gradient and one ``addmm_`` adds the kernel gradient in place (a GEMM
that accumulates into the ``d x V`` buffer: no block is materialised). Three matmul
passes, as the naive loss, nothing recomputed, and each elementwise step is one
threaded torch kernel over the buffer rather than a chain of eager ops, each
allocating its result, which is what the recomputing pass costs on torch.

Used where :func:`supported` holds: float32 matmuls and no gradient filtering
(whose blocks this pass does not have); other settings take the generic pass.
"""

from __future__ import annotations

from typing import Any

import torch

from keras_ce_plugin.large_vocab._chunked import _finish, _Rows, _Spec, _unsort
from keras_ce_plugin.large_vocab._sizes import Held


def supported(spec: _Spec) -> bool:
    """Whether this pass computes the loss with these settings."""
    return spec.mm_dtype == "float32" and not spec.filter_eps


def worth_it(spec: _Spec, tokens: int | None) -> bool:
    """Whether ``strategy=None`` should take this pass: always (its in-place ``addmm_``
    re-reads the kernel gradient at no extra pass, whatever the chunk size)."""
    return True


def grad_enabled() -> bool:
    """Whether a backward pass may follow (not under ``torch.no_grad``)."""
    return torch.is_grad_enabled()


def held(capped: bool) -> Held:
    """What this pass holds per token chunk (``_sizes``): the logits row (overwritten
    in place by its gradient) and, with a soft cap, its derivative; no blocks (its
    GEMM adds the kernel gradient in place), so that re-reading the kernel gradient
    once per token chunk costs little and the rows get half the budget of the other
    row passes."""
    return Held(row_buffers=2 if capped else 1, kernel_blocks=0, row_blocks=0, budget_factor=2)


def _logits(h: Any, kernel: Any, bias: Any, spec: _Spec, out: Any) -> Any:
    """Pre-cap logits of one token chunk into ``out`` (``(tn, V)`` float32)."""
    torch.matmul(h, kernel.T if spec.transpose else kernel, out=out)
    if bias is not None:
        out.add_(bias)
    return out


def _capped(z: Any, cap: float, keep: Any) -> Any:
    """``cap * tanh(z / cap)`` in place; ``keep`` receives ``1 - tanh**2`` (the cap's
    derivative, needed by the gradient once ``z`` is overwritten)."""
    torch.div(z, cap, out=keep).tanh_()
    torch.mul(keep, cap, out=z)
    keep.square_().neg_().add_(1.0)
    return z


@torch.no_grad()
def grads_in_forward(rows: _Rows, kernel: Any, bias: Any, spec: _Spec, kernel_grad: bool):
    """As ``_chunked._grads(..., fused=True)``: ``(dh, dk, db, loss_b, lse_b, amax_b)``,
    the gradients of ``sum(u * loss)`` and the per-row loss, log-sum-exp and argmax."""
    kernel = kernel.detach().float()  # no copy when float32
    bias = None if bias is None else bias.detach().float()
    dev = kernel.device
    tn, total = spec.tn, rows.n_pad // spec.tn
    n_chunks = int(rows.n_chunks)
    vocab, keep_s = spec.vocab, 1.0 - spec.smoothing
    dh = torch.zeros(rows.n_pad, spec.dim, device=dev)
    dk = torch.zeros(tuple(kernel.shape), device=dev) if kernel_grad else None
    db = torch.zeros(vocab, device=dev) if bias is not None and kernel_grad else None
    loss_b, lse_b = torch.zeros(total, tn, device=dev), torch.zeros(total, tn, device=dev)
    amax_b = torch.zeros(total, tn, dtype=torch.int32, device=dev)
    buf = torch.empty(tn, vocab, device=dev)
    keep = torch.empty(tn, vocab, device=dev) if spec.cap is not None else None
    arange = torch.arange(tn, device=dev)
    for i in range(n_chunks):
        sl = slice(i * tn, (i + 1) * tn)
        h, lab, u = rows.h[sl].float(), rows.lab[sl].long(), rows.u[sl]
        s = _logits(h, kernel, bias, spec, buf)
        if spec.cap is not None:
            s = _capped(s, spec.cap, keep)
        tgt = s[arange, lab]
        ssum = s.sum(dim=1) if spec.smoothing else None
        m, amax = s.max(dim=1)
        p = s.sub_(m[:, None]).exp_()  # unnormalised softmax, in place
        norm = p.sum(dim=1)
        loss, lse, _ = _finish((m, norm, tgt, ssum, amax), spec)  # as the chunked passes
        scale = u / norm  # softmax times the token's weight, in one pass
        if spec.zloss:
            scale = scale * (1.0 + 2.0 * spec.zloss * lse)
        g = p.mul_(scale[:, None])
        g[arange, lab] -= keep_s * u
        if spec.smoothing:
            g.sub_((u * (spec.smoothing / vocab))[:, None])
        if keep is not None:
            g.mul_(keep)
        torch.matmul(g, kernel if spec.transpose else kernel.T, out=dh[sl])
        if dk is not None:
            if spec.transpose:
                dk.addmm_(g.T, h)
            else:
                dk.addmm_(h.T, g)
        if db is not None:
            db.add_(g.sum(dim=0))
        loss_b[i], lse_b[i], amax_b[i] = loss, lse, amax.int()
    return _unsort(rows, dh), dk, db, loss_b, lse_b, amax_b
