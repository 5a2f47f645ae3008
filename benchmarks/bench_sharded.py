"""``linear_ce`` on 8 devices (JAX, ``keras.distribution``) vs the naive sharded loss.

Per mesh ``(batch, model)`` of 8 CPU devices (``XLA_FLAGS`` is set here, before
JAX starts), the kernel ``(d, V)`` is a Keras variable laid out ``(None, "model")``
and the hidden states ``(N, d)`` are sharded on ``"batch"``. Two methods, each a
jitted step returning the mean loss and its gradients w.r.t. hidden and kernel:

* ``naive``: ``hidden @ kernel`` logits + ``SparseCategoricalCrossentropy``, sharded
  by XLA from the input layouts;
* ``linear_ce``: ``fused_linear_ce_sum`` (what ``LinearCE`` runs in ``fit``), which
  finds the layout itself (``shard_map``, per-token collectives).

Memory: ``compiled.memory_analysis()`` of the step, per device: arguments + outputs
+ temporaries (minus aliased buffers); ``temp`` is the loss's own working memory.
Communication: the bytes of the results of the collectives in the compiled HLO,
per device and step. Both at the full size (compile only). Time: median wall time
of ``--repeats`` runs at the smaller ``--time-case`` (8 virtual devices share this
machine's cores, so the ratio shows overhead, not a speed-up), relative to
``linear_ce`` on one device.

    python benchmarks/bench_sharded.py                    # N=4096, d=512, V=131072
    python benchmarks/bench_sharded.py --case 1024x256x32768 --time-case 256x128x8192
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
MIB = 1024**2


def _case(text: str) -> tuple[int, int, int]:
    n, d, v = (int(x) for x in text.split("x"))
    return n, d, v


def _step(method: str, shape, n: int, d: int, v: int):
    """(jitted step, its arguments) for one method on mesh ``shape`` (None: one device)."""
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    from keras_ce_plugin.large_vocab import fused_linear_ce_sum

    rng = np.random.default_rng(0)
    h = (rng.normal(size=(n, d)) * 0.1).astype("float32")
    k = (rng.normal(size=(d, v)) * 0.05).astype("float32")
    y = rng.integers(0, v, n).astype("int32")
    w = np.full((n,), 1.0 / n, "float32")
    dist = None
    if shape is not None:
        mesh = keras.distribution.DeviceMesh(shape, ["batch", "model"])
        layout = keras.distribution.LayoutMap(mesh)
        layout["kernel"] = (None, "model")
        dist = keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch")
    keras.distribution.set_distribution(dist)
    kv = keras.Variable(k, name="kernel")
    if dist is not None:
        h = keras.distribution.distribute_tensor(h, dist.get_data_layout(h.shape))
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss(hh, value):
        with keras.StatelessScope(state_mapping=[(kv, value)]):
            if method == "naive":
                return sce(y, jnp.matmul(hh, kv.value))
            return fused_linear_ce_sum(hh, kv, y, w)[0]

    # The distribution stays set: the step is traced (and the layout found) at its first use.
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return step, (h, kv.value)


def _memory(step, args, rows: int) -> tuple[float, float, int, int]:
    """Peak and temporaries (MiB), bytes of all collectives and of the per-token ones.

    Per-token: results of at most 8 bytes per token of the device (``rows``).
    """
    from keras_ce_plugin.large_vocab._sharded import collectives

    compiled = step.lower(*args).compile()
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    found = [size for _, size in collectives(compiled.as_text())]
    return (
        peak / MIB,
        m.temp_size_in_bytes / MIB,
        sum(found),
        sum(s for s in found if s <= 8 * rows),
    )


def _time(step, args, repeats: int) -> float:
    import jax

    jax.block_until_ready(step(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="4096x512x131072", help="N x d x V (memory, bytes)")
    parser.add_argument("--time-case", default="1024x256x32768", help="N x d x V (time), or none")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="naive,linear_ce")
    args = parser.parse_args()
    methods = args.methods.split(",")
    big = _case(args.case)
    small = _case(args.time_case) if args.time_case != "none" else big
    n, d, v = big
    print(f"memory case N={n} d={d} V={v}: kernel {d * v * 4 / MIB:.0f} MiB, 1/8 of it ")
    print(f"{d * v * 4 / 8 / MIB:.0f} MiB; time case {args.time_case}; load {os.getloadavg()}")
    timed = args.time_case != "none"
    base = _time(*_step("linear_ce", None, *small), args.repeats) if timed else 1.0
    rows = []
    for shape in MESHES:
        for method in methods:
            peak, temp, sent, per_token = _memory(*_step(method, shape, *big), n // shape[0])
            seconds = _time(*_step(method, shape, *small), args.repeats) if timed else float("nan")
            rows.append((shape, method, peak, temp, sent, per_token, seconds / base))
            print(f"  {shape} {method}: done, load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\none device, linear_ce, time case: {base:.3f} s")
    print("| mesh (batch, model) | loss | per-device peak (MiB) | of it temporaries (MiB) "
          "| collectives per device and step (MiB) | of them per-token (KiB) "
          "| x single-device time |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape, method, peak, temp, sent, per_token, ratio in rows:
        print(
            f"| {shape[0]} x {shape[1]} | `{method}` | {peak:.0f} | {temp:.0f} "
            f"| {sent / MIB:.2f} | {per_token / 1024:.0f} | {ratio:.2f} |"
        )
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
