"""A lean decoder for Llama-family models (llama, mistral, qwen2, qwen3) with a static KV cache.

Why: at SmolLM2's size (576 hidden) one decoding step of a ``transformers`` model spends
more time in Python, module dispatch and cache bookkeeping than in its matrix products, so
a quantized model decodes no faster than the float one. This runs the same computation as
the Hugging Face modules with the fewest possible operators per layer: one fused RMSNorm,
the block's own linears (QuantLinear or nn.Linear, so every packed format and its kernel
dispatch is used unchanged), a rotary table computed once, a preallocated KV cache written
in place and one ``scaled_dot_product_attention`` per layer.

The model's weights are shared, not copied. Anything the decoder does not know how to run
exactly (another architecture, sliding-window attention that the context would reach,
modules it does not recognise) is reported by :func:`unsupported` so that callers keep
the ``transformers`` path.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..allocator import release_freed_memory
from ..formats.activation import fake_quantize
from ..kernels import native

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def unsupported(model: nn.Module, max_len: int) -> str | None:
    """Why :class:`StaticDecoder` cannot run ``model`` for ``max_len`` positions (None: it can)."""
    cfg = model.config
    if cfg.model_type not in MODEL_TYPES:
        return f"model type {cfg.model_type!r} (the lean decoder runs {', '.join(MODEL_TYPES)})"
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", cfg.model_type == "mistral") and max_len > window:
        return f"{max_len} positions exceed the sliding window {window}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit and max_len > limit:
        return f"{max_len} positions exceed the model's context of {limit}"
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        if getattr(att, "anybit_maps", None) is not None:
            return "attention maps are being recorded"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(att, name):
                return f"attention without {name}"
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not hasattr(mlp, name):
                return f"MLP without {name}"
    return None


class _Layer(NamedTuple):
    """One decoder layer's parts, shared with the model (norm weights with their eps)."""
    ln1: torch.Tensor
    eps1: float
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    ln2: torch.Tensor
    eps2: float
    gate: nn.Module
    up: nn.Module
    down: nn.Module
    q_norm: tuple[torch.Tensor, float] | None  # Qwen3
    k_norm: tuple[torch.Tensor, float] | None
    att: nn.Module


def _plan(modules):
    if kernels.current() not in ("auto", "native"):
        return None
    return native.q8_plan(list(modules)) or native.bcq_plan(list(modules)) or native.bitplane_plan(list(modules))


class StaticDecoder:
    """Prefill and single-token decoding of ``model`` for up to ``max_len`` positions (batch 1).

    ``forward(ids)`` appends ``ids`` (``[1, T]``) at the current position and returns the
    logits of the last token (``all_logits``: of every token); ``reset()`` empties the cache.
    """

    def __init__(self, model: nn.Module, max_len: int, plans: bool = True):
        why = unsupported(model, max_len)
        if why:
            raise ValueError(f"the lean decoder cannot run this model: {why}")
        cfg = model.config
        self.model = model
        self.max_len = max_len
        inner = model.model
        self.embed = inner.embed_tokens
        self.norm_w, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.head = model.lm_head
        dtype = self.norm_w.dtype
        self.dtype = dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = self.head_dim ** -0.5
        pos = torch.arange(max_len)[None]
        probe = torch.zeros(1, dtype=dtype)
        with torch.no_grad():
            cos, sin = inner.rotary_emb(probe, pos)
        self.cos, self.sin = cos[0].to(dtype), sin[0].to(dtype)  # [max_len, head_dim]
        self.layers = []
        for layer in inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            qn = getattr(att, "q_norm", None)
            kn = getattr(att, "k_norm", None)
            self.layers.append(_Layer(
                layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                att.q_proj, att.k_proj, att.v_proj, att.o_proj,
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                mlp.gate_proj, mlp.up_proj, mlp.down_proj,
                None if qn is None else (qn.weight, qn.variance_epsilon),
                None if kn is None else (kn.weight, kn.variance_epsilon),
                att,
            ))
        # fused int8-kernel calls for Q/K/V, gate/up and the single linears (decoding only)
        self.plans = [tuple(_plan(mods) if plans else None for mods in
                            ((lay.q_proj, lay.k_proj, lay.v_proj), (lay.o_proj,), (lay.gate, lay.up), (lay.down,)))
                      for lay in self.layers]
        self.head_plan = _plan((self.head,)) if plans else None
        self.native_f32 = plans and native._load() is not None and kernels.current() in ("auto", "native")
        shape = (len(self.layers), 1, self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)
        self.pos = 0
        self.fast = self._fast_tables() if plans else None
        # a float32 head on the native float GEMV too (PyTorch's took 9.6 ms per SmolLM2 token
        # for its 113 MB, the native one 4.6)
        self.head_f32 = (native.lin_struct(self.head) if self.fast is not None and self.head_plan is None
                         and type(self.head) is nn.Linear else None)
        # the plans' temporaries (code unpacking, layout building) are freed by now; hand the
        # heap's free pages back so that they do not count in the decoding process's RSS
        release_freed_memory()

    def _linear(self, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """``module(h)``; a float32 nn.Linear of a prompt on the native float GEMM, which beats
        PyTorch's BLAS up to native.f32_gemm_rows(K) rows (the PyTorch path keeps BLAS)."""
        if self.native_f32 and type(module) is nn.Linear:
            return native.f32_linear(h, module.weight, module.bias)
        return module(h)

    def _fast_tables(self):
        """The layer table of the native decoding step (one token, the whole stack in one C
        call), or None where a layer needs the PyTorch path (a format without a batch-1
        kernel, quantized Q/K/V, a dtype other than float32, ANYBIT_F32_STEP=0 for float
        linears, or the reference backend chosen). Float32 nn.Linear layers run on it too
        (native.lin_struct: kind 4)."""
        if native._load() is None or self.dtype != torch.float32 or kernels.current() not in ("auto", "native"):
            return None

        def slots(plan, modules):
            """Structs for one group of linears reading the same input: the fused plan, or one
            per module."""
            if plan is not None:
                return [native.lin_struct(plan)]
            return [native.lin_struct(m) for m in modules]

        rows = []
        for i, lay in enumerate(self.layers):
            plans = self.plans[i]
            spec = getattr(lay.att, "anybit_qkv", None)
            if spec is not None and spec.enabled:
                return None
            qkv = slots(plans[0], (lay.q_proj, lay.k_proj, lay.v_proj))
            o = slots(plans[1], (lay.o_proj,))
            gu, down = slots(plans[2], (lay.gate, lay.up)), slots(plans[3], (lay.down,))
            if any(x is None for x in qkv + o + gu + down):
                return None
            qn, kn = lay.q_norm, lay.k_norm
            norms = [lay.ln1, lay.ln2, *(z[0] for z in (qn, kn) if z is not None)]
            if any(t.dtype != torch.float32 or not t.is_contiguous() for t in norms):
                return None
            row = native.LayerStruct(
                ln1=lay.ln1.data_ptr(), eps1=lay.eps1, n_qkv=len(qkv), o=o[0], ln2=lay.ln2.data_ptr(), eps2=lay.eps2,
                n_gu=len(gu), down=down[0], qn=None if qn is None else qn[0].data_ptr(),
                kn=None if kn is None else kn[0].data_ptr(), neps=(qn or kn or (None, 1e-6))[1],
                kc=self.k_cache[i].data_ptr(), vc=self.v_cache[i].data_ptr())
            for j, x in enumerate(qkv):
                row.qkv[j] = x
            for j, x in enumerate(gu):
                row.gu[j] = x
            rows.append(row)
        table = (native.LayerStruct * len(rows))(*rows)
        d, hd = self.norm_w.shape[0], self.head_dim
        ffn = self.layers[0].gate.out_features
        x = torch.zeros(1, d)
        buf = torch.zeros(2 * d + (2 * self.n_heads + 2 * self.n_kv) * hd + 3 * ffn + self.max_len)
        return native._lib, table, ffn, x, buf

    def _fast_step(self, ids: torch.Tensor) -> torch.Tensor:
        lib, table, ffn, x, buf = self.fast
        p = self.pos
        x.copy_(self.embed(ids.reshape(1, 1)).reshape(1, -1))
        d = x.shape[1]
        lib.anybit_decode_layers(table, len(table), x.data_ptr(), d, self.n_heads, self.n_kv, self.head_dim, ffn,
                                 self.max_len, p, self.cos[p].data_ptr(), self.sin[p].data_ptr(), self.scale,
                                 buf.data_ptr())
        self.pos = p + 1
        h = F.rms_norm(x, (d,), self.norm_w, self.norm_eps)
        if self.head_plan is not None:
            return self.head_plan(h).view(1, 1, -1)
        if self.head_f32 is not None:
            st = self.head_f32
            y = torch.empty(1, st.N)  # a new tensor per step: callers keep the logits
            lib.anybit_lin_rows(ctypes.byref(st), h.data_ptr(), 1, y.data_ptr(), int(st.threads))
            return y.view(1, 1, -1)
        return self.head(h.view(1, 1, d))  # any module: the kernel dispatch picks its kernel

    def reset(self) -> None:
        self.pos = 0

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
        return x * cos + rot * sin

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        t = ids.shape[-1]
        p0, p1 = self.pos, self.pos + t
        if p1 > self.max_len:
            raise ValueError(f"position {p1} is past the decoder's {self.max_len}")
        if t == 1 and self.fast is not None:
            return self._fast_step(ids)
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        cos, sin = self.cos[p0:p1], self.sin[p0:p1]
        x = self.embed(ids.reshape(1, t)).to(self.dtype)
        gqa = nh != nkv
        # a causal mask is only needed when new tokens attend to each other and to a cache
        mask = None
        if t > 1 and p0 > 0:
            mask = torch.ones(t, p1, dtype=torch.bool).tril(p0)
        small = t <= native.q8_rows()
        lin = self._linear
        for i, (w1, e1, q_proj, k_proj, v_proj, o_proj, w2, e2, gate, up, down, qn, kn, att) in enumerate(self.layers):
            p_qkv, p_o, p_gu, p_down = self.plans[i] if small else (None,) * 4
            h = F.rms_norm(x, (x.shape[-1],), w1, e1)
            if p_qkv is not None:
                q, k, v = p_qkv(h.view(t, -1)).split(p_qkv.sizes, -1)
                q, k, v = q.view(1, t, nh, hd), k.view(1, t, nkv, hd), v.view(1, t, nkv, hd)
            else:
                q = lin(q_proj, h).view(1, t, nh, hd)
                k = lin(k_proj, h).view(1, t, nkv, hd)
                v = lin(v_proj, h).view(1, t, nkv, hd)
            if qn is not None:
                q = F.rms_norm(q, (hd,), qn[0], qn[1])
                k = F.rms_norm(k, (hd,), kn[0], kn[1])
            q = self._rope(q.transpose(1, 2), cos, sin)
            k = self._rope(k.transpose(1, 2), cos, sin)
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[:, :, p0:p1] = k
            vc[:, :, p0:p1] = v.transpose(1, 2)
            keys, values = kc[:, :, :p1], vc[:, :, :p1]
            spec = getattr(att, "anybit_qkv", None)
            if spec is not None and spec.enabled:  # as attention_forward: Q, K, V quantized as they enter
                q, keys, values = (fake_quantize(z, spec) for z in (q, keys, values))
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=t > 1 and p0 == 0,
                                               scale=self.scale, enable_gqa=gqa)
            a = a.transpose(1, 2).reshape(1, t, nh * hd)
            x = x + (p_o(a.view(t, -1)).view(1, t, -1) if p_o is not None else lin(o_proj, a))
            h = F.rms_norm(x, (x.shape[-1],), w2, e2)
            if p_gu is not None:
                g_, u_ = p_gu(h.view(t, -1)).split(p_gu.sizes, -1)
                m = (F.silu(g_) * u_)
            else:
                m = F.silu(lin(gate, h)) * lin(up, h)
            x = x + (p_down(m.reshape(t, -1)).view(1, t, -1) if p_down is not None else lin(down, m))
        self.pos = p1
        if not all_logits:
            x = x[:, -1:]
        x = F.rms_norm(x, (x.shape[-1],), self.norm_w, self.norm_eps)
        if self.head_plan is not None and x.shape[1] <= native.q8_rows():
            return self.head_plan(x.view(x.shape[1], -1)).view(1, x.shape[1], -1)
        return lin(self.head, x)

    __call__ = forward

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None) -> torch.Tensor:
        """Greedy continuation of ``ids [1, T]`` from an empty cache: ``[1, T + n]``, stopping
        after ``max_new_tokens`` or at an end-of-sequence token."""
        eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        self.reset()
        out = [ids.reshape(1, -1)]
        logits = self(out[0])
        for i in range(max_new_tokens):
            nxt = logits[:, -1:].argmax(-1)
            out.append(nxt)
            if int(nxt) in eos or i == max_new_tokens - 1:
                break
            logits = self(nxt)
        return torch.cat(out, 1)
