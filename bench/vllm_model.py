"""A random-initialised Llama-architecture model saved locally, for engine tests and ``kvrack bench e2e``.

No model hub is needed: the weights are random (seeded), the tokenizer a word-level one whose token ``i`` is the
word ``t{i}``, so prompts are token ids (``skip_tokenizer_init``) or those words. What a prefix hit saves depends
on the ratio of compute to KV bytes per token, which ``describe`` states next to a production model's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden: int = 1024
    layers: int = 8
    heads: int = 16
    kv_heads: int = 4  # grouped-query attention, as production models
    head_dim: int = 64
    intermediate: int = 2816
    vocab: int = 32000
    max_len: int = 16384
    dtype: str = "float32"  # greedy tokens of a random model compare reliably in float32 only

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]

    def flops_per_token(self) -> int:
        """Dense matmul FLOPs of one token's forward pass (attention over the context not counted)."""
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return 2 * self.layers * (attn + mlp) + 2 * self.hidden * self.vocab


LLAMA3_8B = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256,
                       dtype="bfloat16")


def describe(shape: ModelShape) -> dict[str, Any]:
    """Compute and KV bytes per token of ``shape`` and of Llama-3-8B, and their ratio (what a hit saves per byte)."""
    def one(s: ModelShape) -> dict[str, Any]:
        return {"gflops_per_token": round(s.flops_per_token() / 1e9, 3), "kv_bytes_per_token": s.kv_bytes_per_token(),
                "flops_per_kv_byte": round(s.flops_per_token() / s.kv_bytes_per_token(), 1)}
    return {"model": one(shape), "llama3_8b_bf16": one(LLAMA3_8B)}


def build_model(directory: str, shape: ModelShape = ModelShape(), seed: int = 0) -> str:
    """Save the model (and its tokenizer) in ``directory`` unless it is there already; returns the directory."""
    marker = os.path.join(directory, "kvrack-model.json")
    if os.path.exists(marker) and json.load(open(marker)) == dataclasses.asdict(shape):
        return directory
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                         max_position_embeddings=shape.max_len, rms_norm_eps=1e-5, torch_dtype=shape.dtype,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).to(getattr(torch, shape.dtype)).save_pretrained(directory, safe_serialization=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, shape.vocab)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            model_max_length=shape.max_len).save_pretrained(directory)
    with open(marker, "w") as fh:
        json.dump(dataclasses.asdict(shape), fh)
    return directory


def prompt(length: int, seed: int, vocab: int = 32000) -> list[int]:
    """``length`` token ids, the same for the same seed (ids 3.. avoid the special tokens)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


def engine_args(model_dir: str, kv_transfer_config: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """vLLM engine arguments that run the model on this machine's CPU (eager: a compiled start takes a minute)."""
    args: dict[str, Any] = dict(model=model_dir, skip_tokenizer_init=True, dtype="float32", block_size=32,
                                max_model_len=16384, max_num_batched_tokens=16384, max_num_seqs=4,
                                gpu_memory_utilization=0.3, enable_prefix_caching=True, disable_log_stats=False,
                                seed=0, enforce_eager=True)
    if kv_transfer_config is not None:
        args["kv_transfer_config"] = kv_transfer_config
    args.update(overrides)
    return args


def connector_config(address: str, role: str = "kv_both", **extra: Any) -> dict[str, Any]:
    """``--kv-transfer-config`` for kvrack's connector."""
    return {"kv_connector": "KvrackConnector", "kv_connector_module_path": "kvrack.clients.vllm", "kv_role": role,
            "kv_connector_extra_config": {"kvrack.address": address, **extra}}
