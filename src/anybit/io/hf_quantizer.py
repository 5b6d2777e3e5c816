"""anybit folders through ``transformers.AutoModelForCausalLM.from_pretrained``.

``import anybit`` registers ``quant_method: "anybit"`` with transformers (a
``QuantizationConfigMixin`` and an ``HfQuantizer``): before the weights load, every layer
named in ``quantization_config.layers`` becomes a :class:`~anybit.nn.QuantLinear` of its
format, whose packed buffers then load from ``model.safetensors`` as any other tensor;
afterwards the Q/K/V activation quantizer is set where the model has one. The result is
the model :func:`anybit.load` returns (same modules, same kernels), inside code that
already uses transformers. Loading only: quantize with anybit.
"""

from __future__ import annotations

from typing import Any

_registered = False


def register() -> bool:
    """Register the config and quantizer with transformers (idempotent); False if this
    transformers has no quantizer registry."""
    global _registered
    if _registered:
        return True
    try:
        from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                                  register_quantization_config, register_quantizer)
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:
        return False

    class AnybitConfig(QuantizationConfigMixin):
        """The ``quantization_config`` anybit writes (kept whole: ``to_dict`` returns it)."""

        def __init__(self, layers: dict | None = None, qkv: dict | None = None, **kwargs: Any):
            self.quant_method = "anybit"
            self.layers = layers or {}
            self.qkv = qkv
            self._rest = {k: v for k, v in kwargs.items() if k != "quant_method"}

        def to_dict(self) -> dict[str, Any]:
            return {"quant_method": "anybit", "layers": self.layers, "qkv": self.qkv, **self._rest}

        def to_diff_dict(self) -> dict[str, Any]:
            return self.to_dict()

    class AnybitHfQuantizer(HfQuantizer):
        """Pre-quantized anybit checkpoints: QuantLinear modules, packed buffers loaded as saved."""

        requires_calibration = True

        def validate_environment(self, *args, **kwargs) -> None:
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and any(str(v) not in ("cpu", "0", "cuda") for v in device_map.values()):
                raise ValueError("anybit models load on one device (device_map='cpu' or None)")

        def update_dtype(self, dtype):
            import torch

            return torch.float32 if dtype is None else dtype

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return False

        def _process_model_before_weight_loading(self, model, **kwargs) -> None:
            from .checkpoint import install_quant_linears

            layers = self.quantization_config.layers
            device = next(model.parameters()).device
            install_quant_linears(model, layers, getattr(model.config, "_name_or_path", "") or "model", device)
            if "lm_head" in layers:
                model.config.tie_word_embeddings = False  # anybit unties a quantized head

        def _process_model_after_weight_loading(self, model, **kwargs):
            from .checkpoint import apply_qkv

            apply_qkv(model, self.quantization_config.to_dict())
            model.anybit_info = self.quantization_config.to_dict()
            return model

        def is_serializable(self, safe_serialization=None) -> bool:
            return False  # save with anybit.save

        @property
        def is_trainable(self) -> bool:
            return False

    if "anybit" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config("anybit")(AnybitConfig)
    if "anybit" not in AUTO_QUANTIZER_MAPPING:
        register_quantizer("anybit")(AnybitHfQuantizer)
    _registered = True
    return True
