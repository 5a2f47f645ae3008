"""``a @ b.T`` on TensorFlow's CPU: ``MatMul(transpose_b=True)`` vs ``BatchMatMulV2(adj_y=True)``.

The large-vocabulary passes compute ``a @ b.T`` where ``b`` is a ``d x V`` kernel or
a vocabulary block of it: the hidden gradient ``g @ W.T`` of a ``Dense(V)`` head and
the logits ``h @ E.T`` of a tied embedding. This times both ops at those shapes, side
by side in one process (median of ``--repeats`` runs of ``--calls`` products each,
after a warm-up; process CPU time and wall time) and prints the ratio
``BatchMatMulV2 / MatMul``; ``_tensorflow.mm_nt`` takes the faster one.

    python benchmarks/bench_matmul_nt.py
    python benchmarks/bench_matmul_nt.py --dims 512,1024 --vocab 131072
"""

from __future__ import annotations

import argparse
import statistics

import tensorflow as tf
from bench_large_vocab import _timed  # the same directory


def _medians(fn, repeats: int) -> tuple[float, float]:
    """Median CPU and wall seconds of ``repeats`` runs after a warm-up (tracing)."""
    fn()
    wall, cpu = _timed(fn, repeats)
    return statistics.median(cpu), statistics.median(wall)


def _loop(op, a, b, calls: int):
    @tf.function(autograph=False)
    def run():
        return tf.add_n([op(a, b)[0, 0] for _ in range(calls)])

    return lambda: run().numpy()


def _matmul(a, b):
    return tf.matmul(a, b, transpose_b=True)


def _batch_matmul(a, b):
    return tf.raw_ops.BatchMatMulV2(x=a, y=b, adj_y=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="128,512,1024")
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--rows", type=int, default=256, help="token rows per product")
    p.add_argument("--block", type=int, default=16384, help="vocabulary block width")
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    tf.random.set_seed(0)
    tf.get_logger().setLevel("ERROR")  # one tf.function per product: no retracing advice
    print(f"rows={args.rows} V={args.vocab} calls={args.calls} repeats={args.repeats}")
    print(f"{'product':>34} {'MatMul cpu s':>13} {'BMM cpu s':>10} {'ratio':>6} {'wall ratio':>10}")
    for d in (int(x) for x in args.dims.split(",")):
        shapes = {
            f"g @ W.T, ({args.rows},V)x(V,{d})": ((args.rows, args.vocab), (d, args.vocab)),
            f"g @ W.T, one block of {args.block}": ((args.rows, args.block), (d, args.block)),
            f"h @ E.T, ({args.rows},{d})x({d},V)": ((args.rows, d), (args.vocab, d)),
        }
        for name, (sa, sb) in shapes.items():
            a, b = tf.random.normal(sa), tf.random.normal(sb)
            mm = _medians(_loop(_matmul, a, b, args.calls), args.repeats)
            bmm = _medians(_loop(_batch_matmul, a, b, args.calls), args.repeats)
            print(
                f"{name:>34} {mm[0]:13.3f} {bmm[0]:10.3f} {bmm[0] / mm[0]:6.2f} "
                f"{bmm[1] / mm[1]:10.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
