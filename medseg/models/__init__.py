"""Models, losses and metrics. Importing this package registers medseg's custom Keras objects,
so that ``keras.models.load_model`` can rebuild saved ``.keras`` files."""

from medseg.models import fold, losses, metrics, unet  # noqa: F401  (registration side effects)
from medseg.models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
