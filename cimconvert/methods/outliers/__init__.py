"""Outlier input channels kept digital (``outlier_channels``): the few input channels of each analog linear
layer with the largest calibration activations run in a small digital matmul; the crossbar gets the rest.

Importing this package registers the method. The split layer and its bundle loader live in
:mod:`cimconvert.transforms.outlier_split`.
"""

from cimconvert.methods.base import register_layerwise, register_method
from cimconvert.methods.outliers.layerwise import outlier_layer_step
from cimconvert.methods.outliers.method import OutlierChannelsMethod, channel_maxima, split_outliers

METHOD = register_method(OutlierChannelsMethod())
register_layerwise(METHOD.name, outlier_layer_step)

__all__ = ["OutlierChannelsMethod", "channel_maxima", "split_outliers"]
