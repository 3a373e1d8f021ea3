"""Tensor parallelism for PixArt-Sigma on NeuronCores with neuronx-distributed (seed 002's recipe).

The T5 encoder and the PixArt transformer are sharded over ``tp_degree`` NeuronCores: in every
attention block the query/key/value projections become ``ColumnParallelLinear`` (each core computes
its share of the heads, ``gather_output=False``) and the output projection ``RowParallelLinear``
(``input_is_parallel=True``: the partial results are summed across cores); the MLPs likewise (T5's
``wi_0``/``wi_1`` and the transformer's GELU projection column-parallel, ``wo`` / the second linear
row-parallel). T5's relative-position bias table is split by heads with them. Everything else (norms,
embeddings, the patch and caption projections, the timestep embedding) is replicated.

``ShardBuilder`` is what ``neuronx_distributed.trace.parallel_model_trace`` calls in each rank's
worker process: it loads *one* component's weights from the model source (never the whole pipeline,
as the seed's scripts do: T5-XXL alone is ~9.5 GB in bf16, per rank), keeps that rank's shard and
returns the traceable wrapper. The parent process never loads the sharded components at all.

``neuronx_distributed`` is imported inside the functions, so this module imports on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CompileError
from ..families import TEXT_ENCODER, TRANSFORMER

# The components compiled sharded (the VAE decoder is traced whole with torch_neuronx.trace).
SHARDED_COMPONENTS = (TEXT_ENCODER, TRANSFORMER)
SHARDS_DIR = "shards"  # parallel_model_save's directory: tp_0.pt ... tp_<n-1>.pt and nothing else


def _layers() -> Any:
    from neuronx_distributed.parallel_layers import layers

    return layers


def _rank() -> int:
    from neuronx_distributed.parallel_layers import parallel_state

    return int(parallel_state.get_tensor_model_parallel_rank())


def _slice(tensor: torch.Tensor, dim: int, rank: int, tp_degree: int) -> torch.Tensor:
    if tensor.shape[dim] % tp_degree:
        raise CompileError(f"cannot shard a dimension of {tensor.shape[dim]} over {tp_degree} NeuronCores")
    share = tensor.shape[dim] // tp_degree
    return tensor.narrow(dim, rank * share, share).clone()


def column_parallel(linear: nn.Linear, rank: int, tp_degree: int) -> nn.Module:
    """``linear`` split by output features: this rank's rows of the weight (and bias)."""
    layer = _layers().ColumnParallelLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                           gather_output=False, dtype=linear.weight.dtype)
    layer.weight.data = _slice(linear.weight.data, 0, rank, tp_degree)
    if linear.bias is not None:
        layer.bias.data = _slice(linear.bias.data, 0, rank, tp_degree)
    return layer


def row_parallel(linear: nn.Linear, rank: int, tp_degree: int) -> nn.Module:
    """``linear`` split by input features; the bias is added once, after the sum across cores."""
    layer = _layers().RowParallelLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                        input_is_parallel=True, dtype=linear.weight.dtype)
    layer.weight.data = _slice(linear.weight.data, 1, rank, tp_degree)
    if linear.bias is not None:
        layer.bias.data = linear.bias.data.detach().clone()
    return layer


def _check_heads(what: str, heads: int, tp_degree: int) -> None:
    if heads % tp_degree:
        raise CompileError(f"{what} has {heads} attention heads, which do not split over tp_degree {tp_degree}; "
                           f"choose a tp_degree that divides {heads} in the registry")


def shard_t5_attention(attention: nn.Module, rank: int, tp_degree: int) -> None:
    """A ``T5Attention``: q, k, v column-parallel, o row-parallel, its heads (and the relative-position
    bias table, one column per head) divided by ``tp_degree``."""
    _check_heads("the T5 encoder", attention.n_heads, tp_degree)
    attention.n_heads //= tp_degree
    attention.inner_dim = attention.n_heads * attention.key_value_proj_dim
    for name in ("q", "k", "v"):
        setattr(attention, name, column_parallel(getattr(attention, name), rank, tp_degree))
    attention.o = row_parallel(attention.o, rank, tp_degree)
    if getattr(attention, "has_relative_attention_bias", False):
        table = attention.relative_attention_bias
        sharded = nn.Embedding(table.num_embeddings, attention.n_heads, dtype=table.weight.dtype)
        sharded.weight.data = _slice(table.weight.data, 1, rank, tp_degree)
        attention.relative_attention_bias = sharded


def shard_t5_mlp(dense: nn.Module, rank: int, tp_degree: int) -> None:
    """T5's ``DenseReluDense`` (gated: wi_0, wi_1; or wi): input projections column-, wo row-parallel."""
    for name in ("wi_0", "wi_1", "wi"):
        if hasattr(dense, name):
            setattr(dense, name, column_parallel(getattr(dense, name), rank, tp_degree))
    dense.wo = row_parallel(dense.wo, rank, tp_degree)


def shard_t5_encoder(text_encoder: nn.Module, rank: int, tp_degree: int) -> nn.Module:
    for block in text_encoder.encoder.block:
        shard_t5_attention(block.layer[0].SelfAttention, rank, tp_degree)
        shard_t5_mlp(block.layer[1].DenseReluDense, rank, tp_degree)
    return text_encoder


def shard_dit_attention(attention: nn.Module, rank: int, tp_degree: int) -> None:
    """A diffusers ``Attention`` (self or cross): to_q/to_k/to_v column-, to_out[0] row-parallel."""
    _check_heads("the PixArt transformer", attention.heads, tp_degree)
    attention.heads //= tp_degree
    attention.inner_dim //= tp_degree
    for name in ("to_q", "to_k", "to_v"):
        setattr(attention, name, column_parallel(getattr(attention, name), rank, tp_degree))
    attention.to_out[0] = row_parallel(attention.to_out[0], rank, tp_degree)


def shard_dit_mlp(feed_forward: nn.Module, rank: int, tp_degree: int) -> None:
    """A diffusers ``FeedForward``: the GELU's input projection column-, the output linear row-parallel."""
    feed_forward.net[0].proj = column_parallel(feed_forward.net[0].proj, rank, tp_degree)
    feed_forward.net[2] = row_parallel(feed_forward.net[2], rank, tp_degree)


def shard_pixart_transformer(transformer: nn.Module, rank: int, tp_degree: int) -> nn.Module:
    for block in transformer.transformer_blocks:
        shard_dit_attention(block.attn1, rank, tp_degree)
        shard_dit_attention(block.attn2, rank, tp_degree)
        shard_dit_mlp(block.ff, rank, tp_degree)
    return transformer


_SHARDERS = {TEXT_ENCODER: shard_t5_encoder, TRANSFORMER: shard_pixart_transformer}


@dataclass(frozen=True)
class ShardBuilder:
    """Called by ``parallel_model_trace`` once per rank (in that rank's process; it must pickle):
    loads ``component`` of ``spec``, keeps this rank's shard, returns ``(traceable module, aliases)``."""

    spec: Any  # engine.registry.ModelSpec
    component: str
    tp_degree: int

    def __call__(self) -> tuple[nn.Module, dict]:
        from ..pixart import traceable
        from ..sources import TORCH_DTYPES, ComponentLoader

        # bf16 weights where the registry says bf16, as the seed loads the pipeline (torch_dtype=bfloat16)
        loader = ComponentLoader(self.spec, TORCH_DTYPES[self.spec.dtype])
        try:
            module = loader.module(self.component)
        finally:
            loader.close()
        with torch.no_grad():
            sharded = _SHARDERS[self.component](module, _rank(), self.tp_degree)
        if self.component == TRANSFORMER:
            # The classic bmm + softmax attention instead of scaled_dot_product_attention (seed 002 swaps
            # SDPA for its own bmm version as well). Set on the module, not patched globally: this runs in
            # the rank's process, where the parent's tracing context does not reach.
            from diffusers.models.attention_processor import AttnProcessor

            sharded.set_attn_processor(AttnProcessor())
        return traceable(self.component, sharded), {}


__all__ = ["SHARDED_COMPONENTS", "SHARDS_DIR", "ShardBuilder", "column_parallel", "row_parallel",
           "shard_dit_attention", "shard_dit_mlp", "shard_pixart_transformer", "shard_t5_attention",
           "shard_t5_encoder", "shard_t5_mlp"]
