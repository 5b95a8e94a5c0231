"""An encoder's inference forward as a chain of executables, attention compiled apart.

XLA's compiler options apply to a whole executable. On CPU the encoder's two kinds of
matmul want different ones: the dense projections run fastest on XLA's own dot
kernels (YNNPACK's library fusions off, as `qdr_jax.platform.tune_process` sets), the
attention core's 384 small batched products per layer on YNNPACK's dot fusions (the core of a
32 x 256 batch 45 ms against 63, the whole forward 2-10% less; docs/cpu-performance.md).
So the forward runs as: embeddings + layer 0's projection; per layer the attention
core, then the layer's second half + the next layer's projection; the last layer's
second half + pooling. Every stage is dispatched asynchronously, so a caller that
dispatches batch i+1 before fetching batch i keeps the device as busy as with one
executable.

Same parameters, same math as `BertEncoder.__call__` (the stages are its own methods),
except that the core shifts each softmax row by a cheap lower bound of its maximum
instead of the maximum itself (`attention_core`'s 'first_or_self', with an exact
fallback); the outputs differ only by float rounding (1e-7 on MiniLM). Inference only: training keeps one
jitted step, whose backward needs the whole graph.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import jax

from qdr_jax import platform
from qdr_jax.models.bert import BertEncoder, TransformerLayer, attention_core

# YNNPACK dot fusions for the attention core's executable: its batched 256x32x256
# products are where XLA:CPU's default dot emitter is slowest (docs/cpu-performance.md).
ATTENTION_CORE_CPU_OPTIONS: dict[str, Any] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def use_staged_forward() -> bool:
  """Whether the corpus forward runs staged: on CPU, where the options above exist.

  Accelerators fuse attention in one kernel (cuDNN, the TPU kernel) and gain nothing
  from a split.
  """
  return platform.is_cpu()


def make_staged_apply(module: BertEncoder, core_options: dict[str, Any] | None = None,
                      softmax_shift: str = 'first_or_self') -> Callable[..., jax.Array]:
  """``(params, input_ids, attention_mask, token_type_ids) -> (B, d)``, as `make_apply`'s
  function (and already jitted), run stage by stage.

  Args:
    module: the encoder.
    core_options: XLA compiler options of the attention core's executable
      (default `ATTENTION_CORE_CPU_OPTIONS`).
    softmax_shift: `attention_core`'s; 'first_or_self' skips the row maximum, a
      third of the core's time with the options above (docs/cpu-performance.md).
  """
  layer = TransformerLayer(module.config)
  names = [f"layer_{i}" for i in range(module.config.num_layers)]
  options = ATTENTION_CORE_CPU_OPTIONS if core_options is None else core_options

  def project(layer_params, x):
    return layer.apply({"params": layer_params}, x, method=TransformerLayer.project)

  def finish(layer_params, x, ctx):
    return layer.apply({"params": layer_params}, x, ctx, method=TransformerLayer.finish)

  @jax.jit
  def start(params, input_ids, attention_mask, token_type_ids):
    x, mask_bias = module.apply({"params": params}, input_ids, attention_mask,
                                token_type_ids, method=BertEncoder.embed_tokens)
    return x, mask_bias, project(params[names[0]], x)

  core = jax.jit(functools.partial(attention_core, softmax_shift=softmax_shift),
                 compiler_options=options or None)

  @jax.jit
  def between(layer_params, next_layer_params, x, ctx):
    x = finish(layer_params, x, ctx)
    return x, project(next_layer_params, x)

  @jax.jit
  def end(params, x, ctx, attention_mask):
    hidden = finish(params[names[-1]], x, ctx)
    return module.apply({"params": params}, hidden, attention_mask, method=BertEncoder.pool)

  def apply(params, input_ids, attention_mask, token_type_ids):
    if isinstance(input_ids, jax.core.Tracer):
      # Under an outer transformation (jit, eval_shape, vmap) the stages would be traced
      # into one graph anyway, where per-executable options do not exist: trace the
      # encoder's own forward.
      return module.apply({"params": params}, input_ids, attention_mask, token_type_ids)
    x, mask_bias, qkv = start(params, input_ids, attention_mask, token_type_ids)
    for name, next_name in itertools.pairwise(names):
      x, qkv = between(params[name], params[next_name], x, core(*qkv, mask_bias))
    return end(params, x, core(*qkv, mask_bias), attention_mask)

  return apply
