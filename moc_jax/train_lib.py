"""The pieces of a training run that are pure functions: config → model, optimizer, loss,
and the jitted train and eval steps over `nnx.split` state (no `nnx.jit` in the hot loop)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from moc_jax import model_config
from moc_jax.model import Transformer

Batch = dict[str, jax.Array]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per datasheet


def round_vocab(vocab_size: int, multiple: int = 64) -> int:
  """Pad the embedding rows to a multiple of 64 for GEMM efficiency; extra ids are unused."""
  return -(-vocab_size // multiple) * multiple


def build_model_config(
  model_cfg: ml_collections.ConfigDict, vocab_size: int
) -> model_config.ModelConfig:
  """Preset + overrides from `config.model` → a validated ModelConfig."""
  return model_config.from_preset(
    model_cfg.preset,
    vocab_size=round_vocab(vocab_size),
    ffn=model_cfg.ffn,
    k=model_cfg.k,
    gcp=model_cfg.gcp,
    ffn_keep_weights=model_cfg.get("ffn_keep_weights"),
    dtype=model_cfg.dtype,
    param_dtype=model_cfg.param_dtype,
    attention=model_cfg.attention,
    kernel_backend=model_cfg.kernel_backend,
    decode_attention=model_cfg.get("decode_attention", "auto"),  # absent from older runs
    decode_gemv=model_cfg.get("decode_gemv", "auto"),
    decode_attention_warm_mb=model_cfg.get("decode_attention_warm_mb", 16),
    decode_prefetch=model_cfg.get("decode_prefetch", True),
    remat=model_cfg.remat,
    pad_to=model_cfg.pad_to,
  )


def check_train_config(cfg: ml_collections.ConfigDict) -> None:
  """Reject unusable training values with one message naming the key."""
  t = cfg.train
  for key in ("steps", "batch_size", "seq_len", "grad_accum", "log_every"):
    if t[key] <= 0:
      raise model_config.ConfigError(f"train.{key} must be positive, got {t[key]}")
  if t.batch_size % t.grad_accum:
    raise model_config.ConfigError(
      f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}"
    )
  if not 0 <= t.warmup_frac < 1:
    raise model_config.ConfigError(f"train.warmup_frac must be in [0, 1), got {t.warmup_frac}")
  if t.lr <= 0:
    raise model_config.ConfigError(f"train.lr must be positive, got {t.lr}")
  for key in ("every", "batches"):
    if cfg.eval[key] <= 0:
      raise model_config.ConfigError(f"eval.{key} must be positive, got {cfg.eval[key]}")
  if cfg.checkpoint.every <= 0 or cfg.checkpoint.keep <= 0:
    raise model_config.ConfigError("checkpoint.every and checkpoint.keep must be positive")


def make_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup over `warmup_frac` of the steps, then cosine to 0 (DESIGN.md §4)."""
  warmup = int(t.warmup_frac * t.steps)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=t.lr, warmup_steps=warmup, decay_steps=t.steps, end_value=0.0
  )


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  adamw = optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay)
  if t.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
  return adamw


def init_state(model: Transformer, tx: optax.GradientTransformation, seed: int):
  """(graphdef, state) where state holds params, optimizer state, step and RNG key data."""
  graphdef, params = nnx.split(model)
  state = {
    "params": params,
    "opt_state": tx.init(params),
    "step": jnp.zeros((), jnp.int32),
    "rng": jax.random.key_data(jax.random.key(seed)),
  }
  return graphdef, state


def _nll_sums(params, graphdef, batch: Batch, document_mask: bool):
  """Sum of per-token NLL over non-pad targets, and their count."""
  model = nnx.merge(graphdef, params)
  if document_mask:
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  else:
    logits = model(batch["inputs"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  weights = batch["weights"].astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)


def make_train_step(
  graphdef,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  *,
  grad_accum: int,
  document_mask: bool,
  state_shardings: Any = None,
  compiler_options: dict[str, Any] | None = None,
):
  """A jitted (state, batch) → (state, metrics); the state buffers are donated.

  `compiler_options` go to XLA for this program alone (`compile_options.parse`).

  With `state_shardings` (a mesh run), the new state keeps exactly the input's shardings, so
  every step runs the same compiled program with no resharding between steps.

  With grad_accum > 1 the batch is split into micro-batches scanned in one program, and the
  gradient is the mean over all non-pad tokens of the whole batch. A non-finite loss or
  gradient leaves parameters and optimizer state untouched and is flagged in the metrics.
  """

  def grads_of(params, micro):
    grad_fn = jax.value_and_grad(_nll_sums, has_aux=True)
    (nll_sum, count), grads = grad_fn(params, graphdef, micro, document_mask)
    return nll_sum, count, grads

  def step_fn(state, batch: Batch):
    params = state["params"]
    if grad_accum == 1:
      nll_sum, count, grads = grads_of(params, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

      def body(carry, mb):
        nll, cnt, g = grads_of(params, mb)
        return jax.tree.map(jnp.add, carry, (nll, cnt, g)), None

      zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
      (nll_sum, count, grads), _ = jax.lax.scan(body, zeros, micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = nll_sum / denom
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {
      "params": keep(new_params, params),
      "opt_state": keep(opt_state, state["opt_state"]),
      "step": state["step"] + finite.astype(jnp.int32),
      "rng": state["rng"],
    }
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "lr": schedule(state["step"]),
      "tokens": count,
      "finite": finite,
    }
    return new_state, metrics

  jit_kwargs = dict(donate_argnums=0, compiler_options=compiler_options or None)
  if state_shardings is None:
    return jax.jit(step_fn, **jit_kwargs)
  return jax.jit(step_fn, out_shardings=(state_shardings, None), **jit_kwargs)


def make_eval_step(graphdef, *, document_mask: bool):
  """A jitted (params, batch) → (nll_sum, token_count)."""
  return jax.jit(lambda params, batch: _nll_sums(params, graphdef, batch, document_mask))


def evaluate(eval_step, params, batches) -> dict[str, float]:
  """Perplexity = exp(total NLL / total non-pad target tokens) over all batches."""
  nll_total, count_total = 0.0, 0.0
  for batch in batches:
    nll, count = eval_step(params, batch)
    nll_total += float(nll)
    count_total += float(count)
  loss = nll_total / max(count_total, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count_total}


def train_flops_per_token(cfg: model_config.ModelConfig, seq_len: int) -> float:
  """PaLM-style count: 6 × non-embedding params + 12 × layers × d_model × seq_len.

  MoC trains with the same dense GEMMs as dense SwiGLU, so the count is the same for both.
  The output projection (d × V) is counted; the embedding lookup is not.
  """
  per_layer = 4 * cfg.d_model * cfg.d_model + 3 * cfg.d_model * cfg.d_ff
  matmul_params = cfg.num_layers * per_layer + cfg.d_model * cfg.vocab_size
  return 6.0 * matmul_params + 12.0 * cfg.num_layers * cfg.d_model * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
  """Model FLOPs utilisation (`train_flops_per_token`'s count), None where the peak is unknown."""
  return tokens_per_s * flops_per_token / (peak_tflops * 1e12) if peak_tflops else None


def device_peak_tflops(override: float | None) -> float | None:
  if override:
    return override
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)


def peak_memory_gb() -> float | None:
  stats: dict[str, Any] | None = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 1e9
