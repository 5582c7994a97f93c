"""ONNX export with explicit analog ops (``ai.cimconvert.AnalogMatMul`` local functions)."""

from cimconvert.onnx.analog_op import DOMAIN, OP_TYPE, AnalogSpec, ideal_function, mvm_functions
from cimconvert.onnx.export import ExportResult, build_onnx, export_bundle_onnx, export_model

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "AnalogSpec",
    "ExportResult",
    "build_onnx",
    "export_bundle_onnx",
    "export_model",
    "ideal_function",
    "mvm_functions",
]
