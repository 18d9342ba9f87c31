"""Monte-Carlo dropout: predictive mean, variance and a per-case uncertainty score.

MC dropout (Gal & Ghahramani 2016) runs the trained network ``n`` times with its dropout layers
*active* and everything else as at inference, and reads the spread of the ``n`` outputs as the
model's uncertainty. Batch norm must stay in inference mode (moving statistics): calling the model
with ``training=True`` would switch on dropout but also make batch norm normalise with the
statistics of the current batch, which changes the prediction itself (and with a batch of one
image, destroys it).

:func:`mc_dropout_model` therefore builds a second model that *shares* the original's layers and
weights, except that every dropout-type layer is replaced by an :class:`MCDropout` wrapper whose
``call`` always applies dropout, whatever ``training`` flag it gets. The MC model is called with
``training=False`` (also what ``model(x)`` and ``model.predict`` do), so batch norm uses its
moving statistics and does not update them.

Formulas (``p_s``: output of pass ``s`` of ``n``; ``K``: output channels/classes)::

    mean      = 1/n * sum_s p_s                                 (per pixel and channel / class)
    variance  = 1/n * sum_s (p_s - mean)**2                     (population variance, >= 0)

* segmentation (output ``[N, H, W, K]``): ``variance_map = mean over the K channels of variance``
  (for a sigmoid head, the variance of the foreground probability; for a 2-class softmax the two
  channels have equal variance, so the value is the same). The predicted foreground is
  ``mean[..., 0] > threshold`` (K = 1) or ``argmax(mean) > 0`` (K >= 2), and the per-case score is
  ``uncertainty = mean of variance_map over the predicted foreground pixels``, or over the whole
  image when nothing is predicted. A probability's variance is at most 0.25.
* classification (output ``[N, K]``): ``uncertainty = predictive entropy of the mean
  = -sum_k mean_k * ln(mean_k)`` in nats (0 .. ln K); also returned: ``mutual_information =
  entropy(mean) - 1/n * sum_s entropy(p_s)`` (the part of the entropy due to the model's
  uncertainty, BALD).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from medseg.data.preprocess import Preprocessing
from medseg.errors import ConfigError, ModelError

#: the dropout-type layers that MC dropout switches on (``SpatialDropout*`` subclass ``Dropout``).
DROPOUT_TYPES = (layers.Dropout, layers.GaussianDropout, layers.AlphaDropout)

NO_DROPOUT = "MC-dropout needs dropout; the model has none"

_EPS = 1e-12


@keras.saving.register_keras_serializable(package="medseg")
class MCDropout(layers.Layer):
    """A dropout-type layer that drops at every call, in training and inference alike.

    Wraps a fresh copy of ``layer`` (a :data:`DROPOUT_TYPES` instance, or its serialized config)
    and runs its ``call`` with ``training=True``; no other layer is affected.
    """

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        if isinstance(layer, dict):
            layer = keras.saving.deserialize_keras_object(layer)
        if not isinstance(layer, DROPOUT_TYPES):
            raise ModelError(f"MCDropout wraps a dropout layer, got {type(layer).__name__}")
        self.layer = layer
        self.supports_masking = True

    def call(self, inputs, training=None):
        # The wrapped layer's `call`, not `__call__`: `Layer.__call__(training=True)` would also
        # set Keras' shared call context to training, and the layers called after this one with
        # no explicit `training` (batch norm when the model is called as `model(x)`) would then
        # normalise with batch statistics and update their moving statistics.
        return self.layer.call(inputs, training=True)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "layer": keras.saving.serialize_keras_object(self.layer)}


def _all_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every layer tracked inside ``model`` (nested models and layers too), not inside MCDropout."""
    out, seen = [], set()
    stack = list(model._flatten_layers(include_self=False, recursive=False))
    while stack:
        layer = stack.pop(0)
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        out.append(layer)
        if not isinstance(layer, MCDropout):
            stack.extend(layer._flatten_layers(include_self=False, recursive=False))
    return out


def _active_dropout(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    return [
        la
        for la in _all_layers(model)
        if isinstance(la, DROPOUT_TYPES) and not isinstance(la, MCDropout) and la.rate > 0
    ]


def _mc_layers(model: keras.layers.Layer) -> list[MCDropout]:
    return [la for la in _all_layers(model) if isinstance(la, MCDropout)]


def is_mc_model(model) -> bool:
    """Whether ``model`` was built by :func:`mc_dropout_model` (holds :class:`MCDropout`)."""
    return isinstance(model, keras.Model) and bool(_mc_layers(model))


def _clone_with_mc(model: keras.Model) -> keras.Model:
    def clone(layer):
        if isinstance(layer, DROPOUT_TYPES) and layer.rate > 0:
            fresh = layer.__class__.from_config({**layer.get_config(), "name": f"{layer.name}_mc"})
            return MCDropout(fresh, name=layer.name)
        if isinstance(layer, keras.Model) and _active_dropout(layer):
            return _clone_with_mc(layer)  # a nested model with dropout inside
        return layer  # shared: same object, same weights, same batch-norm statistics

    try:
        return keras.models.clone_model(model, clone_function=clone)
    except ValueError as e:  # a subclassed model: its layers are not a graph that can be rewired
        raise ModelError(
            f"MC-dropout needs a functional or sequential Keras model; '{model.name}' "
            f"({type(model).__name__}) cannot be rewired: {str(e).splitlines()[0]}"
        ) from None


def mc_dropout_model(model: keras.Model) -> keras.Model:
    """The same network with every dropout layer active at inference, all else in inference mode.

    The returned model shares every other layer (and so every weight and batch-norm statistic)
    with ``model``; its dropout-type layers (rate > 0, nested models included) are
    :class:`MCDropout` wrappers. Call it with ``training=False`` (or without ``training``): batch
    norm then uses its moving statistics and dropout still drops. Works for functional models
    (including subclasses that build a functional graph, like :class:`medseg.models.unet.UNet`,
    which come back as plain functional models) and sequential ones.

    Raises:
        ModelError: the model has no dropout layer with rate > 0, is a subclassed model, or holds
            dropout inside a custom layer that cannot be rewired.
    """
    if is_mc_model(model):
        return model
    dropout = _active_dropout(model)
    if not dropout:
        raise ModelError(f"{NO_DROPOUT} (model '{model.name}')")
    mc = _clone_with_mc(model)
    replaced = {la.name for la in _mc_layers(mc)}
    missed = [la.name for la in _active_dropout(mc)]
    if missed or len(replaced) < len({la.name for la in dropout}):
        raise ModelError(
            f"MC-dropout could not reach every dropout layer of '{model.name}' (inside custom "
            f"layers?): {', '.join(missed) or 'some layers'} stay inactive"
        )
    return mc


# The MC model of each original model and the compiled sampling function of each MC model, so
# that repeated calls (one per case in `medseg predict`) neither rebuild nor retrace. Values hold
# no strong reference to their key.
_MC_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sampler(model: keras.Model) -> tuple[keras.Model, Callable]:
    if is_mc_model(model):
        mc = model
    else:
        if model not in _MC_MODELS:
            _MC_MODELS[model] = mc_dropout_model(model)
        mc = _MC_MODELS[model]
    if mc not in _SAMPLERS:
        ref = weakref.ref(mc)
        _SAMPLERS[mc] = tf.function(lambda x: ref()(x, training=False), reduce_retracing=True)
    return mc, _SAMPLERS[mc]


def _reseed(mc: keras.Model, seed: int, member: int = 0) -> None:
    """Put every MC dropout layer's random state at a value derived from ``seed``, the ensemble
    member and the layer (distinct for each)."""
    for i, la in enumerate(_mc_layers(mc)):
        gen = getattr(la.layer, "seed_generator", None)
        if gen is not None:
            start = np.random.SeedSequence([int(seed), member, i]).generate_state(1)[0]
            gen.state.assign(np.array([int(start), 0], gen.state.dtype))


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats over the last axis; a single sigmoid output counts as [1 - p, p]."""
    if p.shape[-1] == 1:
        p = np.concatenate([1 - p, p], axis=-1)
    return -(p * np.log(np.clip(p, _EPS, 1.0))).sum(-1)


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """``-sum_k p_k ln p_k`` (nats) of class probabilities ``[..., K]`` -> ``[...]``."""
    return _entropy(np.asarray(probs, np.float64)).astype(np.float32)


def foreground_mask(mean: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Predicted foreground of segmentation probabilities ``[..., K]`` -> bool ``[...]``."""
    mean = np.asarray(mean)
    if mean.shape[-1] == 1:
        return mean[..., 0] > threshold
    return mean.argmax(-1) > 0


def segmentation_uncertainty(variance_map: np.ndarray, foreground: np.ndarray) -> float:
    """Mean of ``variance_map`` over the ``foreground`` pixels, or over all of it when empty.

    Any shape (one image, or all slices of a volume for one score per volume).
    """
    variance_map = np.asarray(variance_map, np.float64)
    foreground = np.asarray(foreground, bool)
    if variance_map.shape != foreground.shape:
        raise ModelError(
            f"variance map {variance_map.shape} and foreground {foreground.shape} differ in shape"
        )
    sel = variance_map[foreground] if foreground.any() else variance_map
    return float(sel.mean()) if sel.size else 0.0


def uncertainty_display(variance_map: np.ndarray) -> np.ndarray:
    """A variance map scaled to [0, 1] for pictures: ``2 * std`` (a probability's std <= 0.5)."""
    return np.clip(2.0 * np.sqrt(np.maximum(np.asarray(variance_map, np.float32), 0)), 0, 1)


def mc_predict(
    model_or_fn,
    images,
    n_samples: int,
    seed: int = 0,
    *,
    batch_size: int | None = None,
    threshold: float = 0.5,
    prep: Preprocessing | dict | None = None,
) -> dict:
    """Mean and variance of ``n_samples`` MC-dropout passes, and a per-case uncertainty score.

    Args:
        model_or_fn: a Keras model (its MC-dropout version is built once and cached, see
            :func:`mc_dropout_model`; a model from :func:`mc_dropout_model` is used as is); a
            list of Keras models (an ensemble: ``n_samples`` passes of each, pooled, so the
            variance includes the members' disagreement); or a callable
            ``images -> probabilities`` that is already stochastic (``seed`` is not applied).
        images: float ``[N, H, W, C]`` model inputs, or raw pixels when ``prep`` is given.
        n_samples: number of stochastic passes (>= 2), per ensemble member.
        seed: seed of the dropout masks: the same seed gives the same result.
        batch_size: images per pass (all at once when None).
        threshold: foreground threshold of a one-channel (sigmoid) segmentation output.
        prep: the model's :class:`~medseg.data.preprocess.Preprocessing` (or its fields as a
            dict): ``images`` are raw pixels, normalised and resized in the same way as for
            training, and segmentation ``mean``/``variance`` are mapped back to the input size
            (bilinear).

    Returns:
        ``mean`` and ``variance`` (float32, shape of the model output), ``samples_used``,
        ``uncertainty`` (float32 ``[N]``, see the module docstring for the formulas) and
        ``task`` (``segmentation`` or ``classification``); segmentation adds ``variance_map``
        (float32 ``[N, H, W]``) and ``foreground`` (bool ``[N, H, W]``); classification adds
        ``mutual_information`` (float32 ``[N]``).

    Raises:
        ConfigError: ``n_samples < 2``.
        ModelError: the model has no dropout, or its output is neither ``[N, K]`` nor
            ``[N, H, W, K]``.
    """
    if int(n_samples) < 2:
        raise ConfigError(f"MC-dropout needs n_samples >= 2, got {n_samples}")
    n_samples = int(n_samples)
    if isinstance(prep, dict):
        prep = Preprocessing(**prep)
    x = tf.convert_to_tensor(images, tf.float32)
    raw_hw = tf.shape(x)[1:3]
    if prep is not None:
        x = prep.apply(x)
    fns = _sampling_functions(model_or_fn, seed)
    step = int(batch_size) if batch_size else max(int(x.shape[0]), 1)
    total = total_sq = ent = None
    for fn in [f for f in fns for _ in range(n_samples)]:
        p = np.concatenate(
            [
                np.asarray(keras.ops.convert_to_numpy(fn(x[i : i + step])), np.float64)
                for i in range(0, int(x.shape[0]), step)
            ]
        )
        if total is None:
            total, total_sq = np.zeros_like(p), np.zeros_like(p)
            ent = np.zeros(p.shape[:1] if p.ndim == 2 else (), np.float64)
        total += p
        total_sq += p * p
        if p.ndim == 2:
            ent += _entropy(p)
    n_samples *= len(fns)
    mean = total / n_samples
    variance = np.maximum(total_sq / n_samples - mean * mean, 0.0)
    out: dict = {"samples_used": n_samples}
    if mean.ndim == 2:
        h = _entropy(mean)
        out.update(
            task="classification",
            uncertainty=h.astype(np.float32),
            mutual_information=np.maximum(h - ent / n_samples, 0.0).astype(np.float32),
        )
    elif mean.ndim == 4:
        if prep is not None:
            mean = prep.restore(tf.constant(mean, tf.float32), raw_hw).numpy()
            variance = prep.restore(tf.constant(variance, tf.float32), raw_hw)
            variance = np.maximum(variance.numpy(), 0.0)
        out.update(_segmentation_scores(variance, mean, threshold))
    else:
        raise ModelError(
            f"mc_predict: model output of shape {mean.shape} is neither [N, K] (classification) "
            "nor [N, H, W, K] (segmentation)"
        )
    out.update(mean=mean.astype(np.float32), variance=variance.astype(np.float32))
    return out


def _sampling_functions(model_or_fn, seed: int) -> list[Callable]:
    """The stochastic functions of :func:`mc_predict`'s ``model_or_fn``, seeded."""
    if isinstance(model_or_fn, keras.Model):
        model_or_fn = [model_or_fn]
    if isinstance(model_or_fn, (list, tuple)) and model_or_fn:
        fns = []
        for j, model in enumerate(model_or_fn):
            if not isinstance(model, keras.Model):
                raise ModelError(f"mc_predict: ensemble member {j} is not a Keras model")
            mc, fn = _sampler(model)
            _reseed(mc, seed, j)
            fns.append(fn)
        return fns
    if callable(model_or_fn) and not isinstance(model_or_fn, (list, tuple)):
        return [model_or_fn]
    raise ModelError(
        f"mc_predict needs a Keras model, a list of them or a callable, got {model_or_fn!r}"
    )


def _segmentation_scores(variance: np.ndarray, mean: np.ndarray, threshold: float) -> dict:
    """``variance_map``, ``foreground`` and per-image ``uncertainty`` of segmentation passes."""
    vmap = variance.mean(-1)
    fg = foreground_mask(mean, threshold)
    return {
        "task": "segmentation",
        "variance_map": vmap.astype(np.float32),
        "foreground": fg,
        "uncertainty": np.array(
            [segmentation_uncertainty(v, f) for v, f in zip(vmap, fg, strict=True)], np.float32
        ),
    }
