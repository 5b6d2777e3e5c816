"""A Llama-architecture model with random weights, written without any download: a Hugging
Face folder in bf16 safetensors shards (one per decoder layer) with a word-level tokenizer,
and optionally the same weights as an F16 GGUF for llama.cpp. For the speed issue (a model
where the kernels, not the per-token overhead, dominate) and the large-model issue (memory
of quantization vs depth).

    python benchmarks/synthetic_llama.py /tmp/llama-4096x8 --layers 8 [--gguf /tmp/llama-4096x8.f16.gguf]

Defaults are LLaMA-7B's shapes (hidden 4096, FFN 11008, 32 heads, vocab 32000); 8 layers are
~1.9B parameters (3.5 GiB in bf16), 32 layers the full 6.7B. Weights ~ N(0, 0.02²) (norms 1),
seeded: the same command writes the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def layer_tensors(i: int, hidden: int, ffn: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + i)
    p = f"model.layers.{i}."

    def w(n, k):
        return (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)

    return {p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(hidden, hidden),
            p + "self_attn.v_proj.weight": w(hidden, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
            p + "mlp.gate_proj.weight": w(ffn, hidden), p + "mlp.up_proj.weight": w(ffn, hidden),
            p + "mlp.down_proj.weight": w(hidden, ffn),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gguf", default=None, help="also write the model as an F16 GGUF file here")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    h, f, v = args.hidden, args.ffn, args.vocab
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": f,
              "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.heads,
              "vocab_size": v, "max_position_embeddings": args.context, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16",
              "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    g = torch.Generator().manual_seed(args.seed)
    outer = {"model.embed_tokens.weight": (torch.randn(v, h, generator=g) * 0.02).to(torch.bfloat16),
             "lm_head.weight": (torch.randn(v, h, generator=g) * 0.02).to(torch.bfloat16),
             "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    weight_map = {}
    shards = [("model-outer.safetensors", outer)] + [
        (f"model-layer{i:03d}.safetensors", None) for i in range(args.layers)]
    for name, tensors in shards:
        if tensors is None:
            tensors = layer_tensors(int(name[11:14]), h, f, args.seed)
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}) + "\n")

    # a word-level tokenizer with the model's vocabulary ("t3", "t4", ...; ids 0-2 special)
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, v)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
        "model_max_length": args.context}) + "\n")
    if args.gguf:
        write_gguf(Path(args.gguf), out, config, list(vocab))
    print(f"wrote {out} ({sum(p.stat().st_size for p in out.glob('*.safetensors')) / 2**30:.2f} GiB)")


def write_gguf(path: Path, folder: Path, cfg: dict, tokens: list[str]) -> None:
    """The same weights as an F16 GGUF (llama architecture; Q/K rows permuted as llama.cpp's
    converter does), with the word-level vocabulary as a SentencePiece-style token list."""
    import gguf
    from safetensors import safe_open

    from anybit.io.gguf_export import _permute_rows

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(folder.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(1)  # mostly F16
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([t.encode() for t in tokens])
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    heads = cfg["num_attention_heads"]

    def add(name, t: torch.Tensor, f32: bool = False):
        a = t.float().numpy()
        w.add_tensor(name, np.ascontiguousarray(a if f32 else a.astype(np.float16)))

    with safe_open(str(folder / "model-outer.safetensors"), framework="pt") as st:
        add("token_embd.weight", st.get_tensor("model.embed_tokens.weight"))
        add("output_norm.weight", st.get_tensor("model.norm.weight"), f32=True)
        add("output.weight", st.get_tensor("lm_head.weight"))
    for i in range(cfg["num_hidden_layers"]):
        with safe_open(str(folder / f"model-layer{i:03d}.safetensors"), framework="pt") as st:
            for hf, gg in names.items():
                t = st.get_tensor(f"model.layers.{i}.{hf}.weight")
                if gg in ("attn_q", "attn_k"):
                    t = t[_permute_rows(heads, t.shape[0])]
                add(f"blk.{i}.{gg}.weight", t, f32=gg.endswith("norm"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
