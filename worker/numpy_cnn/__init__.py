"""A convolutional network written from scratch in NumPy: layers with explicit backward
passes, softmax cross-entropy, Adam/AdaMax, and the default CNN of the ``numpy-cnn`` model.

NumPy is the only dependency (torch appears in the tests, as the reference)."""

from labctl.worker.numpy_cnn.layers import Conv2D, Flatten, Layer, Linear, MaxPool2D, ReLU, Sigmoid
from labctl.worker.numpy_cnn.losses import softmax_cross_entropy
from labctl.worker.numpy_cnn.model import Sequential, build_default_cnn
from labctl.worker.numpy_cnn.optim import Adam, AdaMax, Optimizer

__all__ = ["AdaMax", "Adam", "Conv2D", "Flatten", "Layer", "Linear", "MaxPool2D", "Optimizer",
           "ReLU", "Sequential", "Sigmoid", "build_default_cnn", "softmax_cross_entropy"]
