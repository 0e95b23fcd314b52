"""Tiny HuggingFace and MindFormers Qwen3 / Qwen3-MoE models for the HF <-> MindFormers tests.

HF side: transformers builds a seeded random model (every tensor random, norms
included, so a misplaced tensor changes the logits) and saves it as sharded
safetensors with ``model.safetensors.index.json``.

MindFormers side: MindFormers 1.9's mcore training models (``TrainingQwen3ForCausalLM``,
``TrainingQwen3MoeForCausalLM``) built on CPU.  Their forward pass needs four
test-only patches on CPU (:func:`cpu_patches`), with fp32 and ``use_flash_attention=False``:

1. the fused ``RmsNorm`` kernel (no CPU kernel) -> the plain RMSNorm formula;
2. ``Outer`` in the rotary embedding (no CPU kernel) -> a broadcast multiply;
3. ``FlashAttention`` (Ascend only) -> plain causal softmax attention with GQA;
4. ``Attention._repeat_kv`` -> a no-op (it assumes BNSD while the tensors are SBND
   here; the replacement attention repeats the KV heads itself).

MindFormers' mcore models need ``use_legacy=False`` in its process-wide context;
:func:`mcore_context` sets it and puts the previous value back.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import numpy as np

QWEN3 = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
    tie_word_embeddings=False,
)
QWEN3_MOE = dict(QWEN3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                 mlp_only_layers=[], norm_topk_prob=True)
SEQ = 8


def randomize_torch(model, seed: int) -> None:
    """Every parameter random: linears N(0, 0.05), norms 1 + N(0, 0.2)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.05 * noise)


def make_hf(path: str, *, moe: bool = False, seed: int = 0, max_shard_size: str = "24KB", **overrides):
    """Save a random tiny transformers Qwen3 (or Qwen3-MoE) in ``path``; return the model (eval mode)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model: transformers.PreTrainedModel
    if moe:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{**QWEN3_MOE, **overrides}))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**QWEN3, **overrides}))
    randomize_torch(model, seed)
    model.eval()
    model.save_pretrained(path, max_shard_size=max_shard_size, safe_serialization=True)
    return model


def read_hf(path: str) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory (single file or index + shards), as numpy."""
    from safetensors.numpy import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, np.ndarray] = {}
    for name in files:
        out.update(load_file(os.path.join(path, name)))
    return out


def hf_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


# -- MindFormers -------------------------------------------------------------------


@contextlib.contextmanager
def mcore_context() -> Iterator[None]:
    """MindFormers' context with ``use_legacy=False`` (mcore models), GRAPH mode on CPU; restored after."""
    import mindspore as ms
    from mindformers.core.context.build_context import MFContextOperator, build_context

    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)  # an earlier test may have left PyNative on (Morph needs GRAPH)
    inst = MFContextOperator.get_mf_ctx_instance()
    if inst is None:
        build_context({"use_legacy": False, "context": {"mode": 0, "device_target": "CPU"}, "parallel": {}})
        inst = MFContextOperator.get_mf_ctx_instance()
        prev = None
    else:
        prev = inst.get_context("use_legacy")
    inst.use_legacy = False
    try:
        yield
    finally:
        inst.use_legacy = prev
        ms.set_context(mode=mode)


def _cpu_replacements():
    """The replacement functions; built here so that MindSpore's graph parser finds ``ops`` as a closure."""
    import mindspore as ms
    from mindspore import nn, ops

    def plain_rms_norm(self, x):
        dtype = x.dtype
        x = ops.cast(x, self.compute_type)
        y = x * ops.rsqrt(ops.mean(ops.square(x), -1, keep_dims=True) + self.eps)
        return ops.cast(y * self.weight, dtype)

    def plain_attention(self, query, key, value, attention_mask, *args, **kwargs):
        """Causal softmax attention; query (S, B, N, D), key/value (S, B, Nkv, D) -> (S, B, N*D)."""
        s, b, n, d = query.shape
        rep = n // key.shape[2]
        q = ops.transpose(query, (1, 2, 0, 3))
        k = ops.repeat_interleave(ops.transpose(key, (1, 2, 0, 3)), rep, 1)
        v = ops.repeat_interleave(ops.transpose(value, (1, 2, 0, 3)), rep, 1)
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / (d ** 0.5)
        scores = scores + ms.Tensor(np.triu(np.full((s, s), -1e30, np.float32), 1))
        out = ops.matmul(ops.softmax(scores, -1), v)
        return ops.reshape(ops.transpose(out, (2, 0, 1, 3)), (s, b, n * d))

    class BroadcastOuter(nn.Cell):
        def construct(self, a, b):
            return ops.reshape(a, (-1, 1)) * ops.reshape(b, (1, -1))

        def shard(self, *args, **kwargs):
            return self

    def no_repeat_kv(self, x, rep):
        return x

    return plain_rms_norm, plain_attention, BroadcastOuter, no_repeat_kv


@contextlib.contextmanager
def cpu_patches() -> Iterator[None]:
    """The four CPU patches of the module docstring (active while models are built and compiled)."""
    import pytest
    from mindformers.parallel_core.training_graph.base_models.common.embeddings import rotary_pos_embedding
    from mindformers.parallel_core.training_graph.transformer import attention, flash_attention, norm

    rms_norm, attention_fn, outer, no_repeat_kv = _cpu_replacements()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(norm.FusedRMSNorm, "construct", rms_norm)
        mp.setattr(rotary_pos_embedding, "Outer", outer)
        mp.setattr(flash_attention.FlashAttention, "construct", attention_fn)
        mp.setattr(attention.Attention, "_repeat_kv", no_repeat_kv)
        yield


def mf_model(config: dict, *, qkv_layout: str = "interleaved", ffn_layout: str = "interleaved"):
    """A MindFormers mcore training Qwen3 / Qwen3-MoE for an HF-style config dict, fp32, on CPU."""
    moe = bool(config.get("num_experts"))
    if moe:
        from mindformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig as Cfg
        from mindformers.models.qwen3_moe.modeling_qwen3_moe_train import TrainingQwen3MoeForCausalLM as Model
    else:
        from mindformers.models.qwen3.configuration_qwen3 import Qwen3Config as Cfg  # type: ignore[assignment]
        from mindformers.models.qwen3.modeling_qwen3_train import TrainingQwen3ForCausalLM as Model  # type: ignore
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "tie_word_embeddings", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob")
    kwargs = {k: config[k] for k in keys if k in config}
    if moe:
        kwargs["moe_grouped_gemm"] = True
    cfg = Cfg(
        **kwargs, seq_length=SEQ, compute_dtype="float32", params_dtype="float32",
        layernorm_compute_dtype="float32", softmax_compute_dtype="float32", rotary_dtype="float32",
        use_flash_attention=False,
        use_contiguous_weight_layout_attention=qkv_layout == "contiguous",
        use_interleaved_weight_layout_mlp=ffn_layout == "interleaved",
    )
    return Model(cfg)


def mf_params(model) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy() for p in model.get_parameters()}


def mf_load(model, tensors: dict[str, np.ndarray]) -> None:
    """Load ``tensors`` into ``model``; every model parameter except MoE buffers must be given."""
    import mindspore as ms

    params = {n: ms.Parameter(ms.Tensor(a), name=n) for n, a in tensors.items()}
    not_loaded, unused = ms.load_param_into_net(model, params, strict_load=True)
    not_loaded = [n for n in not_loaded if not n.endswith(("fi_accu", "expert_load"))]
    if not_loaded or unused:
        raise AssertionError(f"parameters not loaded: {not_loaded}; tensors unused: {unused}")


def mf_logits(model, ids: np.ndarray) -> np.ndarray:
    import mindspore as ms

    out = model(ms.Tensor(ids.astype(np.int32)))
    return out.asnumpy().reshape(ids.shape[0], ids.shape[1], -1)
