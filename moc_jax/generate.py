"""KV-cache generation: prefill + one compiled decode loop, greedy / temperature / top-p, EOS stop.

  python -m moc_jax.generate --workdir=DIR --prompt="def main(" --max_new_tokens=64 \
      [--temperature=0.8 --top_p=0.95 --seed=0 --backend=auto]

Prompts of different lengths share one batch, right-padded: row b's prompt fills cache slots
[0, len_b); its first new token is written at slot len_b, over the padding's k/v, and every
query attends only to slots at or before its own position, so padding is never seen. The
whole generation (prefill and the `lax.while_loop` over new tokens) is one jitted call.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moc_jax.model import Transformer

# `--compiler_options=auto` on GPU. Empty: no option has yet been measured to speed decoding up
# (programmatic dependent launch, `xla_gpu_enable_pdl`, changed nothing: decode_e2e_h200_20261205).
DECODE_GPU_DEFAULTS: dict[str, Any] = {}


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy; top_p < 1 keeps the smallest set of tokens with mass ≥ top_p."""

  temperature: float = 0.0
  top_p: float = 1.0


def sample(logits_BxV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """Next token ids (B,) from fp32 logits."""
  if s.temperature <= 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / s.temperature
  if s.top_p < 1.0:
    sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    keep = mass_before < s.top_p  # always keeps the best token
    cutoff = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def with_backend(
  model: Transformer,
  backend: str,
  decode_attention: str | None = None,
  decode_gemv: str | None = None,
) -> Transformer:
  """The same parameters under another kernel backend (and decode attention and GEMV, if
  given), prepared for decoding (Wu^T stored)."""
  cfg = dataclasses.replace(model.cfg, kernel_backend=backend)
  given = dict(decode_attention=decode_attention, decode_gemv=decode_gemv)
  cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None}).validate()
  out = Transformer(cfg, nnx.Rngs(0))
  nnx.update(out, nnx.state(model, nnx.Param))
  out.prepare_for_decode()
  return out


def _generate(
  graphdef,
  state,
  prompts_BxP,
  lengths_B,
  max_new: int,
  sampling: Sampling,
  eos_id: int,
  pad_id: int,
  key,
):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompts_BxP.shape
  cache = model.init_cache(batch, prompt_len + max_new)
  positions_BxP = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), prompts_BxP.shape)
  logits_BxPxV, cache = model.decode(prompts_BxP, positions_BxP, cache)
  last_BxV = jnp.take_along_axis(logits_BxPxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  key, sub = jax.random.split(key)
  first_B = sample(last_BxV, sub, sampling)
  out_BxN = jnp.full((batch, max_new), pad_id, jnp.int32).at[:, 0].set(first_B)
  done_B = first_B == eos_id

  def cond(carry):
    i, _, _, done_B, _, _ = carry
    return (i < max_new) & ~jnp.all(done_B)

  def body(carry):
    i, tok_B, cache, done_B, out_BxN, key = carry
    pos_B = lengths_B + i - 1  # the slot of token i-1 of the answer
    logits_Bx1xV, cache = model.decode(tok_B[:, None], pos_B[:, None], cache)
    key, sub = jax.random.split(key)
    nxt_B = jnp.where(done_B, pad_id, sample(logits_Bx1xV[:, 0], sub, sampling))
    out_BxN = jax.lax.dynamic_update_slice_in_dim(out_BxN, nxt_B[:, None], i, axis=1)
    return i + 1, nxt_B, cache, done_B | (nxt_B == eos_id), out_BxN, key

  carry = (jnp.int32(1), first_B, cache, done_B, out_BxN, key)
  i, _, _, _, out_BxN, _ = jax.lax.while_loop(cond, body, carry)
  return out_BxN, i


_STATIC = (0, 4, 5, 6, 7)  # `_generate`'s static arguments


@functools.cache
def _compiled(options: tuple[tuple[str, Any], ...]):
  """`_generate` jitted with these XLA options: one jit (and executable cache) per option set."""
  return jax.jit(_generate, static_argnums=_STATIC, compiler_options=dict(options) or None)


def generate(
  model: Transformer,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  *,
  sampling: Sampling = Sampling(),
  eos_id: int = -1,
  pad_id: int = 0,
  seed: int = 0,
  compiler_options: dict[str, Any] | None = None,
) -> list[list[int]]:
  """New tokens per prompt (EOS excluded, stops at EOS), from one compiled call.

  `compiler_options` go to XLA for this call's program alone (as `train.compiler_options`)."""
  if max_new_tokens <= 0:
    _check_prompts(prompts)
    return [[] for _ in prompts]
  args = _call_args(model, prompts, max_new_tokens, sampling, eos_id, pad_id, seed)
  out, _ = _compiled(_options_key(compiler_options))(*args)
  return _answers(out, eos_id)


def compile_generation(
  model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs
) -> Callable[[], list[list[int]]]:
  """`generate(model, prompts, max_new_tokens, **kwargs)` traced and compiled now into an
  executable of its own: calling the result runs it again. Benchmarks hold several (models of one
  structure under different kernel configs, which `generate`'s cache would not tell apart) and
  time them in turns."""
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  options = _options_key(kwargs.pop("compiler_options", None))
  args = _call_args(model, prompts, max_new_tokens, **kwargs)
  fresh = lambda *a: _generate(*a)  # a new function: traced anew, never from jit's cache
  jitted = jax.jit(fresh, static_argnums=_STATIC, compiler_options=dict(options) or None)
  compiled = jitted.lower(*args).compile()
  dynamic = [a for i, a in enumerate(args) if i not in _STATIC]  # what `compiled` takes
  eos_id = args[6]  # `_generate`'s eos_id
  return lambda: _answers(compiled(*dynamic)[0], eos_id)


def _check_prompts(prompts: Sequence[Sequence[int]]) -> None:
  if not prompts or min(len(p) for p in prompts) == 0:
    raise ValueError("every prompt needs at least one token (start it with BOS)")


def _options_key(compiler_options: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
  return tuple(sorted((compiler_options or {}).items()))


def _call_args(
  model, prompts, max_new_tokens, sampling=Sampling(), eos_id=-1, pad_id=0, seed=0
) -> tuple:
  """`_generate`'s arguments: the prompts right-padded into one batch."""
  _check_prompts(prompts)
  prompt_len = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), prompt_len), pad_id, np.int32)
  for b, p in enumerate(prompts):
    tokens[b, : len(p)] = p
  lengths = np.array([len(p) for p in prompts], np.int32)
  graphdef, state = nnx.split(model)
  key = jax.random.key(seed)
  return (
    graphdef,
    state,
    jnp.asarray(tokens),
    jnp.asarray(lengths),
    max_new_tokens,
    sampling,
    eos_id,
    pad_id,
    key,
  )


def _answers(out_BxN: jax.Array, eos_id: int) -> list[list[int]]:
  """Each row's new tokens up to (not including) its first EOS."""
  result = []
  for row in np.asarray(out_BxN).tolist():
    result.append(row[: row.index(eos_id)] if eos_id in row else row)
  return result


def load(
  workdir: str,
  backend: str = "auto",
  decode_attention: str | None = None,
  decode_gemv: str | None = None,
) -> tuple[Transformer, object]:
  """(model prepared for decoding, tokenizer) from the newest checkpoint in `workdir`."""
  import ml_collections

  from moc_jax import checkpoint, data, train_lib
  from moc_jax.checkpoint import CheckpointError

  saved = checkpoint.read_config(workdir)
  if saved is None:
    raise CheckpointError(f"no {checkpoint.CONFIG_FILE} in {workdir!r}: is it a training workdir?")
  cfg = ml_collections.ConfigDict(saved)
  tokenizer = data.make_tokenizer(cfg.data)
  model_cfg = train_lib.build_model_config(cfg.model, tokenizer.vocab_size)
  model = Transformer(model_cfg, nnx.Rngs(0))
  _, state = train_lib.init_state(model, train_lib.make_optimizer(cfg.train), cfg.seed)
  manager = checkpoint.make_manager(workdir, every=1, keep=1, async_save=False, read_only=True)
  restored = checkpoint.restore_latest(manager, checkpoint.abstract_like(state))
  manager.close()
  if restored is None:
    raise CheckpointError(f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}")
  nnx.update(model, restored[1]["params"])
  return with_backend(model, backend, decode_attention, decode_gemv), tokenizer


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description="Generate text from the newest checkpoint in a workdir.")
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--backend", default="auto", help="MoC decode kernels: auto | xla | pallas")
  p.add_argument(
    "--decode_attention",
    default=None,
    help="auto | xla | pallas (one kernel over the filled cache slots; auto: pallas where the "
    "kernel backend is, i.e. on GPU) | fused (pallas with RoPE and the q, k, v split inside); "
    "default: the run's config",
  )
  p.add_argument(
    "--decode_gemv",
    default=None,
    help="splitk | rowdot (the decode GEMVs on output-major weight copies); default: the run's "
    "config",
  )
  p.add_argument(
    "--compiler_options",
    default="auto",
    help="XLA options for the generation program: auto | none | a=b,c=d "
    "(e.g. xla_gpu_enable_pdl=true); auto = XLA's own defaults until a run shows better ones",
  )
  a = p.parse_args(argv)
  if a.temperature < 0 or not 0 < a.top_p <= 1 or a.max_new_tokens < 0:
    print("error: need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 0", file=sys.stderr)
    return 2
  from moc_jax import compile_options
  from moc_jax.cli import user_errors

  with user_errors():
    key = "--compiler_options"
    options = compile_options.parse(a.compiler_options, key=key, gpu_defaults=DECODE_GPU_DEFAULTS)
    compile_options.check(options, key)
    model, tok = load(a.workdir, a.backend, a.decode_attention, a.decode_gemv)
    prompts = [[tok.bos_id, *tok.encode(text)] for text in a.prompt]
    start = time.perf_counter()
    outs = generate(
      model,
      prompts,
      a.max_new_tokens,
      sampling=Sampling(a.temperature, a.top_p),
      eos_id=tok.eos_id,
      pad_id=tok.pad_id,
      seed=a.seed,
      compiler_options=options,
    )
    seconds = time.perf_counter() - start
    for text, out in zip(a.prompt, outs, strict=True):
      print(text + tok.decode(out), flush=True)
    new = sum(len(out) for out in outs)
    print(f"[{new} new tokens in {seconds:.2f} s, compilation included]", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
