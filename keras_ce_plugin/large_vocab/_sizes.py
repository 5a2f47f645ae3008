"""Chunk sizes chosen from a memory budget and the shapes: :func:`chunk_sizes`.

One token chunk of ``tn`` rows against one vocabulary chunk of ``tv`` columns holds,
in float32: the logits chunk and its gradient (``2 tn tv``), the kernel block as
the matmul reads it (``d tv``) and the token chunk's hidden rows, hidden gradient and
accumulator (``3 tn d``). Gradient-in-forward (``strategy="in_forward"``) keeps a
token chunk's whole logits row instead (``2 tn V``). The sizes are powers of two so
that every chunk but the last has one shape (one compiled elementwise kernel).
"""

from __future__ import annotations

import math

DEFAULT_TOKEN_CHUNK = 4096
DEFAULT_CHUNK_BUDGET_MIB = 64.0
MIN_TOKEN_CHUNK = 16
MIN_VOCAB_CHUNK = 256
PREFERRED_VOCAB_CHUNK = 1024  # the CPU sweep's width: tokens shrink before columns do
MAX_VOCAB_CHUNK = 16384

__all__ = ["DEFAULT_CHUNK_BUDGET_MIB", "chunk_sizes"]


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
    in_forward: bool = False,
) -> tuple[int, int]:
    """The ``(token_chunk_size, vocab_chunk_size)`` that ``linear_ce`` uses.

    Sizes given are kept; the others are the largest powers of two whose working
    memory (see the module) stays within ``chunk_budget_mib`` (default 64 MiB): up
    to 4096 tokens (all of ``tokens`` if fewer fit), as many as fit beside a
    1024-column chunk, then as many vocabulary columns as the rest of the budget
    holds (256 to 16,384, at most ``vocab``). Fewer tokens per batch thus get wider
    vocabulary chunks: fewer, larger matmuls.

    >>> chunk_sizes(4096, 512, 131072)
    (4096, 1024)
    >>> chunk_sizes(1024, 512, 131072)
    (1024, 4096)
    >>> chunk_sizes(4096, 512, 131072, chunk_budget_mib=16)
    (1024, 1024)
    """
    budget = (chunk_budget_mib or DEFAULT_CHUNK_BUDGET_MIB) * 2**20 / 4  # float32 elements
    cap = DEFAULT_TOKEN_CHUNK if tokens is None else max(1, min(DEFAULT_TOKEN_CHUNK, tokens))

    def need(tn: int, tv: int) -> int:
        if in_forward:  # the whole logits row of the token chunk is kept
            return 2 * tn * vocab + dim * tv + 3 * tn * dim
        return 2 * tn * tv + dim * tv + 3 * tn * dim

    tn = token_chunk_size
    if tn is None:
        tn = cap if cap < MIN_TOKEN_CHUNK else _pow2_floor(cap)
        fixed_tv = min(vocab, vocab_chunk_size or PREFERRED_VOCAB_CHUNK)
        while tn > MIN_TOKEN_CHUNK and need(tn, fixed_tv) > budget:
            tn //= 2
        if cap < DEFAULT_TOKEN_CHUNK and need(cap, fixed_tv) <= budget:
            tn = cap  # the whole batch in one chunk
    if tokens is not None:  # no chunk larger than the (static) number of tokens
        tn = max(1, min(tn, tokens))
    tv = vocab_chunk_size
    if tv is None:
        room = (budget - 3 * tn * dim - (2 * tn * vocab if in_forward else 0)) / (
            dim + (0 if in_forward else 2 * tn)
        )
        tv = max(MIN_VOCAB_CHUNK, min(MAX_VOCAB_CHUNK, _pow2_floor(room)))
    return int(tn), int(min(tv, vocab))
