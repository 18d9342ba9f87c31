"""medseg: medical image segmentation and classification on TensorFlow/Keras.

Conventions used everywhere in medseg:

* Images are float32 arrays, channels last: HxWxC for 2D images, DxHxWxC for volumes, batches NHWC.
  The channel axis is never squeezed away (a grey image is HxWx1).
* Masks are integer label maps (0 is background), HxW or DxHxW.
"""

__version__ = "0.1.0"
