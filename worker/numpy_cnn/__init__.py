"""A convolutional network written from scratch in NumPy: layers with explicit backward
passes, softmax cross-entropy, Adam/AdaMax, and the default CNN of the ``numpy-cnn`` model.

NumPy is the only dependency (torch appears in the tests, as the reference)."""

from .layers import Conv2D, Flatten, Layer, Linear, MaxPool2D, ReLU, Sigmoid
from .losses import softmax_cross_entropy
from .model import Sequential, build_default_cnn
from .optim import Adam, AdaMax, Optimizer

__all__ = ["AdaMax", "Adam", "Conv2D", "Flatten", "Layer", "Linear", "MaxPool2D", "Optimizer",
           "ReLU", "Sequential", "Sigmoid", "build_default_cnn", "softmax_cross_entropy"]
