"""Declarative architecture adapters: which kind each tensor of a model family is, in memory and on disk.

An adapter is a small class whose attributes *describe* one Hugging Face ``model_type`` (the style of
GPTQModel's model definitions): where the decoder layers live, the names of the attention, MLP, MoE and
SSM projections, how experts are stored (fused 3-D parameters in memory, per-expert keys on disk), and
which config keys hold the expert count, top-k and routing options. From these attributes the base class
derives an ordered list of regex rules, so one function, :meth:`ArchAdapter.classify`, labels both the
in-memory parameter names of a loaded model and the keys of its safetensors checkpoint.

This module imports neither torch nor transformers, so the registry stays cheap to import.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from cimconvert.arch.routing import RoutingRule, Scoring
from cimconvert.errors import ModelInputError
from cimconvert.profiles.schema import MATMUL_KINDS, TensorKind

if TYPE_CHECKING:
    from torch import nn

Family = Literal["moe", "ssm", "dense"]
Layout = Literal["out_in", "in_out", "none"]
ExpertRole = Literal["gate", "up", "down"]

#: Name components that mark a normalisation layer (weight and bias of any norm are kind ``norm``).
_NORM_COMPONENT = r"[^.]*(?:norm|ln_)[^.]*"

#: Parameter names of a layer split by a method into a digital and an analog factor.
SPLIT_FACTOR = re.compile(r"^(.*)\.(analog|digital)\.(weight|bias)$")


@dataclass(frozen=True)
class Rule:
    """One classification rule: a regex on a (layer-local or top-level) name and the kind it assigns."""

    pattern: re.Pattern[str]
    kind: TensorKind
    layout: Layout


@dataclass(frozen=True)
class ExpertKey:
    """Where a per-expert on-disk key lives in the fused in-memory tensor.

    ``memory_name`` is the fused parameter (``...experts.gate_up_proj`` or ``...experts.down_proj``),
    ``expert`` the index along dim 0 and ``role`` the projection; ``gate`` fills rows ``[0:I]`` and
    ``up`` rows ``[I:2I]`` of ``gate_up_proj [E, 2I, H]``.
    """

    memory_name: str
    expert: int
    role: ExpertRole


@dataclass(frozen=True)
class MoeLayer:
    """The MoE modules of one decoder layer of an in-memory model."""

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared_experts: nn.Module | None
    shared_expert_gate: nn.Module | None
    path: str


@dataclass(frozen=True)
class ComplexRope:
    """A rotary embedding built from complex numbers (no ONNX symbolic for them), in the model's module.

    While an ONNX export runs, the instances of ``rotary_class`` and the module's ``apply_function`` (both
    defined in the python module of the adapter's model class) are swapped for the same math on real
    tensors (:mod:`cimconvert.onnx.rope`).
    """

    rotary_class: str
    apply_function: str


@dataclass(frozen=True)
class SsmScan:
    """The scan function of an SSM family (in the model's module), swapped for an exportable one.

    ``kind``: ``selective`` (Mamba recurrence) or ``ssd`` (Mamba2 state-space duality); see
    :mod:`cimconvert.onnx.ssm`.
    """

    function: str
    kind: Literal["selective", "ssd"]


def router_value(router: Any, name: str, default: Any) -> Any:
    """Attribute ``name`` of a router module, or ``default`` where it is missing or None."""
    value = getattr(router, name, None)
    return default if value is None else value


def _alt(names: tuple[str, ...]) -> str:
    """A regex alternation group of literal names."""
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


class ArchAdapter:
    """Base adapter: subclasses set the class attributes below; rules and helpers are derived from them.

    Attribute groups: identity (``model_type``, ``family``, ``model_class``, ``config_builder``), layout of
    the module tree (``layers_path``, ``embeddings``, ``lm_head``, attention/MLP names, ``disk_renames``),
    MoE (block, router, experts, shared experts, the config keys for routing and :meth:`routing_rule`), SSM
    (mixer and projection names, ``ssm_scan``), export patches (``complex_rope``) and the modules whose
    weight the model code reads directly (``weight_only_modules``).
    """

    # identity
    model_type: ClassVar[str]
    family: ClassVar[Family]
    #: causal-LM class: a transformers class name, or ``"module.path:ClassName"``
    model_class: ClassVar[str]
    #: builds the transformers config from a ``config.json`` dict instead of transformers'
    #: ``CONFIG_MAPPING`` (an architecture transformers does not ship): ``"module.path:function"``
    config_builder: ClassVar[str | None] = None

    # module tree
    layers_path: ClassVar[str] = "model.layers"
    embeddings: ClassVar[tuple[str, ...]] = ("embed_tokens",)
    lm_head: ClassVar[str] = "lm_head"
    tie_key: ClassVar[str] = "tie_word_embeddings"
    attention_path: ClassVar[str] = "self_attn"
    attention_projs: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_path: ClassVar[str] = "mlp"
    mlp_projs: ClassVar[tuple[str, ...]] = ("gate_proj", "up_proj", "down_proj")
    #: layout of the attention/MLP projection weights: nn.Linear ``out_in``, GPT-2 Conv1D ``in_out``
    proj_layout: ClassVar[Layout] = "out_in"
    #: ``(on-disk suffix, in-memory suffix)`` for tensors that ``save_pretrained`` writes under another
    #: name (e.g. GraniteMoE's fused ``input_linear.weight`` → ``experts.gate_up_proj``)
    disk_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: modules whose weight the model code reads directly (``weight @ x``; the module is never called):
    #: weight-level noise only, never split, exported as a plain initializer
    weight_only_modules: ClassVar[tuple[str, ...]] = ()
    #: rotary embedding in complex numbers, swapped for real math during ONNX export
    complex_rope: ClassVar[ComplexRope | None] = None

    # MoE
    moe_block: ClassVar[str | None] = None
    moe_block_disk_aliases: ClassVar[tuple[str, ...]] = ()
    router: ClassVar[str] = "gate"
    router_buffers: ClassVar[tuple[str, ...]] = ()
    experts: ClassVar[str] = "experts"
    fused_gate_up: ClassVar[str] = "gate_up_proj"
    fused_down: ClassVar[str] = "down_proj"
    #: on-disk per-expert projection names for the gate, up and down roles
    disk_expert_projs: ClassVar[tuple[tuple[ExpertRole, str], ...]] = (
        ("gate", "gate_proj"),
        ("up", "up_proj"),
        ("down", "down_proj"),
    )
    shared_experts: ClassVar[str | None] = None
    shared_expert_gate: ClassVar[str | None] = None
    dense_layers_key: ClassVar[str | None] = None
    num_experts_key: ClassVar[str | None] = None
    top_k_key: ClassVar[str | None] = None
    norm_topk_prob_key: ClassVar[str | None] = None
    norm_topk_prob_default: ClassVar[bool] = False
    scoring_key: ClassVar[str | None] = None
    scoring_default: ClassVar[Scoring] = "softmax"
    routed_scaling_factor_key: ClassVar[str | None] = None

    # SSM
    mixer_path: ClassVar[str | None] = None
    ssm_projs: ClassVar[tuple[tuple[str, TensorKind], ...]] = (
        ("in_proj", "ssm_in_proj"),
        ("x_proj", "ssm_x_proj"),
        ("dt_proj", "ssm_dt_proj"),
        ("out_proj", "ssm_out_proj"),
    )
    ssm_params: ClassVar[tuple[str, ...]] = ("A_log", "D", "dt_bias")
    ssm_conv: ClassVar[str] = "conv1d"
    #: the scan function swapped for an exportable one during ONNX export
    ssm_scan: ClassVar[SsmScan | None] = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} model_type={self.model_type!r} family={self.family!r}>"

    # ------------------------------------------------------------------ rules
    @cached_property
    def _layer_regex(self) -> re.Pattern[str]:
        last = self.layers_path.rsplit(".", 1)[-1]
        return re.compile(rf"^(?:.*\.)?{re.escape(last)}\.(\d+)\.(.+)$")

    @cached_property
    def _top_rules(self) -> tuple[Rule, ...]:
        return (
            Rule(re.compile(rf"^(?:.*\.)?{_alt(self.embeddings)}\.weight$"), "embedding", "none"),
            Rule(re.compile(rf"^(?:.*\.)?{re.escape(self.lm_head)}\.weight$"), "lm_head", "out_in"),
            Rule(re.compile(rf"^(?:.*\.)?{re.escape(self.lm_head)}\.bias$"), "bias", "none"),
            Rule(re.compile(rf"^(?:.*\.)?{_NORM_COMPONENT}\.(?:weight|bias)$"), "norm", "none"),
        )

    @cached_property
    def _layer_rules(self) -> tuple[Rule, ...]:
        rules = [Rule(re.compile(rf"^(?:.*\.)?{_NORM_COMPONENT}\.(?:weight|bias)$"), "norm", "none")]
        rules += self._moe_rules()
        rules += self._ssm_rules()
        attn, mlp = re.escape(self.attention_path), re.escape(self.mlp_path)
        rules.append(
            Rule(
                re.compile(rf"^{attn}\.{_alt(self.attention_projs)}\.weight$"), "attention", self.proj_layout
            )
        )
        rules.append(Rule(re.compile(rf"^{mlp}\.{_alt(self.mlp_projs)}\.weight$"), "mlp", self.proj_layout))
        rules.append(Rule(re.compile(r"^(?:.*\.)?bias$"), "bias", "none"))
        return tuple(rules)

    def _moe_rules(self) -> list[Rule]:
        if self.moe_block is None:
            return []
        block = _alt((self.moe_block, *self.moe_block_disk_aliases))
        router = rf"{block}\.{re.escape(self.router)}"
        experts = rf"{block}\.{re.escape(self.experts)}"
        disk_names = tuple(name for _, name in self.disk_expert_projs)
        rules = [
            Rule(re.compile(rf"^{router}\.weight$"), "router", "out_in"),
            Rule(
                re.compile(rf"^{experts}\.{_alt((self.fused_gate_up, self.fused_down))}$"), "expert", "out_in"
            ),
            Rule(re.compile(rf"^{experts}\.\d+\.{_alt(disk_names)}\.weight$"), "expert", "out_in"),
        ]
        if self.router_buffers:
            rules.append(Rule(re.compile(rf"^{router}\.{_alt(self.router_buffers)}$"), "bias", "none"))
        if self.shared_experts is not None:
            shared = rf"{block}\.{re.escape(self.shared_experts)}"
            rules.append(
                Rule(re.compile(rf"^{shared}\.{_alt(self.mlp_projs)}\.weight$"), "shared_expert", "out_in")
            )
        if self.shared_expert_gate is not None:
            gate = rf"{block}\.{re.escape(self.shared_expert_gate)}"
            rules.append(Rule(re.compile(rf"^{gate}\.weight$"), "shared_expert_gate", "out_in"))
        return rules

    def _ssm_rules(self) -> list[Rule]:
        if self.mixer_path is None:
            return []
        mixer = re.escape(self.mixer_path)
        rules = [
            Rule(re.compile(rf"^{mixer}\.{re.escape(name)}\.weight$"), kind, "out_in")
            for name, kind in self.ssm_projs
        ]
        rules.append(
            Rule(re.compile(rf"^{mixer}\.{re.escape(self.ssm_conv)}\.(?:weight|bias)$"), "conv", "none")
        )
        rules.append(Rule(re.compile(rf"^{mixer}\.{_alt(self.ssm_params)}$"), "ssm_param", "none"))
        return rules

    def classify(self, name: str, shape: tuple[int, ...] | None = None) -> tuple[TensorKind, Layout]:
        """Kind and layout of a tensor, from an in-memory parameter name or an on-disk safetensors key.

        Unknown names are ``("other", "none")`` (always digital). A method's split of a layer
        (``<module>.analog.weight`` / ``<module>.digital.weight``, HPD) gives the analog factor the layer's
        own kind and layout and keeps the digital factor digital. A matmul kind whose ``shape`` is not
        2-D (3-D for fused experts) is also ``other``: it cannot be mapped onto a crossbar.
        """
        split = SPLIT_FACTOR.match(name)
        if split is not None:  # a method's split of a layer (HPD): the analog factor keeps the layer's kind
            if split.group(2) == "digital":
                return "other", "none"
            name = f"{split.group(1)}.{split.group(3)}"
        kind, layout = self._match(self._renamed(name))
        if kind in MATMUL_KINDS and shape is not None and len(shape) not in (2, 3):
            return "other", "none"
        if layout == "in_out" and shape is not None and len(shape) != 2:
            return "other", "none"
        return kind, layout

    def _match(self, name: str) -> tuple[TensorKind, Layout]:
        layer = self._layer_regex.match(name)
        rules, target = (self._layer_rules, layer.group(2)) if layer else (self._top_rules, name)
        for rule in rules:
            if rule.pattern.match(target):
                return rule.kind, rule.layout
        return "other", "none"

    def layer_index(self, name: str) -> int | None:
        """The decoder-layer index a tensor name belongs to, or None for top-level tensors."""
        layer = self._layer_regex.match(name)
        return int(layer.group(1)) if layer else None

    # --------------------------------------------------- on-disk ↔ in-memory names
    @cached_property
    def _expert_key_regex(self) -> re.Pattern[str] | None:
        if self.moe_block is None:
            return None
        block = "(" + "|".join(re.escape(b) for b in (self.moe_block, *self.moe_block_disk_aliases)) + ")"
        names = "(" + "|".join(re.escape(n) for _, n in self.disk_expert_projs) + ")"
        return re.compile(rf"^(.*\.){block}\.{re.escape(self.experts)}\.(\d+)\.{names}\.weight$")

    def expert_key(self, key: str) -> ExpertKey | None:
        """For a per-expert on-disk key, the fused in-memory tensor, expert index and role; else None."""
        regex = self._expert_key_regex
        match = regex.match(key) if regex is not None else None
        if match is None:
            return None
        prefix, _, expert, disk_name = match.groups()
        role = next(r for r, n in self.disk_expert_projs if n == disk_name)
        fused = self.fused_down if role == "down" else self.fused_gate_up
        return ExpertKey(f"{prefix}{self.moe_block}.{self.experts}.{fused}", int(expert), role)

    def memory_name(self, key: str) -> str:
        """The in-memory parameter name that an on-disk key becomes after loading.

        Per-expert keys map to their fused tensor; legacy MoE block names (Mixtral ``block_sparse_moe``)
        map to the in-memory block name; every other key is returned unchanged.
        """
        expert = self.expert_key(key)
        if expert is not None:
            return expert.memory_name
        for alias in self.moe_block_disk_aliases:
            key = key.replace(f".{alias}.", f".{self.moe_block}.")
        return self._renamed(key)

    def _renamed(self, key: str) -> str:
        """``key`` with a :attr:`disk_renames` suffix replaced by its in-memory name."""
        for disk, memory in self.disk_renames:
            if key == disk or key.endswith(f".{disk}"):
                return key[: len(key) - len(disk)] + memory
        return key

    # -------------------------------------------------------------- config
    def _config_value(self, config: Any, key: str | None, default: Any) -> Any:
        if key is None:
            return default
        value = getattr(config, key, None)
        if value is None and isinstance(config, dict):
            value = config.get(key)
        return default if value is None else value

    def _require_moe(self, what: str) -> None:
        if self.family != "moe":
            raise ModelInputError(
                f"model type '{self.model_type}' has no experts ({what} needs an MoE model)"
            )

    def num_experts(self, config: Any) -> int:
        """Number of routed experts per MoE layer (from the config key this architecture uses)."""
        self._require_moe("num_experts")
        return int(self._config_value(config, self.num_experts_key, 0))

    def top_k(self, config: Any) -> int:
        """Number of experts routed per token."""
        self._require_moe("top_k")
        return int(self._config_value(config, self.top_k_key, 0))

    def norm_topk_prob(self, config: Any) -> bool:
        """Whether the selected top-k routing weights are renormalised to sum to 1."""
        self._require_moe("norm_topk_prob")
        return bool(self._config_value(config, self.norm_topk_prob_key, self.norm_topk_prob_default))

    def scoring(self, config: Any) -> str:
        """Router scoring function: ``softmax``, ``sigmoid`` or ``topk_softmax`` (see RoutingRule)."""
        self._require_moe("scoring")
        return str(self._config_value(config, self.scoring_key, self.scoring_default))

    def routed_scaling_factor(self, config: Any) -> float:
        """Factor applied to the routing weights (1.0 where the architecture has none)."""
        self._require_moe("routed_scaling_factor")
        return float(self._config_value(config, self.routed_scaling_factor_key, 1.0))

    def routing_rule(self, config: Any, router: nn.Module) -> RoutingRule:
        """How ``router`` (a router module of this architecture) turns logits into top-k weights.

        The default is the rule the declarative attributes describe (scoring, renormalisation, scaling;
        weights kept in float32); adapters whose stock router differs override it.
        """
        return RoutingRule(
            self.scoring(config),  # type: ignore[arg-type]
            norm_topk_prob=self.norm_topk_prob(config),
            routed_scaling_factor=self.routed_scaling_factor(config),
            cast_to_logits=False,
            **self.routing_size(config, router),
        )

    def routing_size(self, config: Any, router: nn.Module) -> dict[str, int]:
        """``top_k`` and ``num_experts`` of ``router`` (its attributes, else the config's)."""
        return {
            "top_k": int(router_value(router, "top_k", self.top_k(config))),
            "num_experts": int(router_value(router, "num_experts", self.num_experts(config))),
        }

    def tied_embeddings(self, config: Any) -> bool:
        """Whether lm_head shares its weight with the input embedding."""
        return bool(self._config_value(config, self.tie_key, False))

    def is_weight_only(self, module_path: str) -> bool:
        """Whether the model code reads the weight of ``module_path`` directly (see weight_only_modules)."""
        return module_path.rpartition(".")[2] in self.weight_only_modules

    # -------------------------------------------------------- model class
    def model_class_ref(self) -> type:
        """The causal-LM class (imports transformers or our own module on first use)."""
        return _resolve(self.model_class)

    def model_module(self) -> str:
        """The python module that defines the causal-LM class (and the family's functions)."""
        return self.model_class_ref().__module__

    def config_builder_ref(self) -> Callable[[dict[str, Any]], Any] | None:
        """The function that builds this architecture's config from a dict, or None (transformers')."""
        return _resolve(self.config_builder) if self.config_builder else None

    # ------------------------------------------------------ in-memory helpers
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder-layer list of an in-memory model."""
        try:
            return model.get_submodule(self.layers_path)
        except AttributeError:
            raise ModelInputError(
                f"model has no '{self.layers_path}' (expected for model type '{self.model_type}')"
            ) from None

    def moe_layers(self, model: nn.Module) -> Iterator[MoeLayer]:
        """The MoE layers of an in-memory model (dense layers, e.g. DeepSeek's first ones, are skipped)."""
        if self.moe_block is None:
            return
        for index, layer in enumerate(self.layers(model)):
            block = getattr(layer, self.moe_block, None)
            experts = getattr(block, self.experts, None)
            router = getattr(block, self.router, None)
            if experts is None or router is None or not hasattr(experts, self.fused_gate_up):
                continue
            yield MoeLayer(
                index=index,
                block=block,
                router=router,
                experts=experts,
                shared_experts=getattr(block, self.shared_experts, None) if self.shared_experts else None,
                shared_expert_gate=(
                    getattr(block, self.shared_expert_gate, None) if self.shared_expert_gate else None
                ),
                path=f"{self.layers_path}.{index}.{self.moe_block}",
            )

    def ssm_mixers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """``(path, mixer)`` for every SSM mixer of an in-memory model."""
        if self.mixer_path is None:
            return
        for index, layer in enumerate(self.layers(model)):
            mixer = getattr(layer, self.mixer_path, None)
            if mixer is not None:
                yield f"{self.layers_path}.{index}.{self.mixer_path}", mixer

    def ssm_out_projs(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(path, module)`` of every SSM mixer ``out_proj`` of an in-memory model."""
        out_name = next(name for name, kind in self.ssm_projs if kind == "ssm_out_proj")
        return [(f"{path}.{out_name}", getattr(mixer, out_name)) for path, mixer in self.ssm_mixers(model)]


def _resolve(reference: str) -> Any:
    """The object a ``"module.path:name"`` reference names (a bare name: from ``transformers``)."""
    module_name, _, name = reference.rpartition(":")
    return getattr(importlib.import_module(module_name or "transformers"), name)
