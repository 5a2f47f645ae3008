"""tf.distribute: the losses give the single-device answer under MirroredStrategy and
MultiWorkerMirroredStrategy, with ``fit`` and with the custom-training-loop recipe.

Logical CPU devices can be configured only before TensorFlow initialises, so every
multi-device run happens in a fresh subprocess (``run_python``) that prints one
``RESULT <json>`` line; the assertions run here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
from conftest import REPO, run_python

from keras_ce_plugin import KerasCEError
from keras_ce_plugin import distribute as kd

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute strategies exist only on the TensorFlow backend",
)

RTOL = 1e-5


def _result(proc: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no RESULT line in:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT ") :])


# Shared by the subprocess scripts: data, model and a fit helper. Sizes are chosen so
# every global batch (16) splits evenly over 2 replicas.
COMMON = textwrap.dedent(
    """
    import contextlib, json
    import numpy as np, keras
    import keras_ce_plugin as kc

    N, D, K, B, EPOCHS = 64, 8, 4, 16, 3
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N + 16, D)).astype("float32")
    LABELS = rng.integers(0, K, size=N + 16)
    SW = rng.uniform(0.1, 3.0, size=N + 16).astype("float32")

    def targets(kind):
        if kind == "cce":
            return np.eye(K, dtype="float32")[LABELS]
        if kind == "scce":
            return LABELS.astype("int32")
        return (LABELS % 2).astype("float32")[:, None]

    def build(kind, seed=1):
        keras.utils.set_random_seed(seed)
        out = (
            keras.layers.Dense(1, activation="sigmoid")
            if kind == "bce"
            else keras.layers.Dense(K, activation="softmax")
        )
        return keras.Sequential(
            [keras.Input((D,)), keras.layers.Dense(16, activation="relu"), out]
        )

    def scope(strategy):
        return strategy.scope() if strategy is not None else contextlib.nullcontext()

    def fit(strategy, kind, loss, n=N, epochs=EPOCHS, **kw):
        init = build(kind).get_weights()
        with scope(strategy):
            model = build(kind)
            model.set_weights(init)
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
        h = model.fit(
            X[:n], targets(kind)[:n], batch_size=B, epochs=epochs, shuffle=False, verbose=0, **kw
        )
        return h.history["loss"], [w.tolist() for w in model.get_weights()]

    def wdiff(a, b):
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))
    """
)

MIRRORED_FIT = (
    "from keras_ce_plugin.distribute import make_strategy\n"
    "strategy = make_strategy('mirrored', devices=2)\n"
    + COMMON
    + textwrap.dedent(
        """
        names = {"cce": "CategoricalCE", "scce": "SparseCategoricalCE", "bce": "BinaryCE"}
        fit_cw = {"cce": {0: 1.0, 1: 2.0, 2: 0.5, 3: 1.5}, "scce": {0: 1.0, 1: 2.0, 2: 0.5, 3: 1.5},
                  "bce": {0: 1.0, 1: 3.0}}
        out = {"replicas": strategy.num_replicas_in_sync, "cases": {}}
        for kind, name in names.items():
            variants = {
                "plain": ("customloss>" + name, {}),
                "sample_weight": ("customloss>" + name, {"sample_weight": SW[:N]}),
                "fit_class_weight": ("customloss>" + name, {"class_weight": fit_cw[kind]}),
            }
            if kind != "bce":
                cls = getattr(kc, name)
                variants["loss_class_weights+sample_weight"] = (
                    lambda cls=cls: cls(class_weights=[1.0, 2.0, 0.5, 1.5]),
                    {"sample_weight": SW[:N]},
                )
            for variant, (loss, kw) in variants.items():
                mk = loss if callable(loss) else (lambda loss=loss: loss)
                h1, w1 = fit(None, kind, mk(), **kw)
                h2, w2 = fit(strategy, kind, mk(), **kw)
                out["cases"][f"{kind}-{variant}"] = {"one": h1, "two": h2, "wdiff": wdiff(w1, w2)}
        print("RESULT " + json.dumps(out))
        """
    )
)


@pytest.fixture(scope="module")
def mirrored_fit() -> dict:
    return _result(run_python(MIRRORED_FIT, cwd=REPO, timeout=300))


CASES = [
    f"{kind}-{variant}"
    for kind in ("cce", "scce", "bce")
    for variant in (
        "plain",
        "sample_weight",
        "fit_class_weight",
        "loss_class_weights+sample_weight",
    )
    if not (kind == "bce" and variant.startswith("loss_class_weights"))
]


@pytest.mark.parametrize("case", CASES)
def test_mirrored_two_logical_cpus_matches_one_device(mirrored_fit, case):
    assert mirrored_fit["replicas"] == 2
    res = mirrored_fit["cases"][case]
    one, two = np.array(res["one"]), np.array(res["two"])
    assert len(one) == 3 and np.all(np.isfinite(one))
    assert one[-1] < one[0], f"the model did not train: {one}"
    np.testing.assert_allclose(two, one, rtol=RTOL, err_msg=case)
    assert res["wdiff"] <= 1e-5, res["wdiff"]


# --------------------------------------------------------------------------- #
# Reduction under the strategy: unequal sample weights, custom loops, uneven batches
# --------------------------------------------------------------------------- #
CUSTOM_LOOP = (
    "from keras_ce_plugin.distribute import make_strategy\n"
    "strategy = make_strategy('mirrored', devices=2)\n"
    + COMMON
    + textwrap.dedent(
        """
        import tensorflow as tf
        from keras_ce_plugin.distribute import make_train_step, compute_average_loss

        # Replica 0 gets the first half of each global batch of 16, replica 1 the second:
        # weights 0.1 vs 5.0, so the replicas' weight sums differ 50-fold.
        UW = np.tile(np.r_[np.full(B // 2, 0.1), np.full(B // 2, 5.0)], (N + 16) // B)
        UW = UW.astype("float32")
        Y = targets("cce")

        def loop(strategy, n, step_factory, epochs=2, weights=True):
            init = build("cce").get_weights()
            with scope(strategy):
                model = build("cce")
                model.set_weights(init)
                opt = keras.optimizers.SGD(0.1)
            step = step_factory(model, opt, strategy)
            items = (X[:n], Y[:n], UW[:n]) if weights else (X[:n], Y[:n])
            ds = tf.data.Dataset.from_tensor_slices(items).batch(B)
            if strategy is not None:
                ds = strategy.experimental_distribute_dataset(ds)
            losses = []
            for _ in range(epochs):
                losses.append([float(step(*batch)) for batch in ds])
            return losses, [w.tolist() for w in model.get_weights()]

        def recipe(gbs=None):
            return lambda m, o, s: make_train_step(
                m, kc.CategoricalCE(reduction=None), o, s, global_batch_size=gbs
            )

        def buggy(normalise):
            # The classic mistakes, written out: each replica normalises its own share.
            def factory(model, opt, strategy):
                strategy = strategy or tf.distribute.get_strategy()
                per_sample = kc.CategoricalCE(reduction=None)

                def replica(x, y, w):
                    with tf.GradientTape() as tape:
                        l = per_sample(y, model(x, training=True)) * w
                        if normalise == "per_replica_batch":
                            value = tf.reduce_mean(l)
                        else:  # per-replica weighted mean, averaged over the replicas
                            value = tf.reduce_sum(l) / tf.reduce_sum(w)
                            value = value / strategy.num_replicas_in_sync
                    grads = tape.gradient(value, model.trainable_variables)
                    opt.apply_gradients(zip(grads, model.trainable_variables))
                    return value

                @tf.function
                def step(x, y, w):
                    return strategy.reduce("SUM", strategy.run(replica, args=(x, y, w)), axis=None)

                return step
            return factory

        def global_weighted_mean_step(model, opt, strategy):
            # Single-device reference for "mean_with_sample_weight".
            per_sample = kc.CategoricalCE(reduction=None)

            @tf.function
            def step(x, y, w):
                with tf.GradientTape() as tape:
                    value = tf.reduce_sum(per_sample(y, model(x, training=True)) * w) / tf.reduce_sum(w)
                grads = tape.gradient(value, model.trainable_variables)
                opt.apply_gradients(zip(grads, model.trainable_variables))
                return value
            return step

        out = {}
        # Single-device fit with unequal weights: the reference for everything below.
        h_ref, w_ref = fit(None, "cce", kc.CategoricalCE(), epochs=2, sample_weight=UW[:N])
        h_fit2, w_fit2 = fit(strategy, "cce", kc.CategoricalCE(), epochs=2, sample_weight=UW[:N])
        out["fit"] = {"ref": h_ref, "two": h_fit2, "wdiff": wdiff(w_ref, w_fit2)}
        # Single-device global weighted mean: the reference for "mean_with_sample_weight".
        _, w_mws_ref = loop(None, N, global_weighted_mean_step)
        for name, factory, w_correct in [
            ("recipe", recipe(), w_ref),
            ("recipe_fixed_gbs", recipe(B), w_ref),
            ("bug_per_replica_batch", buggy("per_replica_batch"), w_ref),
            ("bug_per_replica_weight_sum", buggy("weight_sum"), w_mws_ref),
        ]:
            l1, w1 = loop(None, N, factory)
            l2, w2 = loop(strategy, N, factory)
            out[name] = {
                "one": l1, "two": l2,
                "one_vs_correct": wdiff(w_correct, w1), "two_vs_correct": wdiff(w_correct, w2),
                "epoch_means": [float(np.mean(e)) for e in l2],
            }

        # mean_with_sample_weight: global weighted mean (single device) vs Keras fit on 2.
        _, w_mws_one = fit(None, "cce", kc.CategoricalCE(reduction="mean_with_sample_weight"),
                           epochs=2, sample_weight=UW[:N])
        _, w_mws_two = fit(strategy, "cce", kc.CategoricalCE(reduction="mean_with_sample_weight"),
                           epochs=2, sample_weight=UW[:N])
        out["mean_with_sample_weight"] = {
            "one_vs_ref": wdiff(w_mws_ref, w_mws_one), "two_vs_ref": wdiff(w_mws_ref, w_mws_two)
        }

        # A short final batch of 3 (67 = 4 * 16 + 3) splits 2/1 over the replicas.
        l1, w1 = loop(None, 67, recipe(), weights=False)
        l2, w2 = loop(strategy, 67, recipe(), weights=False)
        l3, w3 = loop(strategy, 67, recipe(B), weights=False)
        _, wf1 = fit(None, "cce", kc.CategoricalCE(), n=67, epochs=2)
        _, wf2 = fit(strategy, "cce", kc.CategoricalCE(), n=67, epochs=2)
        out["uneven"] = {
            "recipe": wdiff(w1, w2), "recipe_vs_fit": wdiff(wf1, w2),
            "recipe_fixed_gbs": wdiff(w1, w3), "fit": wdiff(wf1, wf2),
            "loss_one": l1, "loss_two": l2,
        }
        print("RESULT " + json.dumps(out))
        """
    )
)


@pytest.fixture(scope="module")
def custom_loop() -> dict:
    return _result(run_python(CUSTOM_LOOP, cwd=REPO, timeout=300))


def test_fit_unequal_sample_weights_across_replicas(custom_loop):
    res = custom_loop["fit"]
    np.testing.assert_allclose(res["two"], res["ref"], rtol=RTOL)
    assert res["wdiff"] <= 1e-5


def test_custom_loop_recipe_matches_single_device_fit(custom_loop):
    for name in ("recipe", "recipe_fixed_gbs"):
        res = custom_loop[name]
        np.testing.assert_allclose(
            np.concatenate(res["two"]), np.concatenate(res["one"]), rtol=RTOL, err_msg=name
        )
        # Same weights as Keras' own fit on one device with the same (unequal) sample weights.
        assert res["one_vs_correct"] <= 1e-5, (name, res["one_vs_correct"])
        assert res["two_vs_correct"] <= 1e-5, (name, res["two_vs_correct"])
        # The step returns the mean over the global batch; fit reports the same per epoch.
        np.testing.assert_allclose(res["epoch_means"], custom_loop["fit"]["ref"], rtol=RTOL)


@pytest.mark.parametrize("bug", ["bug_per_replica_batch", "bug_per_replica_weight_sum"])
def test_unequal_weights_expose_per_replica_normalisation(custom_loop, bug):
    """The test data tells a per-replica normalisation apart from the recipe.

    Each bug gives the right update on one device and a wrong one as soon as the
    global batch is split over two replicas whose weight sums differ 50-fold.
    """
    res = custom_loop[bug]
    assert res["one_vs_correct"] <= 1e-5, res["one_vs_correct"]
    assert res["two_vs_correct"] > 1e-3, res["two_vs_correct"]
    assert custom_loop["recipe"]["two_vs_correct"] <= 1e-5


def test_recipe_exact_for_uneven_final_batch(custom_loop):
    res = custom_loop["uneven"]
    assert res["recipe"] <= 1e-5  # all-reduced batch size: exact
    assert res["recipe_vs_fit"] <= 1e-5
    np.testing.assert_allclose(
        np.concatenate(res["loss_two"]), np.concatenate(res["loss_one"]), rtol=RTOL
    )
    # Dividing the 3-sample batch by a fixed 16 is measurably wrong (why the default
    # sums the actual batch sizes).
    assert res["recipe_fixed_gbs"] > 1e-4


# What Keras itself does under a strategy: the reasons for the recipe and for the advice
# in the docs. Each test asserts the behaviour as it is, so it fails (and the advice must
# be revisited) the day Keras changes it.
def test_keras_fit_weighs_an_uneven_final_batch_per_replica(custom_loop):
    """Keras ``fit`` under a strategy averages the per-replica means: a short final
    batch split unevenly (3 -> 2/1) is weighted wrongly, so two replicas end with other
    weights than one device. The custom-loop recipe (all-reduced batch size) does not."""
    res = custom_loop["uneven"]
    assert res["fit"] > 1e-4, res["fit"]
    assert res["recipe_vs_fit"] <= 1e-5  # the recipe on two replicas = fit on one device


def test_keras_fit_mean_with_sample_weight_divides_per_replica(custom_loop):
    """Keras ``fit`` with ``reduction="mean_with_sample_weight"`` divides by each
    replica's own weight sum: with unequal weight sums two replicas give another update
    than one device (which computes the global weighted mean)."""
    res = custom_loop["mean_with_sample_weight"]
    assert res["one_vs_ref"] <= 1e-5  # one device: the global weighted mean
    assert res["two_vs_ref"] > 1e-3, res["two_vs_ref"]


# --------------------------------------------------------------------------- #
# Two real workers (MultiWorkerMirroredStrategy over loopback)
# --------------------------------------------------------------------------- #
WORKER = textwrap.dedent(
    """
    import json, sys
    from keras_ce_plugin.distribute import make_strategy
    strategy = make_strategy(sys.argv[1])
    import contextlib
    import numpy as np, keras
    import keras_ce_plugin  # noqa: F401

    rng = np.random.default_rng(0)
    N, D, K, B = 64, 8, 4, 16
    x = rng.normal(size=(N, D)).astype("float32")
    y = np.eye(K, dtype="float32")[rng.integers(0, K, size=N)]
    with strategy.scope() if strategy else contextlib.nullcontext():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([
            keras.Input((D,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(K, activation="softmax"),
        ])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="customloss>CategoricalCE")
    history = model.fit(x, y, batch_size=B, epochs=3, shuffle=False, verbose=0)
    replicas = strategy.num_replicas_in_sync if strategy else 1
    np.savez(sys.argv[2], *model.get_weights())
    with open(sys.argv[2] + ".json", "w") as f:
        json.dump({"loss": history.history["loss"], "replicas": replicas}, f)
    """
)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env(**extra) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **extra}
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _run_workers(script, out_dir, timeout: float) -> list[tuple[int, str]]:
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    try:
        for i in range(2):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), "multiworker", str(out_dir / f"w{i}")],
                    cwd=REPO,
                    env=_env(TF_CONFIG=tf_config),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        deadline = time.monotonic() + timeout
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out))
        return results
    finally:
        for p in procs:  # a worker left waiting on its peer is killed, never leaked
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.mark.slow
def test_two_workers_match_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ref = subprocess.Popen(
        [sys.executable, str(script), "none", str(tmp_path / "ref")],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for attempt in range(2):  # a port taken between picking and binding: try new ones
            results = _run_workers(script, tmp_path, timeout=180)
            if all(rc == 0 for rc, _ in results):
                break
            if attempt == 0 and any("ddress already in use" in out for _, out in results):
                continue
            pytest.fail("worker failed:\n" + "\n----\n".join(out[-4000:] for _, out in results))
        ref_out, _ = ref.communicate(timeout=180)
        assert ref.returncode == 0, ref_out[-4000:]
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.communicate()

    hist = {k: json.loads((tmp_path / f"{k}.json").read_text()) for k in ("ref", "w0", "w1")}
    weights = {k: np.load(tmp_path / f"{k}.npz") for k in ("ref", "w0", "w1")}
    assert hist["w0"]["replicas"] == hist["w1"]["replicas"] == 2
    for key in weights["ref"].files:
        np.testing.assert_array_equal(weights["w0"][key], weights["w1"][key])
        np.testing.assert_allclose(weights["w0"][key], weights["ref"][key], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(hist["w0"]["loss"], hist["ref"]["loss"], rtol=RTOL)
    np.testing.assert_allclose(hist["w1"]["loss"], hist["ref"]["loss"], rtol=RTOL)
    assert hist["ref"]["loss"][-1] < hist["ref"]["loss"][0]


# --------------------------------------------------------------------------- #
# In-process checks: errors and the recipe's arithmetic (no strategy is created here)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "raw, fragment",
    [
        (None, "It is not set"),
        ("", "It is not set"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"task": {"type": "worker", "index": 0}}', "no 'cluster'"),
        ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', "non-empty list"),
        (
            '{"cluster": {"worker": ["nohostport"]}, "task": {"type": "worker", "index": 0}}',
            "host:port",
        ),
        ('{"cluster": {"ps": ["h:1"]}, "task": {"type": "ps", "index": 0}}', "no 'worker' list"),
        ('{"cluster": {"worker": ["h:1"]}}', "no 'task'"),
        (
            '{"cluster": {"worker": ["h:1"]}, "task": {"type": "chief", "index": 0}}',
            "not in the cluster",
        ),
        (
            '{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": -1}}',
            "non-negative",
        ),
        (
            '{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 1}}',
            "out of range",
        ),
    ],
)
def test_bad_tf_config_is_a_clear_error(monkeypatch, raw, fragment):
    if raw is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", raw)
    with pytest.raises(KerasCEError, match=fragment):
        kd.make_strategy("multiworker")


@pytest.mark.parametrize(
    "name, devices, fragment",
    [
        ("ring", None, "must be one of"),
        ("mirrored", 0, "positive integer"),
        ("mirrored", 1.5, "positive integer"),
        ("none", 2, "needs --strategy mirrored"),
        ("multiworker", 2, "mirrored only"),
    ],
)
def test_bad_strategy_arguments(name, devices, fragment):
    with pytest.raises(KerasCEError, match=fragment):
        kd.make_strategy(name, devices)


def test_splitting_cpu_after_tf_init_is_a_clear_error():
    import tensorflow as tf

    tf.constant(0.0) + 1.0  # TensorFlow's devices are initialised from here on.
    have = len(tf.config.list_logical_devices("CPU"))
    with pytest.raises(KerasCEError, match="before any TensorFlow operation runs"):
        kd.make_strategy("mirrored", devices=have + 1)


def test_mirrored_in_fresh_process_gives_n_logical_devices():
    code = (
        "from keras_ce_plugin.distribute import make_strategy\n"
        "s = make_strategy('mirrored', devices=3)\n"
        "again = make_strategy('mirrored', devices=3)\n"  # idempotent
        "print('RESULT', __import__('json').dumps([s.num_replicas_in_sync, "
        "again.num_replicas_in_sync, list(s.extended.worker_devices)]))\n"
    )
    n, again, names = _result(run_python(code, cwd=REPO, timeout=120))
    assert n == again == 3
    assert [d.rsplit(":", 2)[-2:] for d in names] == [["CPU", "0"], ["CPU", "1"], ["CPU", "2"]]


@pytest.mark.parametrize(
    "policy, expected",
    [("float16", "mixed_float16"), ("bfloat16", "mixed_bfloat16"), (None, "float32")],
)
def test_set_mixed_precision(policy, expected):
    try:
        assert kd.set_mixed_precision(policy) == expected
        assert keras.config.dtype_policy().name == expected
    finally:
        kd.set_mixed_precision(None)


def test_set_mixed_precision_rejects_unknown():
    with pytest.raises(KerasCEError, match="Received: mixed_precision='int8'"):
        kd.set_mixed_precision("int8")


def test_compute_average_loss_is_the_global_batch_mean(rng):
    import keras_ce_plugin as kc

    y = np.eye(5, dtype="float32")[rng.integers(0, 5, size=12)]
    p = rng.dirichlet(np.ones(5), size=12).astype("float32")
    w = rng.uniform(0.0, 4.0, size=12).astype("float32")
    per_sample = kc.CategoricalCE(reduction=None)(y, p)
    # Two "replicas" of 6: each divides by the global 12, the sum is the batch loss.
    halves = [
        float(kd.compute_average_loss(per_sample[i : i + 6], 12, w[i : i + 6])) for i in (0, 6)
    ]
    np.testing.assert_allclose(sum(halves), float(kc.CategoricalCE()(y, p, w)), rtol=1e-6)
    with pytest.raises(ValueError, match="global_batch_size"):
        kd.compute_average_loss(per_sample, 0)
    with pytest.raises(TypeError, match="global_batch_size"):
        kd.compute_average_loss(per_sample, 12.0)


def test_make_train_step_requires_per_sample_loss():
    import keras_ce_plugin as kc

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    with pytest.raises(ValueError, match="reduction=None"):
        kd.make_train_step(model, kc.CategoricalCE(), keras.optimizers.SGD(0.1))


@pytest.mark.parametrize("policy", ["float16", "bfloat16"])
def test_recipe_under_mixed_precision_stays_finite(policy, rng):
    """The custom-loop recipe with a float32 softmax under a mixed policy trains finitely."""
    import keras_ce_plugin as kc

    try:
        kd.set_mixed_precision(policy)
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(4),
                keras.layers.Activation("softmax", dtype="float32"),
            ]
        )
        assert model.layers[0].compute_dtype == policy
        opt = keras.optimizers.SGD(0.1)
        if policy == "float16":
            opt = keras.optimizers.LossScaleOptimizer(opt)
        step = kd.make_train_step(model, kc.CategoricalCE(reduction=None), opt)
        x = rng.normal(size=(32, 8)).astype("float32")
        y = np.eye(4, dtype="float32")[rng.integers(0, 4, size=32)]
        losses = [float(step(x, y)) for _ in range(20)]
    finally:
        kd.set_mixed_precision(None)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


@pytest.mark.slow
def test_two_worker_cli_run_only_the_chief_writes_out(cifar_dir, tmp_path):
    """``keras-ce train --strategy multiworker``: both workers name the same ``--out``
    (a shared disk); only worker 0 writes it, the other trains and writes nothing there."""
    out = tmp_path / "run"
    flags = [
        "train", "--strategy", "multiworker", "--weights", "none", "--data-dir", str(cifar_dir),
        "--limit-train", "64", "--limit-test", "32", "--epochs", "1", "--quiet", "--out", str(out),
    ]  # fmt: skip
    for attempt in range(2):  # a port taken between picking and binding: try new ones
        cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
        procs = []
        try:
            for i in range(2):
                task = {"cluster": cluster, "task": {"type": "worker", "index": i}}
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "keras_ce_plugin.cli", *flags],
                        cwd=REPO,
                        env=_env(TF_CONFIG=json.dumps(task)),
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
            deadline = time.monotonic() + 240
            results = [
                (p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0], p.returncode)
                for p in procs
            ]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        if all(rc == 0 for _, rc in results):
            break
        if attempt == 0 and any("ddress already in use" in o for o, _ in results):
            continue
        pytest.fail("worker failed:\n" + "\n----\n".join(o[-4000:] for o, _ in results))
    (chief_out, _), (worker_out, _) = results
    assert "wrote model.keras" in chief_out
    assert "worker 1: done" in worker_out and "wrote nothing" in worker_out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.keras", "history.json", "metrics.json", "curves.png"]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["arguments"]["strategy"] == "multiworker"
    assert len(json.loads((out / "history.json").read_text())["loss"]) == 1
