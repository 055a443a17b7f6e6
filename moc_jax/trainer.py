"""The training loop: config → data → model → steps, with evaluation, checkpoints, resume,
and clean stops on NaN, SIGTERM and Ctrl-C."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from moc_jax import checkpoint, compile_options, data, distributed, metrics, sharding, train_lib
from moc_jax.model import Transformer, count_params


class TrainingDiverged(RuntimeError):
  """The loss or gradient became NaN/inf; no checkpoint of those weights was written."""


class _StopFlag:
  """Set by SIGTERM/SIGINT; the loop saves a checkpoint and exits at the next step."""

  def __init__(self):
    self.signal_name: str | None = None

  def __call__(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name


@contextlib.contextmanager
def _catch_stop_signals():
  flag = _StopFlag()
  previous = {s: signal.signal(s, flag) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield flag
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def prepare(cfg: ml_collections.ConfigDict, workdir: str):
  """Validate everything a run needs before touching the workdir's contents."""
  train_lib.check_train_config(cfg)
  compile_options.check(compile_options.parse(cfg.train.compiler_options))
  tokenizer = data.make_tokenizer(cfg.data)
  model_cfg = train_lib.build_model_config(cfg.model, tokenizer.vocab_size)
  checkpoint.check_workdir_writable(workdir)
  saved = checkpoint.read_config(workdir)
  current = cfg.to_dict()
  current["model"].update(_model_fields(model_cfg))
  checkpoint.check_same_model(saved, current, workdir)
  return tokenizer, model_cfg, current


def _model_fields(model_cfg) -> dict:
  return {
    "vocab_size": model_cfg.vocab_size,
    "d_model": model_cfg.d_model,
    "d_ff": model_cfg.d_ff,
    "num_layers": model_cfg.num_layers,
    "num_heads": model_cfg.num_heads,
    "k": model_cfg.k,
  }


def _fetch(metrics_dev: dict) -> dict:
  return {k: v.item() for k, v in jax.device_get(metrics_dev).items()}


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train (or resume) in `workdir`; returns the final validation metrics."""
  distributed.maybe_initialize(cfg.distributed)  # before anything touches a device
  tokenizer, model_cfg, config_record = prepare(cfg, workdir)
  t = cfg.train
  micro_batch = t.batch_size // t.grad_accum
  mesh = sharding.mesh_from_config(cfg.mesh)
  if mesh.size == 1:  # one device: the plain path, no mesh anywhere
    mesh = None
  else:
    sharding.check_batch(t.batch_size, mesh)
    sharding.check_batch(micro_batch, mesh, "train.batch_size / grad_accum", per_process=False)
  if mesh is None:
    model = Transformer(model_cfg, nnx.Rngs(cfg.seed))
  else:  # built sharded under jit below; only shapes here
    model = nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0)))
  n_params = count_params(model)
  print(
    f"model: preset {cfg.model.preset}, ffn {model_cfg.ffn}"
    f"{f', k={model_cfg.k}' if model_cfg.ffn == 'moc' else ''}"
    f"{', gcp' if model_cfg.gcp else ''}, {n_params:,} parameters "
    f"(d={model_cfg.d_model}, F={model_cfg.d_ff}, layers={model_cfg.num_layers}, "
    f"vocab={model_cfg.vocab_size}) on {jax.devices()[0].device_kind} × {jax.device_count()}",
    flush=True,
  )

  tx = train_lib.make_optimizer(t)
  schedule = train_lib.make_schedule(t)
  state_shardings = None
  if mesh is None:
    graphdef, state = train_lib.init_state(model, tx, cfg.seed)
  else:
    graphdef = nnx.graphdef(model)
    init = lambda: train_lib.init_state(Transformer(model_cfg, nnx.Rngs(cfg.seed)), tx, cfg.seed)[1]
    state, state_shardings, notes = sharding.init_sharded(init, mesh)
    if distributed.is_main_process():
      print(sharding.describe(mesh, state, notes), flush=True)
  del model
  train_it = data.make_train_iterator(
    cfg.data,
    tokenizer=tokenizer,
    seq_len=t.seq_len,
    batch_size=t.batch_size // jax.process_count(),  # this process's rows
    seed=cfg.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  eval_batches = data.make_eval_batches(
    cfg.data,
    tokenizer=tokenizer,
    seq_len=t.seq_len,
    batch_size=cfg.eval.batch_size or micro_batch,
    max_batches=cfg.eval.batches,
  )
  if mesh is not None:
    train_it = sharding.PlacedIterator(train_it, mesh)
    eval_rows = len(eval_batches[0]["inputs"]) if eval_batches else 0
    sharding.check_batch(eval_rows, mesh, "eval.batch_size", per_process=False)
    eval_batches = [sharding.put_global_batch(b, mesh) for b in eval_batches]

  manager = checkpoint.make_manager(
    workdir,
    every=cfg.checkpoint.every,
    keep=cfg.checkpoint.keep,
    async_save=cfg.checkpoint.async_save,
  )
  restored = checkpoint.restore_latest(manager, checkpoint.abstract_like(state))
  if restored is not None:
    step, state, data_state = restored
    train_it.set_state(data_state)
    print(f"resumed from the checkpoint at step {step} in {checkpoint.checkpoint_dir(workdir)}")
  if distributed.is_main_process():
    checkpoint.write_config(workdir, config_record)

  train_step = train_lib.make_train_step(
    graphdef,
    tx,
    schedule,
    grad_accum=t.grad_accum,
    document_mask=cfg.model.document_mask,
    state_shardings=state_shardings,
    compiler_options=compile_options.parse(t.compiler_options),
  )
  eval_step = train_lib.make_eval_step(graphdef, document_mask=cfg.model.document_mask)
  reporter = metrics.Reporter(workdir, t.steps, enabled=jax.process_index() == 0)
  mesh_context = sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  try:
    with _catch_stop_signals() as stop, mesh_context:
      run = _Run(
        cfg, train_it, eval_batches, train_step, eval_step, manager, reporter, model_cfg, stop
      )
      result = _loop(run, state)
  finally:
    manager.wait_until_finished()
    manager.close()
    reporter.close()
    train_it.close()
  plot = metrics.plot_losses(workdir) if jax.process_index() == 0 else None
  if plot:
    print(f"loss plot: {plot}")
  return result


@dataclasses.dataclass(frozen=True)
class _Run:
  """Everything the loop uses besides the state it advances."""

  cfg: ml_collections.ConfigDict
  train_it: Any
  eval_batches: list
  train_step: Callable
  eval_step: Callable
  manager: Any
  reporter: metrics.Reporter
  model_cfg: Any
  stop: _StopFlag


def _loop(run: _Run, state) -> dict:
  train_it, manager, reporter, stop = run.train_it, run.manager, run.reporter, run.stop
  t = run.cfg.train
  step = int(state["step"])
  tokens_per_step = t.batch_size * t.seq_len
  flops_per_token = train_lib.train_flops_per_token(run.model_cfg, t.seq_len)
  peak_tflops = train_lib.device_peak_tflops(t.peak_tflops)
  last_eval: dict = {}
  window_start, window_steps = time.perf_counter(), 0
  pending = None  # (step, metrics) of the step in flight: checked one step late
  while step < t.steps:
    if _stop_agreed(stop, step, t.log_every):
      _check_finite(pending)
      if manager.latest_step() != step:  # a periodic save may have just written this step
        checkpoint.save(manager, step, state, train_it.get_state(), force=True)
      manager.wait_until_finished()
      print(
        f"{stop.signal_name}: saved a checkpoint at step {step}; "
        "run the same command again to resume.",
        flush=True,
      )
      return {**last_eval, "stopped_by": stop.signal_name, "step": step}
    batch = next(train_it)
    state, step_metrics = run.train_step(state, batch)
    _check_finite(pending)
    step += 1
    window_steps += 1
    pending = (step, step_metrics)

    if step % t.log_every == 0 or step == t.steps:
      m = _fetch(step_metrics)
      _check_finite(pending)
      elapsed = time.perf_counter() - window_start
      tok_s = window_steps * tokens_per_step / elapsed
      m.update(
        perplexity=math.exp(min(m["loss"], 700.0)),
        tokens_per_sec=tok_s,
        steps_per_sec=window_steps / elapsed,
        mfu=train_lib.mfu(tok_s, flops_per_token, peak_tflops),
        peak_memory_gb=train_lib.peak_memory_gb(),
      )
      m.pop("finite")
      reporter.progress(step, m, window_steps / elapsed)
      reporter.write("train", step, {k: v for k, v in m.items() if v is not None})
      window_start, window_steps = time.perf_counter(), 0

    if step % run.cfg.eval.every == 0 or step == t.steps:
      last_eval = train_lib.evaluate(run.eval_step, state["params"], run.eval_batches)
      reporter.say(
        f"step {step}: validation loss {last_eval['loss']:.4f}, "
        f"perplexity {last_eval['perplexity']:.3f} "
        f"({last_eval['tokens']:,.0f} tokens)"
      )
      reporter.write("eval", step, last_eval)
      window_start, window_steps = time.perf_counter(), 0

    if step % run.cfg.checkpoint.every == 0 or step == t.steps:
      _check_finite(pending)
      checkpoint.save(manager, step, state, train_it.get_state(), force=True)
  _check_finite(pending)
  return {**last_eval, "step": step}


def _stop_agreed(stop: _StopFlag, step: int, every: int) -> bool:
  """Whether to stop now. With several processes, all must stop at the same step (the save is
  a collective), so they agree every `every` steps through one tiny all-gather."""
  if jax.process_count() == 1:
    return stop.signal_name is not None
  if step % every:
    return False
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.array([stop.signal_name is not None]))
  if np.any(flags) and stop.signal_name is None:
    stop.signal_name = "SIGTERM (on another process)"
  return bool(np.any(flags))


def _check_finite(pending) -> None:
  if pending is None:
    return
  step, step_metrics = pending
  if not bool(np.asarray(step_metrics["finite"])):
    loss = float(step_metrics["loss"])
    raise TrainingDiverged(
      f"loss became {loss} at step {step}; stopped without saving those weights. "
      "Lower train.lr, set train.grad_clip, or resume from the last checkpoint."
    )
