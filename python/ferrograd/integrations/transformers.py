"""One call that brings ferrograd into a transformers causal LM (the model is patched in place):

    from ferrograd.integrations import transformers as fgt
    model = fgt.apply(model, shiftquant_bits=8)

- ``linear_cross_entropy``: with ``labels`` the model's forward runs the base model to its last
  hidden states and computes the loss with ``fg.linear_cross_entropy`` against the head's weight
  (and bias), never materializing the logits: transformers' semantics (labels shifted by one or
  ``shift_labels``, ``ignore_index`` -100, ``num_items_in_batch`` -> sum / num_items_in_batch,
  ``logits_to_keep``, the final logit softcapping of the models whose config has it, Cohere's
  and Granite's logit scaling, the router's load-balancing loss of the mixture-of-experts
  models; a batch with nothing to predict gives 0, not NaN). ``.logits`` is None unless the
  call passes ``return_logits=True``. Without labels the forward is the model's own, so
  generate() is untouched. With the head tied to a plain ``nn.Embedding``, the head's gradient
  is handed to the embedding's backward, which adds its rows into it: one vocabulary x width
  gradient buffer instead of two (``_tied.py``). Only instance forwards are replaced (the
  model's, and the tied embedding's); no transformers module is monkeypatched (a deepcopy of the
  model carries the patch; pickling the whole module does not work, save its state_dict).
- ``shiftquant_bits``: the decoder's nn.Linear (and GPT-2's Conv1D) layers become
  ShiftQuantLinear (the head stays as it is), and a mixture-of-experts layer's experts
  (transformers' experts layers with 3-D weights) run each expert's projections as ShiftQuant
  GEMMs on the tokens routed to it; a router of its own class stays as it is.
- ``l1_norm``: LayerNorm -> L1LayerNorm, RMSNorm -> L1RMSNorm (a 1 + weight scaling, as
  Gemma's and Qwen3-Next's, folded in).

docs/transformers.md has how a class gets on ``SUPPORTED`` and the measurements.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
from collections.abc import Iterator

import torch
from torch import nn
from transformers import modeling_outputs
from transformers.pytorch_utils import Conv1D

from ..nn._swap import frozen_as
from ..nn.l1norm import L1LayerNorm, L1RMSNorm
from ..nn.shiftquant import ShiftQuantLinear
from ..ops.cce import linear_cross_entropy
from ..ops.shiftquant import check_spec, shiftquant_linear
from . import _tied

__all__ = ["SUPPORTED", "apply"]

#: Mixture-of-experts classes whose forward is Mixtral's: the causal LM's, plus the router's
#: load-balancing loss (their module's ``load_balancing_loss_func``) times
#: ``router_aux_loss_coef`` added where ``output_router_logits`` (argument, else config) holds.
_MOE = frozenset(
    {
        "Ernie4_5_MoeForCausalLM",
        "FlexOlmoForCausalLM",
        "GptOssForCausalLM",
        "JambaForCausalLM",
        "MiniMaxForCausalLM",
        "MiniMaxM2ForCausalLM",
        "MixtralForCausalLM",
        "OlmoeForCausalLM",
        "PhimoeForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM",
        "Qwen3NextForCausalLM",
        "Qwen3_5MoeForCausalLM",
    }
)
#: The causal LM classes whose forward is base model -> lm_head -> (softcap or scaling) ->
#: loss, as ``apply`` rebuilds it (their forwards were read against Llama's: the same code up
#: to the names), and the mixture-of-experts ones above; a subclass of one of them is accepted
#: too.
SUPPORTED = (
    frozenset(
        {
            "ApertusForCausalLM",
            "ArceeForCausalLM",
            "BitNetForCausalLM",
            "Cohere2ForCausalLM",
            "CohereForCausalLM",
            "CwmForCausalLM",
            "DiffLlamaForCausalLM",
            "Ernie4_5ForCausalLM",
            "Exaone4ForCausalLM",
            "GPT2LMHeadModel",
            "Gemma2ForCausalLM",
            "Gemma3ForCausalLM",
            "GemmaForCausalLM",
            "Glm4ForCausalLM",
            "GlmForCausalLM",
            "GraniteForCausalLM",
            "HeliumForCausalLM",
            "HunYuanDenseV1ForCausalLM",
            "Jais2ForCausalLM",
            "Lfm2ForCausalLM",
            "LlamaForCausalLM",
            "Ministral3ForCausalLM",
            "MinistralForCausalLM",
            "MistralForCausalLM",
            "NemotronForCausalLM",
            "Olmo2ForCausalLM",
            "Olmo3ForCausalLM",
            "OlmoForCausalLM",
            "PersimmonForCausalLM",
            "Phi3ForCausalLM",
            "PhiForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
            "SeedOssForCausalLM",
            "SmolLM3ForCausalLM",
            "StableLmForCausalLM",
            "Starcoder2ForCausalLM",
        }
    )
    | _MOE
)
#: The ones whose forward applies ``config.final_logit_softcapping`` to the logits.
_SOFTCAPPED = frozenset({"Gemma2ForCausalLM", "Gemma3ForCausalLM"})
#: The ones whose forward scales the logits by a constant: Cohere's ``logits * logit_scale``,
#: Granite's ``logits / config.logits_scaling``.
_MULTIPLIED = frozenset({"CohereForCausalLM", "Cohere2ForCausalLM"})
_DIVIDED = frozenset({"GraniteForCausalLM"})
#: What the base model does not get (everything else goes on to it, as in the model's forward;
#: it always returns its dataclass here).
_HEAD_ARGS = ("labels", "logits_to_keep", "return_dict")
#: The output dataclass (transformers.modeling_outputs) each forward returns.
_OUTPUT_TYPES = {
    "GPT2LMHeadModel": "CausalLMOutputWithCrossAttentions",
    **dict.fromkeys(_MOE, "MoeCausalLMOutputWithPast"),
}
_PATCHED = "_ferrograd_patched"
_APPLY = "ferrograd.integrations.transformers.apply"


def _architecture(model: nn.Module) -> type:
    """The supported transformers class ``model`` is (or derives from)."""
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED and cls.__module__.startswith("transformers."):
            return cls
    raise TypeError(
        f"{_APPLY}: {type(model).__name__} is not a supported "
        f"model class (supported: {', '.join(sorted(SUPPORTED))})"
    )


def _softcap(model: nn.Module, arch: type) -> float | None:
    if arch.__name__ not in _SOFTCAPPED:
        return None
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None)


@dataclasses.dataclass(frozen=True)
class _Scaling:
    """The constant the forward multiplies (``divide``: divides) the logits by."""

    value: float
    divide: bool

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t / self.value if self.divide else t * self.value


def _scaling(model: nn.Module, arch: type) -> _Scaling | None:
    if arch.__name__ in _MULTIPLIED:
        return _Scaling(float(model.logit_scale), divide=False)
    if arch.__name__ in _DIVIDED:
        return _Scaling(float(model.config.logits_scaling), divide=True)
    return None


try:  # transformers 5: also per-row positions and masks
    from transformers.modeling_utils import slice_logits_to_keep as _keep
except ImportError:  # transformers 4

    def _keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
        """The positions the forward computes logits for: the last k (0: all) or indices."""
        if isinstance(logits_to_keep, int):
            return hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        return hidden[:, logits_to_keep, :]


def _logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None, scaling) -> torch.Tensor:
    logits = head(hidden)
    if scaling is not None:
        logits = scaling(logits)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _loss(head, weight, hidden, labels, softcap, scaling, kwargs) -> torch.Tensor:
    """The loss against the head (``weight``: its weight as the loss takes it). A scaling of
    the logits, c (h W^T + b), is taken as (c h) W^T + c b: the same logits (to rounding; exactly
    where c is a power of two, as Cohere's 1/16), without a scaled copy of the weight."""
    shift_labels = kwargs.get("shift_labels")
    targets, shift = (labels, 1) if shift_labels is None else (shift_labels, 0)
    name = "labels" if shift_labels is None else "shift_labels"
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"ferrograd loss: {name} must be an integer tensor, got {targets!r:.60}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"ferrograd loss: {name} must have shape {tuple(hidden.shape[:-1])} (the positions "
            f"logits are computed for, after logits_to_keep), got {tuple(targets.shape)}"
        )
    num_items = kwargs.get("num_items_in_batch")
    bias = head.bias
    if scaling is not None:
        hidden = scaling(hidden)
        bias = None if bias is None else scaling(bias)
    loss = linear_cross_entropy(
        hidden.to(weight.dtype),
        weight,
        targets.to(hidden.device),
        bias=bias,
        ignore_index=kwargs.get("ignore_index", -100),
        softcap=softcap,
        reduction="mean" if num_items is None else "sum",
        shift=shift,
    ).float()  # transformers' loss is float32 whatever the model's dtype
    if num_items is None:
        return loss
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(loss.device)
    return loss / num_items


def _decoder(model: nn.Module) -> nn.Module:
    """The base model under the head: ``model.base_model``, which is the causal LM itself where
    the class names a prefix it does not hold (transformers 4.57's Gemma3ForCausalLM says
    ``language_model`` and holds ``model``: the head was swapped with the decoder's linears and
    the loss read hidden states from the causal LM's own output)."""
    base = model.base_model
    if base is model:
        base = getattr(model, "model", None)
        if not isinstance(base, nn.Module):
            raise TypeError(f"{_APPLY}: {type(model).__name__} has no base model under its head")
    return base


def _patch_forward(model: nn.Module, arch: type, softcap: float | None, scaling) -> None:
    """Replaces the instance's forward by a bound method, so a deepcopy of the model runs its
    own copy (a closure over ``model`` would keep running the original)."""
    original = type(model).forward
    name = arch.__name__
    output_type = getattr(modeling_outputs, _OUTPUT_TYPES.get(name, "CausalLMOutputWithPast"))
    # The router's load-balancing loss as the architecture's own module computes it.
    balancing = sys.modules[arch.__module__].load_balancing_loss_func if name in _MOE else None
    fields = {f.name for f in dataclasses.fields(output_type)} - {"loss", "logits"}
    positional = [
        p.name
        for p in list(inspect.signature(original).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"forward takes at most {len(positional)} positional arguments")
        kwargs.update(zip(positional, args, strict=False))
        labels = kwargs.get("labels")
        return_logits = kwargs.pop("return_logits", False)
        if labels is None:
            return original(self, **kwargs)
        head = self.get_output_embeddings()
        pairing = _tied.arm(self)
        base_kwargs = {k: v for k, v in kwargs.items() if k not in _HEAD_ARGS}
        if balancing is not None:
            routed = kwargs.get("output_router_logits")
            routed = self.config.output_router_logits if routed is None else routed
            base_kwargs["output_router_logits"] = routed
        try:
            outputs = _decoder(self)(**base_kwargs, return_dict=True)
        finally:
            weight = _tied.head_weight(self, head.weight, pairing)
        hidden = _keep(outputs.last_hidden_state, kwargs.get("logits_to_keep", 0))
        loss = _loss(head, weight, hidden, labels, softcap, scaling, kwargs)
        logits = _logits(head, hidden, softcap, scaling) if return_logits else None
        extra = {k: v for k, v in outputs.items() if k in fields}
        if balancing is not None and routed:
            extra["aux_loss"] = balancing(
                outputs.router_logits,
                self.num_experts,
                self.num_experts_per_tok,
                kwargs.get("attention_mask"),
            )
            loss = loss + self.router_aux_loss_coef * extra["aux_loss"].to(loss.device)
        out = output_type(loss=loss, logits=logits, **extra)
        return out if kwargs.get("return_dict", True) is not False else out.to_tuple()

    model.forward = types.MethodType(forward, model)


def _weight_offset(norm: nn.Module) -> float:
    """1.0 for an RMSNorm that scales by 1 + weight (Gemma's, Qwen3-Next's), else 0.0: told
    apart by running it with its weight zeroed, which zeroes only a plain norm's output (on the
    meta device, which runs nothing, by the class name: Gemma's)."""
    w = norm.weight
    if w.is_meta:
        return 1.0 if type(norm).__name__.startswith("Gemma") else 0.0
    probe = torch.linspace(1.0, 2.0, w.shape[0], dtype=w.dtype, device=w.device)[None]
    with torch.no_grad():
        saved = w.detach().clone()
        w.zero_()
        try:
            out = norm(probe)
        finally:
            w.copy_(saved)
    return 1.0 if bool(out.abs().amax() > 0) else 0.0


def _rms_like(module: nn.Module) -> bool:
    if isinstance(module, nn.RMSNorm):
        return module.weight is not None
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and (hasattr(module, "variance_epsilon") or hasattr(module, "eps"))
    )


def _from_conv1d(conv: nn.Module, **kw) -> ShiftQuantLinear:
    """transformers' Conv1D holds weight [in, out]: the ShiftQuantLinear of its transpose."""
    n_in, n_out = conv.weight.shape
    w = conv.weight
    out = ShiftQuantLinear(n_in, n_out, conv.bias is not None, device=w.device, dtype=w.dtype, **kw)
    with torch.no_grad():
        out.weight.copy_(w.t())
        if conv.bias is not None:
            out.bias.copy_(conv.bias)
    return frozen_as(out, conv)


def _experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts layer (``use_experts_implementation``)
    that the ShiftQuant loop runs: 3-D weights ([experts, out, in], or [experts, in, out] where
    ``is_transposed``), a gate (``_apply_gate`` splits and gates either layout), optional
    biases, no norm after each expert."""
    weights = (getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None))
    return (
        hasattr(type(module), "_apply_gate")
        and all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights)
        and getattr(module, "has_gate", False) is True
        and getattr(module, "has_post_expert_norm", True) is False
        and isinstance(getattr(module, "is_transposed", None), bool)
        and isinstance(getattr(module, "has_bias", None), bool)
    )


def _shiftquant_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts loop with each expert's two projections as ShiftQuant GEMMs
    (``self._ferrograd_shiftquant``: their bits, grad_bits, group_size): the codes of the tokens
    routed to expert e times those of its weight rows, gradients to both."""
    quant = self._ferrograd_shiftquant
    # One unbind per weight: its backward stacks the experts' gradients once. Indexed per
    # expert (weight[e]), each backward wrote a zero-filled copy of the whole 3-D gradient:
    # two thirds of the experts' backward at 8 experts.
    layers = [self.gate_up_proj.unbind(0), self.down_proj.unbind(0)]
    biases = [None, None]
    if self.has_bias:
        biases = [self.gate_up_proj_bias.unbind(0), self.down_proj_bias.unbind(0)]

    def project(x, layer, e):  # x @ W_e^T + b_e, W_e [out, in] as ShiftQuantLinear takes it
        w = layers[layer][e]
        b = None if biases[layer] is None else biases[layer][e]
        return shiftquant_linear(x, w.t() if self.is_transposed else w, b, **quant)

    out = torch.zeros_like(hidden_states)
    with torch.no_grad():  # (expert, top-k slot, token) -> routed; num_experts: EP's sentinel
        routed = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
        routed = routed.permute(2, 1, 0)
        hit = torch.greater(routed.sum(dim=(-1, -2)), 0).nonzero()
    for (e,) in hit.tolist():
        if e == self.num_experts:
            continue
        slot, token = torch.where(routed[e])
        y = project(self._apply_gate(project(hidden_states[token], 0, e)), 1, e)
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
    return out


def _recorded(model: nn.Module) -> set[int]:
    """ids of the modules whose outputs transformers records by their class
    (``_can_record_outputs``: a class, a class-name suffix or an ``OutputRecorder``, with an
    optional ``layer_name``), matched as transformers matches them. A module swapped in for one
    is not recorded: the hooks stay on the old module and the new class does not match. Seen:
    transformers 5.20 records Jamba's router, an ``nn.Linear``, by ``OutputRecorder(nn.Linear,
    layer_name="router")``; a ShiftQuantLinear router lost the router logits, and the forward
    raised in the load-balancing loss. Such modules stay as they are (later releases give
    routers a class of their own, which is never swapped)."""
    ids = set()
    for root in model.modules():
        flags = getattr(type(root), "_can_record_outputs", None)
        if isinstance(flags, dict):
            for value in flags.values():
                for spec in value if isinstance(value, list) else [value]:
                    ids.update(id(sub) for sub in _recorded_by(root, spec))
    return ids


def _recorded_by(root: nn.Module, spec) -> Iterator[nn.Module]:
    """The modules below ``root`` (itself included) that one ``_can_record_outputs`` entry
    matches: by class or by name suffix, and within ``layer_name`` where it gives one."""
    target = getattr(spec, "target_class", None if isinstance(spec, str) else spec)
    suffix = getattr(spec, "class_name", spec if isinstance(spec, str) else None)
    layer = getattr(spec, "layer_name", None)
    for name, sub in root.named_modules(prefix=""):
        path = f".{name}" if name else ""
        by_class = isinstance(target, type) and isinstance(sub, target)
        by_name = isinstance(suffix, str) and path.endswith(suffix)
        if (by_class or by_name) and (layer is None or f".{layer.strip('.')}." in f"{path}."):
            yield sub


def _swap_modules(module: nn.Module, quant: dict | None, l1_norm: bool, keep: set[int]) -> None:
    """Swaps, below ``module``, the layers ``apply`` replaces, except the modules in ``keep``
    (ids, ``_recorded``)."""
    for name, child in list(module.named_children()):
        swapped = None
        if quant is not None and _experts(child):
            child._ferrograd_shiftquant = dict(quant)
            child.forward = types.MethodType(_shiftquant_experts_forward, child)
            continue
        if id(child) in keep:
            pass
        elif quant is not None and type(child) is nn.Linear:
            swapped = ShiftQuantLinear.from_linear(child, share=True, **quant)
        elif quant is not None and isinstance(child, Conv1D):
            swapped = _from_conv1d(child, **quant)
        elif l1_norm and type(child) is nn.LayerNorm and child.elementwise_affine:
            swapped = L1LayerNorm.from_layer_norm(child, share=True)
        elif l1_norm and _rms_like(child):
            offset = _weight_offset(child)
            swapped = L1RMSNorm.from_rms_norm(child, weight_offset=offset, share=True)
        if swapped is None:
            _swap_modules(child, quant, l1_norm, keep)
        else:
            setattr(module, name, swapped)


def apply(
    model: nn.Module,
    *,
    linear_cross_entropy: bool = True,
    shiftquant_bits: int | None = None,
    grad_bits: int | None = None,
    group_size: int = 64,
    l1_norm: bool = False,
) -> nn.Module:
    """Patches a transformers causal LM in place (see module doc) and returns it.

    Raises TypeError for a model class it does not know. Applying again with the same options
    is a no-op; with other options a ValueError (the model is never patched twice).
    """
    arch = _architecture(model)
    decoder = _decoder(model)
    if shiftquant_bits is not None:
        shiftquant_bits, group_size = check_spec(
            f"{_APPLY}(shiftquant_bits)", shiftquant_bits, group_size
        )
        if grad_bits is not None:
            grad_bits, _ = check_spec(f"{_APPLY}(grad_bits)", grad_bits, group_size)
    options = {
        "linear_cross_entropy": bool(linear_cross_entropy),
        "shiftquant_bits": shiftquant_bits,
        "grad_bits": grad_bits,
        "group_size": group_size,
        "l1_norm": bool(l1_norm),
    }
    done = getattr(model, _PATCHED, None)
    if done is not None:
        if done == options:
            return model
        raise ValueError(
            f"{_APPLY}: the model is already patched with "
            f"{done}; build a fresh model to apply {options}"
        )
    quant = None
    if shiftquant_bits is not None:
        quant = {"bits": shiftquant_bits, "grad_bits": grad_bits, "group_size": group_size}
    else:
        for name, value, default in (
            ("grad_bits", grad_bits, None),
            ("group_size", group_size, 64),
        ):
            if value != default:
                raise ValueError(f"{_APPLY}: {name} needs shiftquant_bits, got {name}={value}")
    if quant is not None or l1_norm:
        _swap_modules(decoder, quant, bool(l1_norm), _recorded(model))
    if linear_cross_entropy:
        _patch_forward(model, arch, _softcap(model, arch), _scaling(model, arch))
        _tied.install(model)
    setattr(model, _PATCHED, options)
    return model
