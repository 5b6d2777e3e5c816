"""Architecture adapters: where the decoder blocks, their linear layers and the norms
before them live in each supported Hugging Face model family.

Adding an architecture = one :class:`Adapter` entry in ``ADAPTERS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import AnybitError


@dataclass(frozen=True)
class Adapter:
    """Paths (dotted, relative to the model or to one block) of an architecture's parts.

    ``sequential`` lists the block's linears in groups that see the same input, in
    execution order (GPTQ's true-sequential order); ``norm_to`` maps each pre-linear
    norm to the linears it feeds (for smoothing / equivalent transforms).
    """

    model_types: tuple[str, ...]
    blocks: str
    embed: tuple[str, ...]
    final_norm: str
    lm_head: str
    sequential: tuple[tuple[str, ...], ...]
    norm_to: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # producer -> consumer pairs inside the block that allow a scale to be folded (v -> o)
    linear_to: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def linear_names(self) -> list[str]:
        return [name for group in self.sequential for name in group]

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def get_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return {name: block.get_submodule(name) for name in self.linear_names()}


_LLAMA = Adapter(
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks="model.layers",
    embed=("model.embed_tokens", "model.rotary_emb"),
    final_norm="model.norm",
    lm_head="lm_head",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    norm_to={
        "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    },
    linear_to={"self_attn.v_proj": ("self_attn.o_proj",), "mlp.up_proj": ("mlp.down_proj",)},
)

_OPT = Adapter(
    model_types=("opt",),
    blocks="model.decoder.layers",
    embed=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm",
    lm_head="lm_head",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    norm_to={
        "self_attn_layer_norm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "final_layer_norm": ("fc1",),
    },
    linear_to={"self_attn.v_proj": ("self_attn.out_proj",)},
)

ADAPTERS: tuple[Adapter, ...] = (_LLAMA, _OPT)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``'s architecture, or a clear error naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise AnybitError(
        f"unsupported architecture {model_type!r}; anybit supports: {', '.join(supported_model_types())}"
    )
