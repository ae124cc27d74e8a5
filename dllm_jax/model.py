"""The Qwen2 / Llama decoder-only transformer in Flax Linen.

One model serves AR training and decoding, block-diffusion training over `[noisy ; clean]`, and
block decoding against a KV cache: what differs is only the attention mask (`masks.MaskSpec` plus
per-token `masks.TokenMeta`) and whether a cache is read and written.

Layers are one `nn.scan` so compile time does not grow with depth; every parameter carries
logical axis names (see `sharding`). Checkpoints and training use that stacked layout
(`params["layers"]`, leading axis = layer); `unstack_layers` gives the per-layer layout
(`params["layers_0"]`, ...), one buffer per layer run by an unrolled Python loop, for decoding
where a step is a few small kernels per layer and must not copy weights. `forward` takes either;
`with_layout` converts. Apart from that, the projection kernels are stored [*in, *out] or
[*out, *in] (`ModelConfig.kernel_layout`); `with_kernel_layout` converts.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dllm_jax import attention, masks
from dllm_jax import sharding as ax
from dllm_jax.cache import KVCache, write
from dllm_jax import config as config_lib
from dllm_jax.config import ModelConfig

Params = Any
_log = logging.getLogger(__name__)


def _init(std: float, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float):
  """(cos, sin) float32 [B, T, head_dim / 2] of `rope`."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(freqs), jnp.sin(freqs)


def rope(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the HF "rotate half" layout (first half of head_dim pairs with second)."""
  d = x_BTHD.shape[-1]
  cos, sin = (t[:, :, None, :] for t in rope_tables(positions_BT, d, theta))
  x = x_BTHD.astype(jnp.float32)
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHD.dtype)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (ax.NORM,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # HF casts back to the input dtype before the scale; doing the same keeps bf16 parity.
    return scale.astype(self.dtype) * y.astype(self.dtype)


def _matmul(x_K: jax.Array, w_KN: jax.Array, out_major: bool = False,
            one_row_as_two: bool = True) -> jax.Array:
  """x [..., K] @ w [K, N] (w [N, K] with `out_major`). A single row (a one-token decode step at
  batch 1) is multiplied as two equal rows: XLA's GPU simplifier turns a vector-matrix dot whose
  operands have under 10M elements (the 1.5B's q/k/v/o) into an elementwise product and a
  reduction, which read the weights at a fraction of a GEMM's bandwidth (BENCHMARKS.md, decode
  profile); a two-row dot stays a GEMM. Any other shape (or `one_row_as_two=False`) is one
  plain dot."""
  if out_major:
    dot = lambda a: jax.lax.dot_general(a, w_KN, (((a.ndim - 1,), (1,)), ((), ())))
  else:
    dot = lambda a: jnp.dot(a, w_KN)
  lead = x_K.shape[:-1]
  if math.prod(lead) != 1 or not one_row_as_two:
    return dot(x_K)
  row = x_K.reshape(1, x_K.shape[-1])
  return dot(jnp.concatenate([row, row]))[:1].reshape(*lead, -1)


class Projection(nn.Module):
  """`x [..., *in] @ kernel [*in, *out] -> [..., *out]` (+ bias [*out]), kernel N-D; with
  `out_major` the kernel is stored [*out, *in] (`ModelConfig.kernel_layout` "out_in").

  nn.DenseGeneral initialises its kernel flattened to 2-D and boxes that with the N-D logical
  names; flax re-runs the initializer during apply (its shape check), so under active logical
  axis rules and a mesh that mismatch raises. Here the kernel is made in its full shape, and used
  as the 2-D matrix DenseGeneral multiplies by (x's trailing dims and the kernel's leading dims
  flattened in order, as in the HF Linear layers): on a GPU, XLA lowered the N-D contraction of
  a one-token decode step (q/k/v [E, H, D], o [H, D, E]) to reduction fusions that read the
  weights at about a quarter of the bandwidth of its GEMM fusions (BENCHMARKS.md).
  As in DenseGeneral, inputs, kernel and bias are cast to `dtype` and the result is in `dtype`.
  """

  num_in: int  # how many trailing dims of x (= leading dims of the kernel) are contracted
  kernel_shape: tuple[int, ...]  # [*in, *out], whatever the layout
  kernel_axes: tuple[str, ...]  # their logical names, likewise
  bias_axes: Optional[tuple[str, ...]]  # logical names of [*out]; None: no bias
  dtype: Any
  param_dtype: Any
  out_major: bool = False  # the kernel stored [*out, *in]
  one_row_as_two: bool = True  # `_matmul`'s; False multiplies one row as nn.Dense does

  @nn.compact
  def __call__(self, x):
    n = self.num_in
    k_in, k_out = self.kernel_shape[:n], self.kernel_shape[n:]
    order = (lambda t: tuple(t[n:]) + tuple(t[:n])) if self.out_major else tuple
    kernel = self.param("kernel", _init(0.02, order(self.kernel_axes)), order(self.kernel_shape),
                        self.param_dtype)
    if tuple(x.shape[x.ndim - n:]) != tuple(k_in):
      # The flattening below would accept any input with as many elements and scramble it.
      raise ValueError(f"{self.name}: input {x.shape} must end in the kernel's input dims "
                       f"{tuple(k_in)} (kernel {tuple(kernel.shape)})")
    x2 = x.reshape(*x.shape[:x.ndim - n], math.prod(k_in)).astype(self.dtype)
    if self.out_major:
      w2 = kernel.reshape(math.prod(k_out), math.prod(k_in)).astype(self.dtype)
      y = _matmul(x2, w2, out_major=True, one_row_as_two=self.one_row_as_two)
    else:
      w2 = kernel.reshape(math.prod(k_in), math.prod(k_out)).astype(self.dtype)
      # (`_matmul` called as the --plain-dot benchmarks replace it: jnp.dot(x, w).)
      y = _matmul(x2, w2) if self.one_row_as_two else jnp.dot(x2, w2)
    y = y.reshape(*x.shape[:x.ndim - n], *k_out)
    if self.bias_axes is not None:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.bias_axes),
                        self.kernel_shape[n:], self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class _Embed(nn.Embed):
  """nn.Embed whose lookup can gather the table's fsdp axis first (`gather_table`: training). The
  table's embed axis is split over fsdp and the batch over (data, fsdp): XLA cannot move a
  gather's output from the one to the other, and replicated the whole [B, T, E] activation on
  every device (its "involuntary full rematerialization", forward and backward, on any mesh with
  data > 1 and fsdp > 1). Gathering the table in the compute dtype first is what FSDP does for
  every other weight."""

  gather_table: bool = False

  def __call__(self, inputs):
    if not self.gather_table:
      return super().__call__(inputs)
    table = nn.with_logical_constraint(jnp.asarray(self.embedding, self.dtype), (ax.VOCAB, None))
    return jnp.take(table, inputs, axis=0)


class Attention(nn.Module):
  cfg: ModelConfig
  spec: masks.MaskSpec

  @nn.compact
  def __call__(self, x_BTE, meta: masks.TokenMeta, cache_kv, write_mask=None):
    cfg = self.cfg
    proj = functools.partial(Projection, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             out_major=cfg.kernel_layout == "out_in")
    e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bias = lambda heads: (heads, ax.HEAD_DIM) if cfg.qkv_bias else None
    q = proj(1, (e, h, d), (ax.EMBED, ax.HEADS, ax.HEAD_DIM), bias(ax.HEADS), name="q")(x_BTE)
    k = proj(1, (e, kv, d), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), bias(ax.KV_HEADS), name="k")(
        x_BTE)
    v = proj(1, (e, kv, d), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), bias(ax.KV_HEADS), name="v")(
        x_BTE)
    q = rope(q, meta.positions, cfg.rope_theta)
    k = rope(k, meta.positions, cfg.rope_theta)
    q = nn.with_logical_constraint(q, (ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None))
    k = nn.with_logical_constraint(k, (ax.BATCH, ax.LENGTH, ax.ACT_KV_HEADS, None))

    if cache_kv is None:
      out = attention.attend(q, k, v, self.spec, meta, meta, cfg.attention_impl,
                             contract="layout")
      new_cache = None
    else:
      out, new_cache = _cached_attention(cfg, self.spec, q, k, v, meta, cache_kv, write_mask)

    y = proj(2, (h, d, e), (ax.HEADS, ax.HEAD_DIM, ax.EMBED), None, name="o")(out)
    return y, new_cache


def _cached_attention(cfg: ModelConfig, spec: masks.MaskSpec, q, k, v, meta: masks.TokenMeta,
                      cache_kv, write_mask):
  """Writes k, v [B, T, KV, D] into the cache at the rows' positions and attends q over it:
  (out [B, T, H, D], new (k, v) cache). Cached tokens are clean tokens of one sequence whose
  slot index is their position."""
  cache_k, cache_v = cache_kv
  start = meta.positions[:, 0]
  cache_k = write(cache_k, k, start, write_mask)
  cache_v = write(cache_v, v, start, write_mask)
  batch, max_len = cache_k.shape[:2]
  k_meta = masks.TokenMeta.simple(
      jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len)))
  q_meta = masks.TokenMeta.simple(meta.positions)
  out = attention.attend(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), spec, q_meta,
                         k_meta, cfg.attention_impl, contract="cache")
  return out, (cache_k, cache_v)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    e, f = cfg.hidden_size, cfg.intermediate_size
    if cfg.kernel_layout == "out_in":  # (one row as one, as nn.Dense: the layouts compare alike)
      dense = lambda n_in, n_out, name, axes: Projection(
          1, (n_in, n_out), axes, None, cfg.dtype, cfg.param_dtype, out_major=True,
          one_row_as_two=False, name=name)
    else:
      dense = lambda n_in, n_out, name, axes: nn.Dense(
          n_out, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
          kernel_init=_init(0.02, axes))
    gate = dense(e, f, "gate", (ax.EMBED, ax.MLP))(x)
    up = dense(e, f, "up", (ax.EMBED, ax.MLP))(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, (ax.BATCH, ax.LENGTH, ax.ACT_MLP))
    return dense(f, e, "down", (ax.MLP, ax.EMBED))(h)


class DecoderLayer(nn.Module):
  cfg: ModelConfig
  spec: masks.MaskSpec
  # A one-row step by `kernels.matvec` (`Transformer` decides): x is then the triple
  # `_fused_row_layer` takes and returns, not [B, T, E].
  row_kernels: bool = False

  @nn.compact
  def __call__(self, x_BTE, meta: masks.TokenMeta, cache_kv, write_mask=None):
    cfg = self.cfg
    if self.row_kernels:
      return _fused_row_layer(self.variables["params"], cfg, self.spec, x_BTE, meta, cache_kv,
                              write_mask)
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
    h, new_cache = Attention(cfg, self.spec, name="attn")(norm(name="attn_norm")(x_BTE), meta,
                                                         cache_kv, write_mask)
    x = x_BTE + h
    x = x + MLP(cfg, name="mlp")(norm(name="mlp_norm")(x))
    x = nn.with_logical_constraint(x, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))
    return x, new_cache


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  _log.warning(message)


def _row_kernels(cfg: ModelConfig, stacked: bool) -> bool:
  """Whether a one-row decode step runs `kernels.matvec` (`model.matvec_impl`)."""
  if cfg.matvec_impl == "xla":
    return False
  from dllm_jax.kernels import matvec  # lazily: the CPU path never needs Pallas

  backend = jax.default_backend()
  why = matvec.supported(cfg.hidden_size, (cfg.num_heads * cfg.head_dim,
                                           cfg.num_kv_heads * cfg.head_dim,
                                           cfg.intermediate_size))
  mesh = jax.sharding.get_abstract_mesh()
  sharded = not mesh.empty and any(mesh.shape[a] > 1 for a in mesh.axis_names)
  if cfg.matvec_impl == "auto":
    # Only where it was measured to pay (H200, BENCHMARKS.md session 17): a Hopper GPU (the
    # kernels' tiles were sized for its shared memory), bf16 weights (others would be converted
    # every step; XLA fuses that into its GEMM), the per-layer layout (a layer sliced out of the
    # stack would be copied for the call), and a gate/up pair narrow enough for the default
    # tiles (the 7B's wide one was only level with XLA).
    if backend != "gpu":
      return False
    from dllm_jax.kernels import flash_mgpu  # its Hopper check; Mosaic GPU only on a GPU

    return (why is None and not sharded and not stacked
            and cfg.dtype == cfg.param_dtype == "bfloat16" and flash_mgpu.on_hopper()
            and matvec.default_knobs([cfg.intermediate_size], True)["block_n"] == 32)
  where = "model.matvec_impl='pallas'"
  if backend not in ("gpu", "cpu"):
    raise ValueError(f"{where} runs a Triton kernel, which has no {backend!r} lowering (GPU "
                     "only; the CPU interprets it): use 'xla' or 'auto'")
  if why is not None:
    raise ValueError(f"{where}: this model's shapes are not covered ({why}); use 'xla' or 'auto'")
  if sharded:
    # The kernel is one custom call: on a mesh it would gather every sharded weight.
    _warn_once(f"{where} is ignored on device mesh {dict(mesh.shape)}: the one-row "
               "projections run as XLA (the kernel would gather the sharded weights)")
    return False
  return True


def decode_kernel_layout(cfg: ModelConfig, *, mode: str, batch: int, stacked: bool) -> str:
  """The kernel layout to decode in (`ModelConfig.kernel_layout`): "out_in" where the steps run
  the one-row kernels (AR at batch 1 with `matvec_impl` resolving to them), which read it
  faster, else "in_out", which XLA's GEMMs of a block's or a batch's rows read faster (H200,
  BENCHMARKS.md session 24: the 1.5B's batch-1 AR 3.4% more tokens/s out_in; its diffusion
  forwards 1-3% slower). `decode.py` and `dllm_jax.eval` convert to it by default."""
  one_row = mode == "ar" and batch == 1
  return "out_in" if one_row and _row_kernels(cfg, stacked) else "in_out"


# Whether the one-row step runs `kernels.decode.row_attention` where it applies (a knob for
# benchmarks/decode_profile.py's comparison with the kernels it replaces).
ROW_ATTENTION = True


def _row_attention(cfg: ModelConfig, spec: masks.MaskSpec, max_len: int) -> bool:
  """Whether the one-row step's attention, with its RoPE and cache write, is one kernel
  (`kernels.decode.row_attention`): the Pallas attention on, a causal or block-causal mask, and
  shapes it covers with a cache no longer than it was measured at (`decode.ROW_MAX_SLOTS`),
  with its splits combined by the o launch (`matvec.combined_matvec_partials`); else
  `_cached_attention` after XLA's RoPE and cache write, and a plain o launch."""
  if not ROW_ATTENTION or attention.resolve_impl(cfg.attention_impl) != "pallas":
    return False
  if spec.kind not in ("causal", "block_causal"):
    return False
  from dllm_jax.kernels import decode

  return (max_len <= decode.ROW_MAX_SLOTS and
          decode.row_supported(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, max_len) is None)


# Which of the one-row step's MLP launches run `kernels.matvec_mgpu`'s Mosaic GPU launches (TMA,
# rows spread evenly over the SMs) where they apply, instead of `kernels.matvec`'s Triton ones,
# and on which units their products run: launch -> "cuda_cores" | "wgmma"
# (`matvec_mgpu.PRODUCT_KINDS`) | None (Triton). Gate/up on the CUDA cores, down Triton's: the
# fastest of five settings in one H200 call at the 1.5B, batch-1 AR 782 tok/s against 751 with
# both Triton's; down's TMA launch is slower on CUDA cores (25 us a layer against ~9.5) and no
# faster on wgmma (BENCHMARKS.md, session 27); measured at that shape only (at 7B the one-row
# kernels run only under matvec_impl="pallas"). A knob for the benchmarks' `--row-tma`; read as a
# step is traced (set it before the first trace, or `jax.clear_caches()`).
ROW_TMA: dict[str, Optional[str]] = {"gate_up": "cuda_cores", "down": None}


def _row_tma(cfg: ModelConfig, out_major: bool, interpret: bool,
             parts: Optional[int] = None) -> Optional[str]:
  """The products (`ROW_TMA`'s) with which the one-row step's down (`parts` None), or its
  gate/up adding `parts` float32 partial sums, runs `kernels.matvec_mgpu`; None where it runs
  `kernels.matvec`: off in `ROW_TMA`, or not out-major bf16 weights, a shape the launch does not
  cover or whose buffers do not fit, or no Hopper GPU (the CPU's interpreter runs them, with
  the CUDA cores' products: wgmma's are GPU-only). Each launch falls back alone: the down parts'
  count is free for the next launch to add."""
  products = ROW_TMA["down" if parts is None else "gate_up"]
  if not (products and out_major and cfg.dtype == "bfloat16"):
    return None
  from dllm_jax.kernels import flash_mgpu, matvec_mgpu

  products = "cuda_cores" if interpret else products
  if not (interpret or flash_mgpu.on_hopper()):
    return None
  why = matvec_mgpu.launch_unsupported(cfg.hidden_size, cfg.intermediate_size, parts, products)
  return products if why is None else None


def _fused_row_layer(p: Params, cfg: ModelConfig, spec: masks.MaskSpec, x, meta, cache_kv,
                     write_mask):
  """`DecoderLayer` for a single row (B = T = 1) against the cache, by `kernels.matvec`: the
  same arithmetic in four launches of its own and the attention's (five a layer where XLA runs
  about seventeen) where `_row_attention` says: that launch (`kernels.decode.row_attention`)
  also sums the q/k/v parts, applies RoPE and writes the cache, and the o launch combines its
  splits as it loads its row (`matvec.combined_matvec_partials`). Elsewhere five small XLA
  kernels do that around `decode_attention`; in one H200 call at the 1.5B shape and 640 cache
  slots they and the attention took 10.0 us a layer, `row_attention` (4 splits, combining
  its own splits) 8.4 (BENCHMARKS.md, session 21).

  Per `ROW_TMA` (`_row_tma`; by default gate/up) gate/up or down, or both, run
  `kernels.matvec_mgpu`'s Mosaic GPU launches instead of `kernels.matvec`'s, same arithmetic.

  x = (row [E], pending): the residual stream is the row plus `pending`, the previous layer's
  down product as float32 partial sums [S, E] (or None), which this layer's first launch adds
  (as the o product's parts are added by the MLP's launch): split-K products fill the GPU, and
  no kernel runs only to sum them or to add the residual. Returns the same pair."""
  from dllm_jax.kernels import matvec  # lazily: the CPU path never needs Pallas

  x_E, pending_SE = x
  e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  dt = cfg.dtype
  interpret = jax.default_backend() == "cpu"
  a = p["attn"]
  om = cfg.kernel_layout == "out_in"  # the kernels [N, K]: each program's columns contiguous
  wt = lambda mod, k: (mod["kernel"].reshape(-1, k) if om else mod["kernel"].reshape(k, -1)
                       ).astype(dt)  # [K, N] or [N, K]
  ws = [wt(a[n], e) for n in ("q", "k", "v")]
  biases = [a[n]["bias"].reshape(-1).astype(dt) for n in ("q", "k", "v")] if cfg.qkv_bias else None
  # q/k/v's 64 column tiles (1.5B) fill half the GPU: split-K parts, summed where q, k and v
  # are read (`row_attention`, or XLA's kernels of RoPE and the cache write) at no launch of
  # their own.
  parts, rsqrt, row = matvec.norm_matvec_partials(
      x_E, ws, norm_scale_E=p["attn_norm"]["scale"].astype(dt), add_E=pending_SE,
      eps=cfg.rms_norm_eps, out_major=om, interpret=interpret)
  x_E = x_E if row is None else row
  cache_k, cache_v = cache_kv  # [1, S, KV, D]
  if _row_attention(cfg, spec, cache_k.shape[1]):
    # The parts' sums, RoPE and the cache write in the attention's launch; its splits
    # combined by the o launch.
    from dllm_jax.kernels import decode

    cos, sin = (t.reshape(d // 2) for t in rope_tables(meta.positions, d, cfg.rope_theta))
    heads = (h, kv, kv)
    (att_parts, att_lse), new_k, new_v, _ = decode.row_attention(
        *(pp.reshape(-1, n, d) for pp, n in zip(parts, heads)), rsqrt, cos, sin,
        cache_k.reshape(cache_k.shape[1:]), cache_v.reshape(cache_v.shape[1:]), None,
        meta.positions[:, 0], spec, dtype=dt,
        biases=None if biases is None else [b.reshape(n, d) for b, n in zip(biases, heads)],
        # (one row of one token: a row mask [1] or a token mask [1, 1] say the same)
        write_mask=None if write_mask is None else write_mask.reshape(1).astype(bool),
        combine=False, interpret=interpret)
    new_cache = (new_k.reshape(cache_k.shape), new_v.reshape(cache_v.shape))
    o_SE = matvec.combined_matvec_partials(att_parts, att_lse, wt(a["o"], h * d), dtype=dt,
                                           out_major=om, interpret=interpret)
  else:
    q, k, v = (matvec.finish_partials(pp, rsqrt, dt, b)
               for pp, b in zip(parts, biases or (None,) * 3))
    q = rope(q.reshape(1, 1, h, d), meta.positions, cfg.rope_theta)
    k = rope(k.reshape(1, 1, kv, d), meta.positions, cfg.rope_theta)
    out, new_cache = _cached_attention(cfg, spec, q, k, v.reshape(1, 1, kv, d), meta, cache_kv,
                                       write_mask)
    o_SE = matvec.matvec_partials(out.reshape(h * d).astype(dt), wt(a["o"], h * d),
                                  out_major=om, interpret=interpret)
  m = p["mlp"]
  gate_up = (wt(m["gate"], e), wt(m["up"], e))
  mlp_scale = p["mlp_norm"]["scale"].astype(dt)
  products = _row_tma(cfg, om, interpret, parts=o_SE.shape[0])
  if products:
    from dllm_jax.kernels import matvec_mgpu

    act, x_E = matvec_mgpu.silu_pair(x_E, *gate_up, add_E=o_SE, norm_scale_E=mlp_scale,
                                     eps=cfg.rms_norm_eps, products=products,
                                     interpret=interpret)
  else:
    (act,), x_E = matvec.norm_matvec(
        x_E, gate_up, add_E=o_SE, norm_scale_E=mlp_scale, eps=cfg.rms_norm_eps, silu_pair=True,
        out_major=om, interpret=interpret)
  down_SE = _down_launch(cfg)(act, wt(m["down"], cfg.intermediate_size))
  return (x_E, down_SE), new_cache


def _down_launch(cfg: ModelConfig):
  """The one-row step's down product as a function of (act [F], weight in the config's kernel
  layout): float32 partial sums [S, E] from `kernels.matvec_mgpu` (`_row_tma`) or
  `kernels.matvec`, as the next layer's first launch adds them. One place, so that the stacked
  layout's carry (`Transformer`) has the parts' shape the launch makes."""
  om = cfg.kernel_layout == "out_in"
  interpret = jax.default_backend() == "cpu"
  products = _row_tma(cfg, om, interpret)
  if products:
    from dllm_jax.kernels import matvec_mgpu

    return functools.partial(matvec_mgpu.matvec_parts, products=products, interpret=interpret)
  from dllm_jax.kernels import matvec

  return functools.partial(matvec.matvec_partials, out_major=om, interpret=interpret)


_REMAT_POLICIES = {
    "full": None,  # keep nothing: recompute the whole layer
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
  """tokens [B, T] -> logits [B, T', vocab] (float32) and the updated cache.

  `head_slice=(start, end)` computes logits only for tokens start..end-1 (the noisy part of a
  diffusion layout), which saves the largest matmul of the model on tokens whose logits are unused.
  `head_index` (int [B, K]) does the same for K per-row token indices chosen at run time (a
  decoder needs a few positions of each row). `cache_write_mask` (bool [B], or [B, T] per
  token): rows, or tokens, where it is False leave their cache slots unchanged.
  `return_hidden` returns the final-normed hidden states [B, T', E] instead of logits (a loss
  that applies `head_matrix` in chunks).
  """

  cfg: ModelConfig
  spec: masks.MaskSpec
  stacked: bool = True  # the layout of the layer parameters and the cache (module docstring)

  @nn.compact
  def __call__(self, tokens_BT, meta: masks.TokenMeta, cache: Optional[KVCache] = None,
               head_slice: Optional[tuple[int, int]] = None,
               head_index: Optional[jax.Array] = None,
               cache_write_mask: Optional[jax.Array] = None,
               return_hidden: bool = False):
    cfg = self.cfg
    # (decoding reads a few rows: a gather from the sharded table moves only those)
    embed = _Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                   param_dtype=cfg.param_dtype, name="embed",
                   embedding_init=_init(0.02, (ax.VOCAB, ax.EMBED)), gather_table=cache is None)
    x = embed(tokens_BT)
    x = nn.with_logical_constraint(x, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))

    layer = DecoderLayer
    row_kernels = (cache is not None and math.prod(tokens_BT.shape) == 1
                   and not self.is_initializing() and _row_kernels(cfg, self.stacked))
    if row_kernels:
      # (row, pending partial sums): `_fused_row_layer`. A scan's carry keeps one
      # shape, so its first layer adds zeros; the unrolled loop's adds nothing.
      e, f, dt = cfg.hidden_size, cfg.intermediate_size, jnp.dtype(cfg.dtype)
      pending = None
      if self.stacked:
        # The down launch's parts, shaped as that launch (with whatever knobs it runs) makes them.
        w = (e, f) if cfg.kernel_layout == "out_in" else (f, e)
        parts = jax.eval_shape(_down_launch(cfg), jax.ShapeDtypeStruct((f,), dt),
                               jax.ShapeDtypeStruct(w, dt))
        pending = jnp.zeros(parts.shape, parts.dtype)
      x = (x.reshape(e), pending)
    if cfg.remat != "none":
      # CSE cannot merge a scan body's recompute with its forward, so the barrier that stops it
      # is only needed for the unrolled per-layer loop.
      layer = nn.remat(layer, prevent_cse=not self.stacked, policy=_REMAT_POLICIES[cfg.remat])
    if self.stacked:
      stack = nn.scan(
          layer,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast, 0, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: ax.LAYERS},
          # The layers have no broadcast variables or outputs, so flax's extra trace that checks
          # them is not needed; under jax 0.11 it also rejects a Pallas call in the body.
          check_constancy_invariants=False,
      )(cfg, self.spec, row_kernels, name="layers")
      cache_kv = None if cache is None else (cache.k, cache.v)
      x, new_kv = stack(x, meta, cache_kv, cache_write_mask)
      new_cache = None if cache is None else KVCache(k=new_kv[0], v=new_kv[1])
    else:
      new_k, new_v = [], []
      for i in range(cfg.num_layers):
        cache_kv = None if cache is None else (cache.k[i], cache.v[i])
        x, kv = layer(cfg, self.spec, row_kernels, name=f"layers_{i}")(x, meta, cache_kv,
                                                                       cache_write_mask)
        if cache is not None:
          new_k.append(kv[0])
          new_v.append(kv[1])
      new_cache = None if cache is None else KVCache(k=tuple(new_k), v=tuple(new_v))
    if row_kernels:
      x_E, pending = x
      if pending is not None:  # None: no layer ran
        x_E = x_E + pending.sum(0).astype(x_E.dtype)
      x = x_E.reshape(*tokens_BT.shape, -1)

    x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x)
    if head_slice is not None:
      x = x[:, head_slice[0]:head_slice[1]]
    if head_index is not None:
      x = jnp.take_along_axis(x, head_index[:, :, None].astype(jnp.int32), axis=1)
    if return_hidden:
      return x, new_cache
    if cfg.tie_embeddings:
      w_EV = embed.embedding.T
    else:
      w_EV = self.param("lm_head", _init(0.02, (ax.EMBED, ax.VOCAB)),
                        (cfg.hidden_size, cfg.vocab_size), cfg.param_dtype)
    logits = jnp.einsum("bte,ev->btv", x, w_EV.astype(cfg.dtype),
                        preferred_element_type=jnp.float32)
    logits = nn.with_logical_constraint(logits, (ax.BATCH, ax.LENGTH, ax.ACT_VOCAB))
    return logits, new_cache


# --------------------------------------------------------------------------------------------
# Functional entry points: params are a plain pytree, the module is rebuilt from the config.


def is_stacked(params: Params) -> bool:
  """False for the per-layer layout of `unstack_layers`."""
  return "layers" in params


def unstack_layers(params: Params) -> Params:
  """The per-layer layout of params: `layers_i` = `layers[i]` (see the module docstring).

  Costs one copy of the layer weights: do it once, outside the decode loop (and drop the stacked
  copy if memory is short). `param_logical_axes(cfg, stacked=False)` gives its logical axes.
  """
  if not is_stacked(params):
    raise ValueError("unstack_layers: the params have no stacked 'layers' entry (already "
                     "unstacked?)")
  stacked = params["layers"]
  n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
  out = {k: v for k, v in params.items() if k != "layers"}
  out.update({f"layers_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
              for i in range(n)})
  return out


def stack_layers(params: Params) -> Params:
  """The inverse of `unstack_layers` (the layout checkpoints store)."""
  names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k[7:]))
  if names != [f"layers_{i}" for i in range(len(names))]:
    raise ValueError(f"stack_layers: expected per-layer entries layers_0 .. layers_N-1, got "
                     f"{names or 'none'}")
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])
  return out


# "per_layer" is the decoding default: on an H100 it took a Qwen2.5-1.5B AR step from 4.3 to
# 2.1 ms at batch 1 (BENCHMARKS.md); the timings fit the scan copying each layer's weights out
# of the stack before the matmuls read them.
LAYOUTS = ("stacked", "per_layer")


def with_layout(params: Params, layout: str) -> Params:
  """`params` in `layout` ("stacked" as saved and trained, or "per_layer"); a no-op when they
  are in it already."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
  if not is_stacked(params) and "layers_0" not in params:
    raise ValueError(f"with_layout: params hold neither 'layers' (stacked) nor 'layers_0' "
                     f"(per-layer) but {sorted(params)}; pass the model's params dict (for a "
                     "Flax variables dict, its ['params'])")
  if (layout == "stacked") == is_stacked(params):
    return params
  return stack_layers(params) if layout == "stacked" else unstack_layers(params)


# The projections' kernels and how many leading dims of their [*in, *out] are inputs.
_PROJECTIONS = {("attn", "q"): 1, ("attn", "k"): 1, ("attn", "v"): 1, ("attn", "o"): 2,
                ("mlp", "gate"): 1, ("mlp", "up"): 1, ("mlp", "down"): 1}


def stored_kernel_layout(params: Params, cfg: ModelConfig) -> Optional[str]:
  """The kernel layout the params' shapes say ("in_out" or "out_in"), read off the first
  layer's o kernel ([H, D, E] or [E, H, D]), else, where H == D == E makes that one shape, its
  gate kernel ([E, M] or [M, E]); None when neither tells (a model square in both)."""
  layer = params["layers"] if "layers" in params else params.get("layers_0")
  if layer is None:
    raise ValueError(f"params hold neither 'layers' nor 'layers_0' but {sorted(params)}; pass "
                     "the model's params dict")
  h, d, e, m = cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
  for block, proj, in_out, out_in in (("attn", "o", (h, d, e), (e, h, d)),
                                      ("mlp", "gate", (e, m), (m, e))):
    shape = tuple(layer[block][proj]["kernel"].shape[-len(in_out):])
    fits = [name for name, want in (("in_out", in_out), ("out_in", out_in)) if shape == want]
    if not fits:
      raise ValueError(f"params' {proj} kernel ends in {shape}, neither {in_out} (in_out) nor "
                       f"{out_in} (out_in): they are not this config's model")
    if len(fits) == 1:
      return fits[0]
  return None


def check_kernel_layout(params: Params, cfg: ModelConfig) -> None:
  """A ValueError when the params' kernels are stored in the other layout than
  `cfg.kernel_layout` says (the XLA path would fail inside flax on a shape, the one-row kernels
  would read the transposes without a word)."""
  stored = stored_kernel_layout(params, cfg)
  if stored is not None and stored != cfg.kernel_layout:
    raise ValueError(f"the params' projection kernels are stored {stored} but "
                     f"kernel_layout={cfg.kernel_layout!r}: convert them with "
                     f"model.with_kernel_layout(params, cfg_with_{stored}, "
                     f"{cfg.kernel_layout!r}), or give the config their layout")


def with_kernel_layout(params: Params, cfg: ModelConfig,
                       kernel_layout: str) -> tuple[Params, ModelConfig]:
  """(params, cfg) with the projection kernels in `kernel_layout` (`ModelConfig.kernel_layout`:
  "in_out" [*in, *out] or "out_in" [*out, *in]), from `cfg.kernel_layout`; either param layout
  (stacked or per-layer), jax or numpy arrays. A no-op when they are in it already; else one
  transposed copy of each kernel (do it once, where the model is loaded)."""
  if kernel_layout not in config_lib.KERNEL_LAYOUTS:
    raise ValueError(f"kernel_layout={kernel_layout!r}: expected one of "
                     f"{config_lib.KERNEL_LAYOUTS}")
  # (Also refuses params without layers, and converting converted params, which would
  # transpose them back.)
  check_kernel_layout(params, cfg)
  if kernel_layout == cfg.kernel_layout:
    return params, cfg
  layers = {k: 1 for k in params if k == "layers"}  # name -> leading layer dims
  layers.update({k: 0 for k in params if k.startswith("layers_")})
  out = dict(params)
  for name, lead in layers.items():
    layer = {k: dict(v) for k, v in params[name].items()}
    for (block, proj), n_in in _PROJECTIONS.items():
      kernel = layer[block][proj]["kernel"]
      n_first = n_in if cfg.kernel_layout == "in_out" else kernel.ndim - lead - n_in
      dims = list(range(lead, kernel.ndim))
      perm = list(range(lead)) + dims[n_first:] + dims[:n_first]
      layer[block][proj] = dict(layer[block][proj], kernel=kernel.transpose(perm))
    out[name] = layer
  return out, dataclasses.replace(cfg, kernel_layout=kernel_layout)


@functools.lru_cache(maxsize=16)
def _param_shapes(cfg: ModelConfig, stacked: bool) -> dict:
  """{path: shape} of the params `cfg`'s model needs (in its kernel layout), stacked or
  per-layer. Cached: a decoder checks every call, and tracing a large model's init takes a
  while."""
  in_out = dataclasses.replace(cfg, kernel_layout="in_out")

  def build(k):
    params = with_kernel_layout(init_params(in_out, k), in_out, cfg.kernel_layout)[0]
    return params if stacked else with_layout(params, "per_layer")

  return _shapes(jax.eval_shape(build, jax.random.key(0)))


def _shapes(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def params_mismatch(params: Params, cfg: ModelConfig) -> Optional[str]:
  """None when `params` (stacked or per-layer) have the tree and shapes that `cfg`'s model, in
  its kernel layout, needs; else the first difference, named by its path. Shapes only (tracers
  too). A mismatch would otherwise fail inside the first forward as flax's shape error, a scan
  length error or a missing-parameter error."""
  if not isinstance(params, Mapping):
    return f"params is a {type(params).__name__}, not the model's parameter tree"
  want, have = _param_shapes(cfg, is_stacked(params)), _shapes(params)
  for key in want:
    if key not in have:
      return f"params{key} is missing"
    if have[key] != want[key]:
      return f"params{key} is {have[key]}, the config's model needs {want[key]}"
  extra = sorted(set(have) - set(want))
  if extra:
    return f"params{extra[0]} is not a parameter of the config's model"
  return None


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Random parameters (plain arrays, logical-axis metadata removed)."""
  return nn.unbox(_boxed_init(cfg, rng))


def _boxed_init(cfg: ModelConfig, rng: jax.Array, stacked: bool = True):
  tokens = jnp.zeros((1, 1), jnp.int32)
  meta = masks.TokenMeta.simple(jnp.zeros((1, 1), jnp.int32))
  return Transformer(cfg, masks.MaskSpec("causal"), stacked).init(rng, tokens, meta)["params"]


def param_logical_axes(cfg: ModelConfig, stacked: bool = True) -> Params:
  """A pytree like the params (of either layout) whose leaves are `PartitionSpec`s of logical
  axis names."""
  boxed = jax.eval_shape(lambda r: _boxed_init(cfg, r, stacked), jax.random.key(0))
  return nn.get_partition_spec(boxed)


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens_BT: jax.Array,
    meta: masks.TokenMeta,
    spec: masks.MaskSpec,
    cache: Optional[KVCache] = None,
    head_slice: Optional[tuple[int, int]] = None,
    head_index: Optional[jax.Array] = None,
    cache_write_mask: Optional[jax.Array] = None,
    return_hidden: bool = False,
) -> tuple[jax.Array, Optional[KVCache]]:
  stacked = is_stacked(params)
  check_kernel_layout(params, cfg)
  if cache is not None and cache.per_layer == stacked:
    raise ValueError(
        f"the KV cache is in the {'per-layer' if stacked else 'stacked'} layout but the params "
        f"are {'stacked' if stacked else 'per-layer'}: make the cache with "
        f"cache.init_cache(..., per_layer={not stacked})")
  if cache is not None and not stacked and len(cache.k) != cfg.num_layers:
    raise ValueError(f"the per-layer KV cache has {len(cache.k)} layers, the model "
                     f"{cfg.num_layers}: make it with cache.init_cache(model_cfg, ...)")
  return Transformer(cfg, spec, stacked).apply({"params": params}, tokens_BT, meta, cache,
                                               head_slice, head_index, cache_write_mask,
                                               return_hidden)


def head_matrix(params: Params, cfg: ModelConfig) -> jax.Array:
  """The output projection [E, V] the model applies after the final norm (the transposed
  embedding when tied), in the parameters' dtype."""
  if cfg.tie_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]


def ar_forward(params: Params, cfg: ModelConfig, tokens_BT: jax.Array) -> jax.Array:
  """Causal logits of whole sequences that start at position 0 (no cache)."""
  b, t = tokens_BT.shape
  meta = masks.TokenMeta.simple(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
  return forward(params, cfg, tokens_BT, meta, masks.MaskSpec("causal"))[0]


def num_params(params: Params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))
