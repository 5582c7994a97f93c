"""The onnxruntime noise plugin: programmed weights per draw through IO binding, per-MVM effects in-graph.

:class:`OrtNoiseRunner` owns one session whose analog weights are overridable graph inputs. Each
analog tensor is bound once to a numpy buffer (zero-copy ``OrtValue``); a draw (:meth:`program`)
overwrites the buffers in place with the weights programmed by the *torch simulator*
(``simulator.program_weight`` with ``noise.tensor_generator(seed, name)``, exactly as
``noise.apply_chip_noise`` does), so the weights ORT computes with are bit-identical to the torch
model's for the same seed and no session is rebuilt. When the profile has per-MVM effects (DAC/ADC,
out_noise, w_noise) the session runs the standard-op body of ``analog_op.mvm_function`` instead of the
ideal one, fed with the clean-weight digital scales of the profile (as noise.py fixes them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch
from onnx import ModelProto

from cimconvert.noise import tensor_generator
from cimconvert.onnx import analog_op
from cimconvert.onnx.analog_op import SCALES_SUFFIX
from cimconvert.onnx.export import clean_scales
from cimconvert.profiles.schema import ChipProfile
from cimconvert.runtime.session import initializer_arrays, make_session, prepare_model
from cimconvert.simulator import program_weight


@dataclass(frozen=True)
class AnalogTensor:
    """An analog tensor of a graph: initializer name and layout (what ``apply_chip_noise`` needs)."""

    name: str
    layout: str


def analog_tensors(model: ModelProto) -> list[AnalogTensor]:
    """Analog tensors of an exported graph, in node order (AnalogMatMul nodes + weight-only ones)."""
    import json

    from cimconvert.onnx.metadata import read_metadata

    seen: dict[str, str] = {}
    for node in analog_op.analog_nodes(model):
        attrs = analog_op.node_attrs(node)
        seen.setdefault(str(attrs["tensor"]), str(attrs["layout"]))
    meta = read_metadata(model)
    layouts = {a["tensor"]: a["layout"] for a in json.loads(meta.get("analog_tensors", "[]"))}
    for name in json.loads(meta.get("weight_only", "[]")):
        seen.setdefault(name, layouts.get(name, "out_in"))
    return [AnalogTensor(n, lay) for n, lay in seen.items()]


def programmed(clean: np.ndarray, layout: str, profile: ChipProfile, seed: int, name: str) -> np.ndarray:
    """The torch simulator's programmed copy of one clean weight for ``seed`` (noise.py's generator)."""
    w = torch.from_numpy(clean)
    noisy = program_weight(w, profile, tensor_generator(seed, name, w.device), layout)  # type: ignore[arg-type]
    return noisy.numpy()


class OrtNoiseRunner:
    """A session with IO-bound analog weights: ``program(seed)`` / ``clean()`` then ``logits(ids)``."""

    def __init__(
        self,
        model: ModelProto,
        profile: ChipProfile,
        tensors: Sequence[AnalogTensor] | None = None,
        threads: int = 1,
        mvm: bool | None = None,
        noise_seed: int = 0,
    ) -> None:
        self.profile = profile
        self.tensors = list(tensors if tensors is not None else analog_tensors(model))
        self.mvm = profile.mvm.active and not profile.is_ideal if mvm is None else mvm
        names = [t.name for t in self.tensors]
        self.clean_weights = initializer_arrays(model, names)
        bound = dict(self.clean_weights)
        if self.mvm:
            bound.update(self._scales(model))
        prepared = prepare_model(model, list(bound), profile if self.mvm else None, noise_seed)
        self.session = make_session(prepared, threads)
        self.buffers = {name: np.array(value, copy=True) for name, value in bound.items()}
        self.binding = self.session.io_binding()
        for name, buffer in self.buffers.items():
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buffer))
        self.seed: int | None = None

    def _scales(self, model: ModelProto) -> dict[str, np.ndarray]:
        """Clean-weight digital scales under ``self.profile`` for every AnalogMatMul's S input."""
        present = {t.name for t in model.graph.initializer}
        out: dict[str, np.ndarray] = {}
        for tensor in self.tensors:
            key = tensor.name + SCALES_SUFFIX
            if key in present:
                w = torch.from_numpy(self.clean_weights[tensor.name])
                out[key] = clean_scales(w, tensor.layout, self.profile).numpy()
        return out

    def program(self, seed: int) -> dict[str, np.ndarray]:
        """Write the weights programmed with ``seed`` into the bound buffers; returns them (views)."""
        for tensor in self.tensors:
            clean = self.clean_weights[tensor.name]
            noisy = programmed(clean, tensor.layout, self.profile, seed, tensor.name)
            np.copyto(self.buffers[tensor.name], noisy)
        self.seed = seed
        return {t.name: self.buffers[t.name] for t in self.tensors}

    def clean(self) -> None:
        """Bind the clean weights again (per-MVM effects, if any, stay on)."""
        for tensor in self.tensors:
            np.copyto(self.buffers[tensor.name], self.clean_weights[tensor.name])
        self.seed = None

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits for one batch ``[batch, seq]`` with the currently bound weights."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.ascontiguousarray(attention_mask, np.int64)
        self.binding.bind_cpu_input("input_ids", ids)
        self.binding.bind_cpu_input("attention_mask", mask)
        self.binding.bind_output("logits")
        self.session.run_with_iobinding(self.binding)
        return self.binding.copy_outputs_to_cpu()[0]


class OrtCausalLM:
    """Adapter with the ``model(input_ids=..., use_cache=False).logits`` interface of an HF model.

    Lets ``evaluation.perplexity`` score an onnxruntime session (plain or :class:`OrtNoiseRunner`)
    with exactly the same windows and arithmetic as the torch model.
    """

    @dataclass
    class Output:
        """Mimics ``CausalLMOutput.logits``."""

        logits: torch.Tensor

    def __init__(self, run: OrtNoiseRunner | ort.InferenceSession) -> None:
        self.run = run

    def eval(self) -> OrtCausalLM:
        """No-op (perplexity() calls model.eval())."""
        return self

    def __call__(self, input_ids: torch.Tensor, **_: object) -> OrtCausalLM.Output:
        ids = input_ids.numpy().astype(np.int64)
        if isinstance(self.run, OrtNoiseRunner):
            logits = self.run.logits(ids)
        else:
            logits = self.run.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        return OrtCausalLM.Output(torch.from_numpy(logits))


def clean_session(model: ModelProto, threads: int = 1) -> ort.InferenceSession:
    """The ideal digital model as a plain session (constant weights, fully optimised)."""
    return make_session(model, threads)


def bound_equal(bound: Mapping[str, np.ndarray], reference: Mapping[str, torch.Tensor]) -> bool:
    """Whether every bound buffer is bit-identical to the reference tensor of the same name."""
    return all(
        np.array_equal(bound[name].view(np.uint32), reference[name].detach().cpu().numpy().view(np.uint32))
        for name in bound
    )
