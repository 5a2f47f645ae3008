"""Forward + backward of a large-vocabulary loss: naive Keras vs ``linear_ce``.

Per case (``N`` tokens, hidden size ``d``, vocabulary ``V``, float32) and method,
a fresh process builds ``hidden`` (N x d), a ``keras.layers.Dense(V)`` head and
integer labels, then times a compiled step returning the mean loss and its
gradients w.r.t. hidden, kernel and bias:

* ``naive``: ``Dense`` logits + ``keras.losses.SparseCategoricalCrossentropy``;
* ``recompute``: ``fused_linear_ce_sum`` with the logits recomputed chunk by chunk
  in the backward pass (Cut Cross-Entropy's way; what ``LinearCE`` uses in ``fit``);
* ``in_forward``: the same with the gradients computed in the forward pass (Liger
  Kernel's way);
* ``recompute_fixed`` (optional): ``recompute`` with the fixed pair of chunk sizes
  used before they came from a memory budget (4096 tokens x 1024 columns);
* ``recompute_input`` (optional, with ``--dtype bfloat16``/``float16``): ``recompute``
  with ``matmul_precision="input"`` (the matmuls in the half dtype, as the naive
  head's);
* ``per_token`` (optional): ``mean(linear_ce(...))``, the public per-token function;
* ``recompute_filter`` (optional): ``recompute`` with ``filter_eps="auto"`` (Cut
  Cross-Entropy's gradient filtering), best with ``--peaked``;
* ``naive_frozen`` and ``frozen`` (optional): a frozen head (LoRA, a frozen
  embedding), the gradient w.r.t. ``hidden`` only: the naive loss, and
  ``fused_linear_ce_parts(..., kernel_grad=False)`` (its online pass); ``frozen`` is
  compared with ``naive_frozen``.

Time: median of ``--repeats`` runs after one warm-up (wall and process CPU time;
on a shared machine the CPU time is the steadier of the two). Memory: the loss's
own peak above the inputs, the weights and one set of gradients. On TensorFlow this
is the CPU allocator's high-water mark (``tf.config.experimental.get_memory_info``)
minus its current use with inputs, weights and the previous step's gradients
alive, which are then released before the measured step; and the process RSS
high-water mark of the first step (tracing included: TensorFlow's oneDNN allocator
keeps freed memory pooled, so only the first step shows in the RSS) above the RSS
with inputs, weights and gradient-sized buffers alive. On JAX and torch it is the
RSS high-water mark (``/proc/self/clear_refs`` reset) of the first run after
compilation (on torch, after a warm-up run) minus the RSS with inputs, weights and
gradient-sized buffers alive (released before the run; glibc returns big buffers at
once through ``MALLOC_MMAP_THRESHOLD_``).

    python benchmarks/bench_large_vocab.py                       # the issue's 7 cases
    python benchmarks/bench_large_vocab.py --quick               # N=4096, d=512, V=32768
    python benchmarks/bench_large_vocab.py --cases 512x131072 --methods naive,recompute,per_token
    python benchmarks/bench_large_vocab.py --cases 512x131072 --methods naive_frozen,frozen
    python benchmarks/bench_large_vocab.py --cases 512x131072 --tokens 1024 \
        --methods naive,recompute_fixed,recompute
    python benchmarks/bench_large_vocab.py --cases 512x131072 --dtype bfloat16 \
        --methods naive,recompute,recompute_input
    python benchmarks/bench_large_vocab.py --cases 512x131072 --peaked 2 \
        --methods naive,recompute,recompute_filter
    python benchmarks/bench_large_vocab.py --backend jax --quick
    python benchmarks/bench_large_vocab.py --backend torch --quick

Goals (issue 20): the loss's peak <= 10% of naive's; time <= 1.05x naive at d >= 512,
<= 1.1x at d = 128.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = [f"{d}x{v}" for d in (512, 1024) for v in (32768, 131072, 262144)] + ["128x262144"]
METHODS = ["naive", "recompute", "in_forward"]
GIB = 1024**3


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss_base(shapes: list) -> int:
    """The RSS with gradient-sized buffers alive, which are then released; the peak is
    reset, so that the next step's high-water mark counts from here."""
    import gc

    import numpy as np

    spare = [np.ones(shape, "float32") for shape in shapes]
    gc.collect()
    base = _status_kib("VmRSS") * 1024
    del spare
    gc.collect()
    _reset_peak()
    return base


def _timed(run, repeats: int) -> tuple[list[float], list[float]]:
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu


def _child(args: argparse.Namespace) -> None:

    import keras
    import numpy as np

    from keras_ce_plugin.large_vocab import fused_linear_ce_sum, linear_ce
    from keras_ce_plugin.large_vocab.ops import fused_linear_ce_parts

    d, v = (int(x) for x in args.case.split("x"))
    n = args.tokens
    rng = np.random.default_rng(0)
    dense = keras.layers.Dense(v)
    dense.build((None, d))
    h = keras.ops.convert_to_tensor(rng.normal(size=(n, d)).astype("float32"))
    y = keras.ops.convert_to_tensor(rng.integers(0, v, n).astype("int32"))
    if args.peaked:  # a peaked, calibrated model: logits ~ -slope * log(1 + id)
        prior = -args.peaked * np.log1p(np.arange(v))
        dense.bias.assign(prior.astype("float32"))
        p = np.exp(prior - prior.max())
        y = keras.ops.convert_to_tensor(rng.choice(v, n, p=p / p.sum()).astype("int32"))
    builtin = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    weights = keras.ops.full((n,), 1.0 / n)
    chunks = {"token_chunk_size": args.token_chunk, "vocab_chunk_size": args.vocab_chunk}

    frozen = args.method.endswith("frozen")  # gradient w.r.t. hidden only

    def loss_of(hh, kk, bb):
        if args.dtype != "float32":  # mixed precision: float32 weights, half compute
            hh, kk, bb = (keras.ops.cast(x, args.dtype) for x in (hh, kk, bb))
        if args.method in ("naive", "naive_frozen"):
            return builtin(y, keras.ops.matmul(hh, kk) + bb)
        if args.method == "recompute_input":
            half = {"matmul_precision": "input"}
            return fused_linear_ce_sum(hh, kk, y, weights, bias=bb, **half, **chunks)[0]
        if frozen:
            return fused_linear_ce_parts(hh, kk, y, weights, bias=bb, kernel_grad=False, **chunks)[
                0
            ]
        if args.method == "recompute_fixed":
            fixed = {"token_chunk_size": 4096, "vocab_chunk_size": 1024}
            return fused_linear_ce_sum(hh, kk, y, weights, bias=bb, **fixed)[0]
        if args.method == "recompute_filter":
            return fused_linear_ce_sum(hh, kk, y, weights, bias=bb, filter_eps="auto", **chunks)[0]
        if args.method == "per_token":
            return keras.ops.mean(linear_ce(hh, kk, y, bias=bb, **chunks))
        return fused_linear_ce_sum(hh, kk, y, weights, bias=bb, strategy=args.method, **chunks)[0]

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch(h)
                value = loss_of(h, dense.kernel.value, dense.bias.value)
            wrt = [h] if frozen else [h, dense.kernel.value, dense.bias.value]
            return value, tape.gradient(value, wrt)

        def run():
            value, grads = step()
            float(value)
            return grads

    elif keras.backend.backend() == "torch":
        import torch

        leaves = [x.detach() for x in (h, dense.kernel.value, dense.bias.value)]

        def run():
            xs = [x.requires_grad_(i == 0 or not frozen) for i, x in enumerate(leaves)]
            value = loss_of(*xs)
            grads = torch.autograd.grad(value, xs[:1] if frozen else xs)
            float(value)
            return grads

    else:
        import jax

        fn = jax.jit(jax.value_and_grad(loss_of, argnums=(0,) if frozen else (0, 1, 2)))
        kernel, bias = dense.kernel.value, dense.bias.value

        def run():
            value, grads = fn(h, kernel, bias)
            jax.block_until_ready(grads)
            float(value)
            return grads

    if keras.backend.backend() == "tensorflow":
        # RSS: the first run (tracing included), as TensorFlow's oneDNN allocator keeps
        # freed memory pooled: later runs reuse the pool and leave the RSS flat.
        rss_base = _rss_base([x.shape for x in (h, dense.kernel, dense.bias)])
        grads = run()  # warm-up (traces and compiles)
        rss = _status_kib("VmHWM") * 1024 - rss_base
        times, cpu = _timed(run, args.repeats)
        # The allocator's own high-water mark, above inputs, weights and gradients.
        tf.config.experimental.reset_memory_stats("CPU:0")
        base = tf.config.experimental.get_memory_info("CPU:0")["current"]
        del grads  # the step allocates its own gradients again
        grads = run()
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - base
    else:
        if keras.backend.backend() == "jax":
            fn = fn.lower(h, kernel, bias).compile()  # noqa: F821 - compile memory not counted
        else:
            run()  # warm-up
        base = _rss_base([x.shape for x in (h, dense.kernel, dense.bias)])
        grads = run()
        peak = rss = _status_kib("VmHWM") * 1024 - base
        times, cpu = _timed(run, args.repeats)
    print(
        json.dumps(
            {
                "case": args.case,
                "method": args.method,
                "median_s": statistics.median(times),
                "cpu_s": statistics.median(cpu),
                "times": times,
                "peak_gib": max(peak, 0) / GIB,
                "rss_gib": max(rss, 0) / GIB,
            }
        )
    )


def _run_case(args: argparse.Namespace, case: str, method: str) -> dict:
    env = {
        **os.environ,
        "KERAS_BACKEND": args.backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
    }
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--case",
        case,
        "--method",
        method,
        "--tokens",
        str(args.tokens),
        "--repeats",
        str(args.repeats),
        "--dtype",
        args.dtype,
    ]
    flags = (
        ("--token-chunk", args.token_chunk),
        ("--vocab-chunk", args.vocab_chunk),
        ("--peaked", args.peaked),
    )
    for flag, value in flags:
        if value:
            cmd += [flag, str(value)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{case} {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated dxV")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backend", default="tensorflow", choices=["tensorflow", "jax", "torch"])
    p.add_argument("--token-chunk", type=int, default=None)
    p.add_argument("--vocab-chunk", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="only d=512, V=32768")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype of hidden and kernel (the weights stay float32)",
    )
    p.add_argument(
        "--peaked",
        type=float,
        default=None,
        metavar="SLOPE",
        help="bias -SLOPE*log(1+id) and labels drawn from it (a peaked softmax)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return
    cases = ["512x32768"] if args.quick else args.cases.split(",")
    methods = args.methods.split(",")
    print(
        f"backend={args.backend} N={args.tokens} dtype={args.dtype} repeats={args.repeats} "
        f"peaked={args.peaked} "
        f"load={os.getloadavg()}"
    )
    print(
        f"{'case dxV':>12} {'method':>12} {'wall s':>8} {'x naive':>8} {'cpu s':>8} "
        f"{'x naive':>8} {'peak GiB':>9} {'% naive':>8} {'rss GiB':>8} {'% naive':>8}"
    )
    for case in cases:
        results = {m: _run_case(args, case, m) for m in methods}
        for m, r in results.items():
            # A frozen method is compared with the naive loss of a frozen head.
            ref = results.get("naive_frozen" if m.endswith("frozen") else "naive")
            ratio = r["median_s"] / ref["median_s"] if ref else float("nan")
            cratio = r["cpu_s"] / ref["cpu_s"] if ref else float("nan")
            mem = 100 * r["peak_gib"] / ref["peak_gib"] if ref and ref["peak_gib"] else float("nan")
            rss = 100 * r["rss_gib"] / ref["rss_gib"] if ref and ref["rss_gib"] else float("nan")
            print(
                f"{case:>12} {m:>12} {r['median_s']:8.2f} {ratio:8.2f} {r['cpu_s']:8.2f} "
                f"{cratio:8.2f} {r['peak_gib']:9.3f} {mem:7.1f}% {r['rss_gib']:8.3f} {rss:7.1f}%",
                flush=True,
            )
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
