"""onnxruntime helpers: sessions for exported graphs and the chip-noise plugin (IO-bound weights)."""

from cimconvert.runtime.ort_noise import AnalogTensor, OrtCausalLM, OrtNoiseRunner, analog_tensors, programmed
from cimconvert.runtime.session import load_model, make_session, prepare_model, session_options

__all__ = [
    "AnalogTensor",
    "OrtCausalLM",
    "OrtNoiseRunner",
    "analog_tensors",
    "load_model",
    "make_session",
    "prepare_model",
    "programmed",
    "session_options",
]
