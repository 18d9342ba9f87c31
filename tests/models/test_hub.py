"""Tests for the TF-Hub MobileNetV2 path: make_hub_module, HubLayer, the classifier, fine-tuning.

There is no network access here: the tests use the session's tiny module (32x32, alpha 0.35,
``tiny_hub_module`` in tests/conftest.py, written by :func:`make_hub_module`; they load it, never
change it on disk). The module is written with batch-norm momentum 0, so one training-mode step
sets the moving statistics to that batch's statistics: inference-mode outputs then depend on the
input (an untrained MobileNetV2 with default statistics gives the same output for every image),
which keeps the output comparisons meaningful.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from medseg.errors import ModelError, RunExistsError  # noqa: E402
from medseg.models.hub import HUB_INFO_NAME, HubLayer, load_hub_module, make_hub_module  # noqa: E402
from medseg.models.mobilenet import (  # noqa: E402
    FineTuneAfter,
    build_mobilenetv2_classifier,
    build_optimizer_for_fine_tuning,
)

SIZE = 32
ALPHA = 0.35
BATCH = 4
CLASSES = 3
FEATURES = 1280  # MobileNetV2's last conv has 1280 channels for alpha <= 1


def _np(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def _snapshot(variables) -> list[np.ndarray]:
    return [_np(v).copy() for v in variables]


def _changed(before: list[np.ndarray], variables) -> list[bool]:
    return [not np.array_equal(b, _np(v)) for b, v in zip(before, variables, strict=True)]


def _data(seed: int = 0, n: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, SIZE, SIZE, 3)).astype("float32")
    y = np.eye(CLASSES, dtype="float32")[np.arange(n) % CLASSES]
    return x, y


def _moving_means(layer: keras.layers.Layer) -> list:
    means = [w for w in layer.non_trainable_weights if "moving_mean" in w.name]
    assert means, [w.name for w in layer.non_trainable_weights]
    return means


def _classifier(module, *, freeze: bool = False, **kwargs) -> keras.Model:
    return build_mobilenetv2_classifier(
        (SIZE, SIZE, 3), CLASSES, hub_handle=str(module), freeze_backbone=freeze, **kwargs
    )


def _compile(model: keras.Model, run_eagerly: bool = True) -> keras.Model:
    # Eager steps: tracing a MobileNetV2 train step costs seconds; the module's own functions
    # are graphs either way.
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="categorical_crossentropy",
        run_eagerly=run_eagerly,
    )
    return model


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


@pytest.fixture(scope="module")
def module(tiny_hub_module):
    """The session's module: SIZE x SIZE, alpha ALPHA, batch-norm momentum 0 (checked below)."""
    return tiny_hub_module


# ---------------------------------------------------------------------------------------------
# make_hub_module


def test_module_is_a_reusable_saved_model(module):
    info = json.loads((module / HUB_INFO_NAME).read_text())
    assert info["input_size"] == [SIZE, SIZE] and info["alpha"] == ALPHA
    assert info["bn_momentum"] == 0.0  # what the output comparisons below rely on
    assert info["weights"] is None and info["feature_dim"] == FEATURES
    assert {"tensorflow", "keras", "medseg"} <= set(info["versions"])

    loaded = tf.saved_model.load(str(module))  # a private copy: this test changes it
    assert len(loaded.variables) > len(loaded.trainable_variables) > 0
    assert list(loaded.regularization_losses) == []
    # Both modes were traced and saved.
    modes = {c.structured_input_signature[0][1] for c in loaded.__call__.concrete_functions}
    assert modes == {True, False}
    x, _ = _data()
    features = loaded(tf.constant(x), training=False)
    assert features.shape == (BATCH, FEATURES)
    served = loaded.signatures["serving_default"](inputs=tf.constant(x))["features"]
    np.testing.assert_allclose(_np(served), _np(features), atol=1e-6)
    # Inference leaves the batch-norm statistics alone; training mode updates them.
    means = [v for v in loaded.variables if "moving_mean" in v.name]
    assert means
    before = _snapshot(means)
    loaded(tf.constant(x), training=False)
    assert not any(_changed(before, means))
    loaded(tf.constant(x), training=True)
    assert all(_changed(before, means))


def test_make_module_refuses_existing_folder(module):
    with pytest.raises(RunExistsError, match=str(module.name)):
        make_hub_module(module, input_size=SIZE, alpha=ALPHA)


def test_make_module_missing_weights_file(tmp_path):
    with pytest.raises(ModelError, match="nope.weights.h5"):
        make_hub_module(tmp_path / "m", input_size=SIZE, weights=str(tmp_path / "nope.weights.h5"))
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------
# HubLayer


@pytest.fixture(scope="module")
def hub_layer(module):
    return HubLayer(str(module), trainable=True, output_dim=FEATURES, name="backbone")


def test_hub_layer_variables_are_the_module_variables(hub_layer):
    module_vars = list(hub_layer._module.variables)
    # Shared storage, not copies: each Keras variable's value is one of the module's variables.
    assert len(hub_layer.weights) == len(module_vars)
    assert {id(w.value) for w in hub_layer.weights} == {id(v) for v in module_vars}
    trainable_ids = {id(v) for v in hub_layer._module.trainable_variables}
    assert {id(w.value) for w in hub_layer.trainable_weights} == trainable_ids
    # Keras-valid names: no ":0" (optimizers reject it), no "/", unique within the layer.
    names = [w.name for w in hub_layer.weights]
    assert not [n for n in names if ":" in n or "/" in n]
    assert len(set(names)) == len(names)
    # Writing through a Keras variable changes what the module computes.
    x, _ = _data()
    before = _np(hub_layer(x, training=True))
    kernel = hub_layer.trainable_weights[0]
    kernel.assign(np.random.default_rng(0).normal(size=kernel.shape).astype("float32"))
    assert np.abs(_np(hub_layer(x, training=True)) - before).max() > 1e-3


def test_hub_layer_training_flag(hub_layer):
    x, _ = _data(8)  # new images: momentum 0 makes the statistics those of the last batch
    before = _snapshot(_moving_means(hub_layer))
    hub_layer(x, training=False)
    assert not any(_changed(before, _moving_means(hub_layer)))
    hub_layer.trainable = False
    try:
        assert hub_layer.trainable_weights == []
        hub_layer(x, training=True)  # a frozen layer runs batch norm in inference mode
        assert not any(_changed(before, _moving_means(hub_layer)))
    finally:
        hub_layer.trainable = True
    assert len(hub_layer.trainable_weights) == len(hub_layer._module.trainable_variables)
    hub_layer(x, training=True)
    assert all(_changed(before, _moving_means(hub_layer)))


def test_hub_layer_config(hub_layer, module):
    config = hub_layer.get_config()
    assert config["handle"] == str(module.resolve())  # absolute: reloads from anywhere
    assert config["trainable"] is True and config["output_dim"] == FEATURES
    assert config["name"] == "backbone"
    assert keras.saving.get_registered_name(HubLayer) == "medseg>HubLayer"


@pytest.mark.parametrize("bad", ["does/not/exist", "http://127.0.0.1:9/no-such-module"])
def test_bad_handle_names_it(bad, tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="cannot load TF-Hub module") as e:
        load_hub_module(bad)
    assert bad in str(e.value)
    with pytest.raises(ModelError, match=bad):
        build_mobilenetv2_classifier((SIZE, SIZE, 3), CLASSES, hub_handle=bad)


def test_hub_classifier_rejects_other_input_size(module):
    with pytest.raises(ModelError, match=r"does not accept inputs of shape \(64, 64, 3\)"):
        build_mobilenetv2_classifier((64, 64, 3), CLASSES, hub_handle=str(module))


def test_hub_classifier_rejects_weights(module):
    with pytest.raises(ModelError, match="carries its own weights"):
        _classifier(module, weights="some.weights.h5")


# ---------------------------------------------------------------------------------------------
# Classifier on a hub module: fit, save, reload


@pytest.fixture(scope="module")
def fitted(module):
    """A hub classifier after one fit step, with the weights from before the step."""
    model = _compile(_classifier(module, l1=1e-4, l2=1e-4))
    backbone = model.get_layer("backbone")
    before = {
        "backbone": _snapshot(backbone.trainable_weights),
        "means": _snapshot(_moving_means(backbone)),
        "head": _snapshot(model.get_layer("head").trainable_weights),
    }
    x, y = _data(1)
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    return model, before


def test_hub_classifier_structure(module):
    model = _classifier(module, dropout=0.0)
    assert isinstance(model.get_layer("backbone"), HubLayer)
    assert model.output_shape == (None, CLASSES)
    assert [t.name for t in model.inputs] == ["image"]
    assert not any(isinstance(la, keras.layers.Dropout) for la in model.layers)
    assert model.losses == []  # no L1/L2 configured


def test_hub_classifier_outputs(fitted):
    model, _ = fitted
    x, _ = _data(2)
    out = _np(model(x, training=False))
    assert out.shape == (BATCH, CLASSES) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-5)
    # Calibrated batch norm: the features (and so the outputs) depend on the input.
    features = _np(model.get_layer("backbone")(x, training=False))
    assert np.abs(features[0] - features[1]).max() > 1e-2
    assert np.abs(out[0] - out[1]).max() > 1e-6
    assert len(model.losses) == 1  # the head's L1L2 penalty


def test_gradients_reach_every_backbone_variable(fitted):
    model, _ = fitted
    backbone = model.get_layer("backbone")
    x, y = _data(6)
    with tf.GradientTape() as tape:
        loss = keras.losses.categorical_crossentropy(y, model(x, training=True))
    grads = tape.gradient(loss, backbone.trainable_weights)
    missing = [w.name for w, g in zip(backbone.trainable_weights, grads, strict=True) if g is None]
    assert not missing


def test_fit_changes_backbone_head_and_bn_statistics(fitted):
    model, before = fitted
    backbone = model.get_layer("backbone")
    changed = _changed(before["backbone"], backbone.trainable_weights)
    assert sum(changed) > len(changed) // 2, f"{sum(changed)}/{len(changed)} changed"
    assert all(_changed(before["means"], _moving_means(backbone)))  # training=True path
    assert all(_changed(before["head"], model.get_layer("head").trainable_weights))


def test_save_reload_keeps_fine_tuned_weights(fitted, module, tmp_path):
    model, before = fitted
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    backbone = reloaded.get_layer("backbone")
    assert isinstance(backbone, HubLayer) and backbone.handle == str(module.resolve())
    assert backbone._module is not model.get_layer("backbone")._module  # loaded afresh
    for a, b in zip(model.weights, reloaded.weights, strict=True):
        np.testing.assert_array_equal(_np(a), _np(b))
    # The restored values are in the module variables the reloaded layer computes with.
    by_id = {id(v): v for v in backbone._module.variables}
    for w in backbone.weights:
        assert id(w.value) in by_id
    x, _ = _data(3)
    expected = _np(model(x, training=False))
    np.testing.assert_allclose(_np(reloaded(x, training=False)), expected, atol=1e-6)
    features = _np(model.get_layer("backbone")(x, training=False))
    np.testing.assert_allclose(_np(backbone(x, training=False)), features, atol=1e-5, rtol=1e-5)
    # ... and they are the fine-tuned values, not the module's original ones.
    assert any(_changed(before["backbone"], backbone.trainable_weights))


# ---------------------------------------------------------------------------------------------
# Freezing and fine-tuning


def test_frozen_backbone_does_not_change(module):
    model = _compile(_classifier(module, freeze=True))
    backbone = model.get_layer("backbone")
    assert backbone.trainable_weights == []
    all_backbone = _snapshot(backbone.weights)
    head = _snapshot(model.get_layer("head").trainable_weights)
    x, y = _data(4)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert not any(_changed(all_backbone, backbone.weights))  # incl. the BN statistics
    assert all(_changed(head, model.get_layer("head").trainable_weights))


class _RecordBackbone(keras.callbacks.Callback):
    """Snapshots the backbone's weights at the start and at the end of every epoch."""

    def __init__(self):
        super().__init__()
        self.epochs: list[list[np.ndarray]] = []

    def on_train_begin(self, logs=None):
        self.start = _snapshot(self.model.get_layer("backbone").weights)

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(_snapshot(self.model.get_layer("backbone").weights))

    def changed(self, epoch: int) -> list[bool]:
        """Which backbone weights changed during ``epoch``."""
        start = self.start if epoch == 0 else self.epochs[epoch - 1]
        return [not np.array_equal(a, b) for a, b in zip(start, self.epochs[epoch], strict=True)]


def _fit_two_epochs(model, x, y, callback, *, run_eagerly: bool) -> _RecordBackbone:
    """Two epochs of two steps each, with ``callback`` before the recorder."""
    if not model.compiled:
        _compile(model, run_eagerly=run_eagerly)
    record = _RecordBackbone()
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[callback, record])
    return record


def _assert_frozen_then_training(record: _RecordBackbone) -> None:
    assert not any(record.changed(0)), "the backbone changed while frozen"
    changed = record.changed(1)
    assert sum(changed) > len(changed) // 2, f"{sum(changed)}/{len(changed)} changed in epoch 1"


def _tiny_model() -> keras.Model:
    """A 'backbone' sub-model (dense + batch norm) and a head: fast to trace."""
    backbone = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.BatchNormalization(momentum=0.5),
        ],
        name="backbone",
    )
    backbone.trainable = False
    inputs = keras.Input((6,), name="image")
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="head")(backbone(inputs))
    return keras.Model(inputs, outputs)


def _tiny_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.normal(size=(2 * BATCH, 6)).astype("float32"), _data(n=2 * BATCH)[1]


class _NaiveUnfreeze(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            self.model.get_layer("backbone").trainable = True


def test_naive_unfreeze_does_nothing_in_graph_mode():
    """Why FineTuneAfter retraces: setting ``trainable`` alone leaves the traced step as it was.

    This documents Keras 3's behaviour; if it fails, Keras changed and FineTuneAfter's retrace
    may be unnecessary (but harmless).
    """
    model = _tiny_model()
    record = _fit_two_epochs(model, *_tiny_data(), _NaiveUnfreeze(), run_eagerly=False)
    assert model.get_layer("backbone").trainable
    assert not any(record.changed(1))


@pytest.mark.parametrize("prebuild", [True, False], ids=["prebuilt-optimizer", "lazy"])
def test_fine_tune_after_graph_mode(prebuild):
    """Compiled train steps: the unfreeze retraces and the optimizer knows the new variables."""
    model = _compile(_tiny_model(), run_eagerly=False)
    if prebuild:
        build_optimizer_for_fine_tuning(model)
        assert len(model.optimizer.variables) > 2 + 2 * len(model.trainable_variables)
    optimizer = model.optimizer
    callback = FineTuneAfter(1)
    record = _fit_two_epochs(model, *_tiny_data(), callback, run_eagerly=False)
    assert callback.unfrozen_at == 1 and model.get_layer("backbone").trainable
    _assert_frozen_then_training(record)
    if prebuild:  # kept, with the head's optimizer state
        assert model.optimizer is optimizer
    assert int(_np(model.optimizer.iterations)) == 4


def test_fine_tune_after_resumed_past_the_epoch():
    model = _compile(_tiny_model(), run_eagerly=False)
    callback = FineTuneAfter(1)
    model.fit(
        *_tiny_data(), batch_size=BATCH, epochs=3, initial_epoch=2, verbose=0, callbacks=[callback]
    )
    assert callback.unfrozen_at == 2


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 2:
            raise KeyboardInterrupt


def test_fine_tune_after_resumes_with_backup_and_restore(tmp_path):
    """With the optimizer prebuilt, a run interrupted after the unfreeze resumes its state."""
    backup = str(tmp_path / "backup")

    def fit(model, extra):
        _compile(model, run_eagerly=False)
        build_optimizer_for_fine_tuning(model)
        callbacks = [keras.callbacks.BackupAndRestore(backup), FineTuneAfter(1), *extra]
        return model.fit(*_tiny_data(), batch_size=BATCH, epochs=5, verbose=0, callbacks=callbacks)

    with pytest.raises(KeyboardInterrupt):
        fit(_tiny_model(), [_Interrupt()])  # 3 epochs x 2 steps done
    model = _tiny_model()
    history = fit(model, [])
    assert len(history.history["loss"]) == 2  # epochs 3 and 4
    assert model.get_layer("backbone").trainable
    # The optimizer state (and the step count that drives the learning-rate schedule) came back.
    assert int(_np(model.optimizer.iterations)) == 10


def test_fine_tune_after_needs_the_layer():
    inputs = keras.Input((6,))
    model = _compile(keras.Model(inputs, keras.layers.Dense(2, name="head")(inputs)))
    with pytest.raises(ModelError, match="no layer 'backbone'"):
        model.fit(
            *_tiny_data()[:1], np.zeros((2 * BATCH, 2)), verbose=0, callbacks=[FineTuneAfter(1)]
        )


def test_fine_tune_after_hub(module):
    model = _classifier(module, freeze=True)
    _assert_frozen_then_training(
        _fit_two_epochs(model, *_data(5, n=2 * BATCH), FineTuneAfter(1), run_eagerly=True)
    )


def test_fine_tune_after_keras_applications():
    model = build_mobilenetv2_classifier(
        (SIZE, SIZE, 3), CLASSES, alpha=ALPHA, freeze_backbone=True
    )
    _assert_frozen_then_training(
        _fit_two_epochs(model, *_data(5, n=2 * BATCH), FineTuneAfter(1), run_eagerly=True)
    )


# ---------------------------------------------------------------------------------------------
# keras.applications backbone with a local weights file


def test_keras_applications_local_weights(tmp_path):
    source = build_mobilenetv2_classifier((SIZE, SIZE, 3), CLASSES, alpha=ALPHA)
    path = tmp_path / "backbone.weights.h5"
    source.get_layer("backbone").save_weights(path)
    loaded = build_mobilenetv2_classifier((SIZE, SIZE, 3), CLASSES, alpha=ALPHA, weights=str(path))
    other = build_mobilenetv2_classifier((SIZE, SIZE, 3), CLASSES, alpha=ALPHA)
    want = source.get_layer("backbone").weights
    got = loaded.get_layer("backbone").weights
    assert len(got) == len(want)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(_np(a), _np(b))
    # A randomly initialised backbone differs: the comparison above can fail.
    assert any(
        not np.array_equal(_np(a), _np(b))
        for a, b in zip(want, other.get_layer("backbone").weights, strict=True)
    )


def test_keras_applications_missing_weights_file(tmp_path):
    with pytest.raises(ModelError, match="missing.weights.h5"):
        build_mobilenetv2_classifier(
            (SIZE, SIZE, 3), CLASSES, weights=str(tmp_path / "missing.weights.h5")
        )


def test_keras_applications_alpha_and_regularisers():
    model = build_mobilenetv2_classifier((SIZE, SIZE, 3), CLASSES, alpha=ALPHA, l1=1e-3, l2=0.0)
    assert model.get_layer("backbone").output_shape[-1] == FEATURES
    assert model.get_layer("backbone").name == "backbone"
    assert len(model.losses) == 1
    reg = model.get_layer("head").kernel_regularizer
    assert isinstance(reg, keras.regularizers.L1L2)
    assert reg.l1 == pytest.approx(1e-3) and reg.l2 == 0.0
