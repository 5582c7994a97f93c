"""The onnxruntime noise plugin: programmed weights per draw through IO binding, per-MVM effects in-graph.

:class:`OrtNoiseRunner` owns one session whose weight inputs are bound once to numpy buffers
(zero-copy ``OrtValue``); a draw (:meth:`OrtNoiseRunner.program`) overwrites the buffers in place, so
no session is rebuilt. The weights are programmed by the *torch simulator*
(``simulator.program_weight`` with ``simulator.rng.tensor_generator(seed, name)``, exactly as
``analog.apply_chip_noise`` does), so they are bit-identical to the torch model's for the same seed.

* Programmed weights only (``mvm=False``, or a profile without per-MVM effects): the analog
  initializers are overridable graph inputs fed with the programmed weights; the ideal body runs.
* Per-MVM effects (DAC/ADC, out_noise, w_noise): each AnalogMatMul runs a per-MVM body
  (``analog_op.mvm_functions``) whose weight inputs are bound to the output of
  ``simulator.prepare_mvm(programmed, profile, layout, clean scales)`` — the same prepared weights
  the simulator kernel computes — refreshed once per draw, so a call does only DAC → matmul → noise → ADC.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import ModelProto

from cimconvert.onnx import analog_op
from cimconvert.onnx.metadata import read_metadata
from cimconvert.profiles.schema import ChipProfile
from cimconvert.runtime.session import (
    MvmInput,
    initializer_protos,
    initializer_value,
    make_session,
    mvm_inputs,
    prepare_model,
)
from cimconvert.simulator import prepare_mvm, program_weight
from cimconvert.simulator.program import clean_scales
from cimconvert.simulator.rng import CounterClock, tensor_generator


@dataclass(frozen=True)
class AnalogTensor:
    """An analog tensor of a graph: initializer name and layout (what ``apply_chip_noise`` needs)."""

    name: str
    layout: str


def analog_tensors(model: ModelProto) -> list[AnalogTensor]:
    """Analog tensors of an exported graph, in node order (AnalogMatMul nodes + weight-only ones)."""
    import json

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
    """The torch simulator's programmed copy of one clean weight for ``seed`` (same generator as torch)."""
    w = torch.from_numpy(clean)
    noisy = program_weight(w, profile, tensor_generator(seed, name), layout)  # type: ignore[arg-type]
    return noisy.numpy()


class OrtNoiseRunner:
    """A session with IO-bound analog weights: ``program(seed)`` / ``clean()`` then ``logits(ids)``.

    ``model`` may be loaded without its external data (``load_model(path, external_data=False)``);
    then pass ``external_dir`` (the folder of the ``.onnx`` file): onnxruntime reads the other
    initializers from there and the clean analog weights are read from the data file when needed
    (once per draw), so the runner keeps no copy of them. ``copy=False`` rewrites ``model`` in place
    (it is then the runtime variant) instead of copying it. ``mvm_noise``: ``native``
    (``RandomNormalLike`` seeded from ``noise_seed``) or ``counter`` (the counter generator, keyed by
    the programming seed and the number of runs since :meth:`program`/:meth:`clean`). ``arena``:
    onnxruntime's CPU memory arena (off: lower resident memory between runs).
    """

    def __init__(
        self,
        model: ModelProto,
        profile: ChipProfile,
        tensors: Sequence[AnalogTensor] | None = None,
        threads: int = 1,
        mvm: bool | None = None,
        noise_seed: int = 0,
        mvm_noise: str = "native",
        external_dir: str | Path | None = None,
        copy: bool = True,
        arena: bool = True,
    ) -> None:
        self.profile = profile
        self.noise_seed = noise_seed
        self.tensors = list(tensors if tensors is not None else analog_tensors(model))
        self.mvm = profile.mvm.active and not profile.is_ideal if mvm is None else mvm
        names = [t.name for t in self.tensors]
        self.external_dir = Path(external_dir) if external_dir is not None else None
        self._clean_protos = initializer_protos(model, names)
        mvm_profile = profile if self.mvm else None
        prepared = prepare_model(model, names, mvm_profile, noise_seed, mvm_noise, copy=copy)
        declared = {i.name for i in prepared.graph.input}
        #: counter mode: the run key of the current forward, bound once and rewritten in place per run.
        self.counter = analog_op.NOISE_KEY_INPUT in declared
        self.clock = CounterClock(noise_seed)
        #: analog tensors read directly by the graph (all of them without per-MVM effects).
        self.raw = [t.name for t in self.tensors if t.name in declared]
        #: tensor → the per-MVM inputs its prepared weights feed.
        self.mvm_inputs: dict[str, list[MvmInput]] = {}
        for spec in mvm_inputs(prepared):
            self.mvm_inputs.setdefault(spec.tensor, []).append(spec)
        self.scales = {name: self._clean_scales(name) for name in self.mvm_inputs}
        self.buffers = {name: self.clean_weight(name) for name in self.raw}
        for specs in self.mvm_inputs.values():
            for spec in specs:
                self.buffers[spec.weight] = np.zeros(spec.weight_shape, np.float32)
                self.buffers[spec.scales] = np.zeros(spec.scales_shape, np.float32)
                if spec.abs_weight:
                    self.buffers[spec.abs_weight] = np.zeros(spec.weight_shape, np.float32)
        if self.counter:
            self.buffers[analog_op.NOISE_KEY_INPUT] = np.zeros(3, np.uint32)
        self.session = make_session(prepared, threads, self.external_dir, arena)
        #: the per-MVM nodes (copies) and local functions, for :meth:`node_output`.
        self.mvm_nodes = [_copy_node(n) for n in prepared.graph.node if n.op_type in analog_op.MVM_OPS]
        self._functions = list(prepared.functions)
        self._opsets = list(prepared.opset_import)
        self._threads = threads
        del prepared
        self.binding = self.session.io_binding()
        for name, buffer in self.buffers.items():
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buffer))
        self.seed: int | None = None
        self.clean()

    def clean_weight(self, name: str) -> np.ndarray:
        """The clean float32 value of analog tensor ``name`` as stored in the graph (a fresh array)."""
        return initializer_value(self._clean_protos[name], self.external_dir)

    def _layout(self, name: str) -> str:
        return next(t.layout for t in self.tensors if t.name == name)

    def _clean_scales(self, name: str) -> torch.Tensor:
        """Digital scales of the clean weight under ``self.profile`` (fixed at mapping, as in torch)."""
        return clean_scales(torch.from_numpy(self.clean_weight(name)), self._layout(name), self.profile)

    def _write(self, name: str, weight: np.ndarray) -> None:
        """Bind ``weight`` (programmed or clean) for tensor ``name``: raw and/or prepared per-MVM inputs."""
        if name in self.raw:
            np.copyto(self.buffers[name], weight)
        specs = self.mvm_inputs.get(name)
        if not specs:
            return
        # a copy: prepare_mvm may scale its ``scales`` argument in place (a view of it, one input tile)
        scales = self.scales[name].clone()
        mw = prepare_mvm(torch.from_numpy(weight), self.profile, self._layout(name), scales)  # type: ignore[arg-type]
        for spec in specs:
            part = mw.expert(spec.expert) if spec.expert >= 0 else mw
            np.copyto(self.buffers[spec.weight], part.weight_t.numpy().reshape(spec.weight_shape))
            np.copyto(self.buffers[spec.scales], part.scales.numpy().reshape(spec.scales_shape))
            if spec.abs_weight and part.abs_weight_t is not None:
                np.copyto(self.buffers[spec.abs_weight], part.abs_weight_t.numpy().reshape(spec.weight_shape))

    def _reset(self, seed: int | None) -> None:
        self.seed = seed
        self.clock = CounterClock(self.noise_seed if seed is None else seed)

    def _program(self, seed: int) -> Iterator[tuple[str, np.ndarray]]:
        """Program and bind every analog tensor for ``seed``, yielding (name, programmed weight)."""
        for tensor in self.tensors:
            noisy = programmed(self.clean_weight(tensor.name), tensor.layout, self.profile, seed, tensor.name)
            self._write(tensor.name, noisy)
            yield tensor.name, noisy
        self._reset(seed)

    def program(self, seed: int) -> dict[str, np.ndarray]:
        """Bind the weights programmed with ``seed`` (and their prepared forms); returns the former."""
        return dict(self._program(seed))

    def program_matches(self, seed: int, reference: Mapping[str, torch.Tensor]) -> bool:
        """Bind the weights programmed with ``seed``; whether each is bit-identical to ``reference[name]``.

        Nothing is kept (each programmed tensor is compared and dropped): the memory-light form of
        ``bound_equal(program(seed), reference)``.
        """
        same = True
        for name, noisy in self._program(seed):
            same &= bound_equal({name: noisy}, reference)
        return same

    def clean(self) -> None:
        """Bind the clean weights again (per-MVM effects, if any, stay on)."""
        for tensor in self.tensors:
            self._write(tensor.name, self.clean_weight(tensor.name))
        self._reset(None)

    def _node_session(self, index: int) -> ort.InferenceSession:
        """A one-node session running per-MVM node ``index`` on its bound inputs (not cached: a few MB
        each, and a large model has hundreds of nodes)."""
        node = self.mvm_nodes[index]
        inputs = [onnx.helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, None)]
        for name in node.input[1:]:
            dtype = onnx.helper.np_dtype_to_tensor_dtype(self.buffers[name].dtype)
            inputs.append(onnx.helper.make_tensor_value_info(name, dtype, self.buffers[name].shape))
        one = onnx.NodeProto()
        one.CopyFrom(node)
        one.input[0], one.output[0] = "X", "Y"
        output = onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)
        graph = onnx.helper.make_graph([one], "node", inputs, [output])
        model = onnx.helper.make_model(graph, opset_imports=self._opsets, functions=self._functions)
        return make_session(model, self._threads, arena=False)

    def node_output(self, index: int, x: np.ndarray, key: Sequence[int] | None = None) -> np.ndarray:
        """Output of per-MVM node ``index`` alone for input ``x``, with the bound weights.

        ``key`` (counter mode): the run key to use (default: the current one). Lets a caller compare
        each analog matmul with the torch simulator on identical inputs and identical noise draws.
        """
        node = self.mvm_nodes[index]
        feeds = {name: self.buffers[name] for name in node.input[1:]}
        if key is not None and analog_op.NOISE_KEY_INPUT in feeds:
            feeds[analog_op.NOISE_KEY_INPUT] = np.array(key, np.uint32)
        feeds["X"] = np.ascontiguousarray(x, np.float32)
        return self._node_session(index).run(["Y"], feeds)[0]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """Run with the bound weights plus ``feeds`` (CPU arrays); returns ``outputs``.

        In counter mode each run is one model forward: the clock ticks and the run key is rewritten.
        """
        if self.counter:
            np.copyto(self.buffers[analog_op.NOISE_KEY_INPUT], np.array(self.clock.tick(), np.uint32))
        for name, value in feeds.items():
            self.binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in outputs:
            self.binding.bind_output(name)
        self.session.run_with_iobinding(self.binding)
        return self.binding.copy_outputs_to_cpu()

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits for one batch ``[batch, seq]`` with the currently bound weights."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.ascontiguousarray(attention_mask, np.int64)
        return self.run({"input_ids": ids, "attention_mask": mask}, ["logits"])[0]


def _copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


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


def bound_equal(bound: Mapping[str, np.ndarray], reference: Mapping[str, torch.Tensor]) -> bool:
    """Whether every bound buffer is bit-identical to the reference tensor of the same name."""
    return all(
        np.array_equal(bound[name].view(np.uint32), reference[name].detach().cpu().numpy().view(np.uint32))
        for name in bound
    )
