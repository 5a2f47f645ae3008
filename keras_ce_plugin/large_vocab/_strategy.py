"""Which pass computes the gradients of :func:`~.ops.fused_linear_ce_parts`.

``strategy="recompute"`` recomputes each logits chunk in the backward pass;
``"in_forward"`` computes the gradients in the forward pass, with the backend's own
pass where it has one that computes the settings (TensorFlow: ``_tf_rows``; torch:
``_torch_rows``) and with the generic chunked pass otherwise; ``None`` takes the
backend's own pass where it applies and recomputes elsewhere, and only computes the
forward pass where no gradient is being recorded. The choice fixes the chunk sizes (a
pass that keeps a token chunk's whole logits row says what it holds, ``held``), so it
is made before the spec is: :func:`choose` builds the spec with the sizes of the pass
chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import keras

from keras_ce_plugin.large_vocab._sizes import Held, static_rows

STRATEGIES = (None, "recompute", "in_forward")


class Choice(NamedTuple):
    in_forward: bool  # the gradients come from the forward pass
    native: Any  # the backend's own pass (a function), or None: the generic one
    prepared: tuple  # what ``prepare(held)`` returned for this choice


def check(strategy: Any) -> Any:
    if strategy not in STRATEGIES:
        raise ValueError(
            f"`strategy` must be 'recompute', 'in_forward' or None. Received: strategy={strategy!r}"
        )
    return strategy


def _own() -> Any:
    """The module of the backend's own gradient-in-forward pass, or None."""
    backend = keras.backend.backend()
    if backend == "torch":
        from keras_ce_plugin.large_vocab import _torch_rows

        return _torch_rows
    if backend == "tensorflow":
        from keras_ce_plugin.large_vocab import _tf_rows

        return _tf_rows
    return None


def choose(
    strategy: Any, prepare: Callable[[Held], tuple], keeps_rows: bool, capped: bool
) -> Choice:
    """The pass for ``strategy`` and the prepared inputs (their spec last).

    ``keeps_rows``: whether a gradient-in-forward pass would run at all (gradients
    wanted, and not a frozen head that the online pass serves). The backend's own pass
    says which settings it computes (``supported``) and, for ``strategy=None``, whether
    it beats recomputation at these chunk sizes (``worth_it``). ``prepare(held)``
    validates the inputs and sizes the chunks for a pass that holds ``held``; ``capped``:
    whether the logits are soft-capped (the backend's pass then keeps one more).
    """
    own = _own()
    if strategy is None and own is not None and not own.grad_enabled():
        return Choice(False, None, prepare(Held()))  # no backward pass (no tape, no_grad)
    in_forward = strategy == "in_forward" or (strategy is None and own is not None)
    if not (in_forward and keeps_rows):
        return Choice(in_forward, None, prepare(Held()))
    if own is not None:
        prepared = prepare(own.held(capped))
        spec = prepared[-1]
        if own.supported(spec) and (
            strategy == "in_forward" or own.worth_it(spec, static_rows(prepared[0]))
        ):
            return Choice(True, own.grads_in_forward, prepared)
        if strategy is None:  # the backend's pass does not compute these settings
            return Choice(False, None, prepare(Held()))
    return Choice(True, None, prepare(Held(row_buffers=2)))
