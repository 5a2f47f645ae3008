"""Chunk sizes chosen from a memory budget and the shapes: :func:`chunk_sizes`.

One token chunk of ``tn`` rows against one vocabulary chunk of ``tv`` columns holds,
in float32: the logits chunk and its gradient (``2 tn tv``), the kernel block as
the matmul reads it (``d tv``) and the token chunk's hidden rows, hidden gradient and
accumulator (``3 tn d``). Gradient-in-forward (``strategy="in_forward"``) keeps a
token chunk's whole logits row instead (:class:`Held`): ``row_buffers`` of ``tn V``
(2 in the generic pass, the logits and their gradient; 1 in the TensorFlow and torch
backends' own passes, which write the gradient over the logits, 2 with a soft cap),
beside ``kernel_blocks`` of ``d x tv`` (kernel-gradient blocks; TensorFlow's own pass:
2, one being added while the next is computed; torch's: none, its GEMM accumulates in
place) and ``row_blocks`` of ``tn x tv`` (copied out of the row for them), under a default
budget ``budget_factor`` times as large (4; torch's own pass 2): such a pass adds the
kernel gradient once per token chunk, re-reading the whole ``d x V`` buffer, so its
token chunks must not shrink to a few dozen rows. torch's in-place GEMM re-reads it
at little cost, so its rows can be half as long. The sizes are powers of two so that
every chunk but the last has one shape (one compiled elementwise kernel).
"""

from __future__ import annotations

import math
from typing import NamedTuple

DEFAULT_TOKEN_CHUNK = 4096
DEFAULT_CHUNK_BUDGET_MIB = 64.0
ROW_BUDGET_FACTOR = 4  # default budget of a pass that keeps whole logits rows
MIN_TOKEN_CHUNK = 16
MIN_VOCAB_CHUNK = 256
PREFERRED_VOCAB_CHUNK = 1024  # the CPU sweep's width: tokens shrink before columns do
MAX_VOCAB_CHUNK = 16384

__all__ = ["DEFAULT_CHUNK_BUDGET_MIB", "chunk_sizes"]


class Held(NamedTuple):
    """What a pass holds per token chunk beside its hidden rows, in float32 buffers:
    ``row_buffers`` of ``(tn, V)`` (0: a recomputing pass), ``kernel_blocks`` of
    ``d x tv`` and ``row_blocks`` of ``tn x tv``, under ``budget_factor`` times the
    default budget (see the module)."""

    row_buffers: int = 0
    kernel_blocks: int = 1
    row_blocks: int = 0
    budget_factor: int = ROW_BUDGET_FACTOR

    def sizes(self, tokens, dim, vocab, budget, tn, tv) -> tuple[int, int]:
        """:func:`chunk_sizes` for a pass that holds this."""
        return chunk_sizes(
            tokens,
            dim,
            vocab,
            chunk_budget_mib=budget,
            token_chunk_size=tn,
            vocab_chunk_size=tv,
            **self._asdict(),
        )


def static_rows(hidden) -> int | None:
    """The number of rows of ``hidden`` (all axes but the last), if static: the
    ``tokens`` that :func:`chunk_sizes` sizes for."""
    dims = tuple(hidden.shape[:-1])
    return None if None in dims else math.prod(dims)


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1.0)))))


def chunk_sizes(
    tokens: int | None,
    dim: int,
    vocab: int,
    *,
    chunk_budget_mib: float | None = None,
    token_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    row_buffers: int = 0,
    kernel_blocks: int = 1,
    row_blocks: int = 0,
    budget_factor: int = ROW_BUDGET_FACTOR,
) -> tuple[int, int]:
    """The ``(token_chunk_size, vocab_chunk_size)`` that ``linear_ce`` uses.

    Sizes given are kept; the others are the largest powers of two whose working
    memory (see the module) stays within ``chunk_budget_mib`` (default 64 MiB): up
    to 4096 tokens (all of ``tokens`` if fewer fit), as many as fit beside a
    1024-column chunk, then as many vocabulary columns as the rest of the budget
    holds (256 to 16,384, at most ``vocab``). Fewer tokens per batch thus get wider
    vocabulary chunks: fewer, larger matmuls. ``row_buffers`` is the number of
    ``(tokens chunk, V)`` buffers a gradient-in-forward pass keeps (0: recomputation);
    such a pass defaults to ``budget_factor`` times the budget (4: 256 MiB) and holds
    beside its rows ``kernel_blocks`` ``d x tv`` blocks and ``row_blocks`` ``tn x tv``
    ones (the module); its token chunks shrink only when not even 256 columns fit
    beside its rows (each halving of them means one more pass over the ``d x V``
    gradient), so it narrows its vocabulary chunk first:

    >>> chunk_sizes(1024, 512, 256000, row_buffers=1, kernel_blocks=2, row_blocks=2)
    (256, 512)
    >>> chunk_sizes(4096, 512, 131072)
    (4096, 1024)
    >>> chunk_sizes(1024, 512, 131072)
    (1024, 4096)
    >>> chunk_sizes(4096, 512, 131072, chunk_budget_mib=16)
    (1024, 1024)
    """
    held = Held(row_buffers, kernel_blocks, row_blocks, budget_factor) if row_buffers else Held()
    default = DEFAULT_CHUNK_BUDGET_MIB * (held.budget_factor if held.row_buffers else 1)
    budget = (chunk_budget_mib or default) * 2**20 / 4  # float32 elements
    cap = DEFAULT_TOKEN_CHUNK if tokens is None else max(1, min(DEFAULT_TOKEN_CHUNK, tokens))

    def per_column(tn: int) -> int:  # elements per vocabulary column of a chunk
        if held.row_buffers:  # the whole logits row of the token chunk is kept
            return held.kernel_blocks * dim + held.row_blocks * tn
        return 2 * tn + dim

    def need(tn: int, tv: int) -> int:
        return held.row_buffers * tn * vocab + per_column(tn) * tv + 3 * tn * dim

    tn = token_chunk_size
    if tn is None:
        tn = cap if cap < MIN_TOKEN_CHUNK else _pow2_floor(cap)
        narrowest = MIN_VOCAB_CHUNK if held.row_buffers else PREFERRED_VOCAB_CHUNK
        fixed_tv = min(vocab, vocab_chunk_size or narrowest)
        while tn > MIN_TOKEN_CHUNK and need(tn, fixed_tv) > budget:
            tn //= 2
        if cap < DEFAULT_TOKEN_CHUNK and need(cap, fixed_tv) <= budget:
            tn = cap  # the whole batch in one chunk
    if tokens is not None:  # no chunk larger than the (static) number of tokens
        tn = max(1, min(tn, tokens))
    tv = vocab_chunk_size
    if tv is None:
        room = (budget - need(tn, 0)) / max(1, per_column(tn))
        tv = max(MIN_VOCAB_CHUNK, min(MAX_VOCAB_CHUNK, _pow2_floor(room)))
    return int(tn), int(min(tv, vocab))
