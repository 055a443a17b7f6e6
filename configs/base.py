"""The full config tree every preset starts from; presets change only what differs."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from moc_jax import data


def base_config(preset: str) -> ml_collections.ConfigDict:
  """All keys a user may set with --config.a.b=v; unknown keys are rejected by the flag."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.preset = preset  # tiny | 60m | 130m | 350m | 1b (DESIGN.md §4)
  c.model.ffn = "moc"  # dense | moc | moc_2of8
  c.model.k = config_dict.placeholder(int)  # channels per token; None = the preset's K
  c.model.gcp = False  # MoC+GCP: recompute Z_sel in the backward, keep only idx/G_sel/U_sel
  # MoC: the backward reuses the forward's bf16 FFN weights (faster; 3·D·F·2 bytes per layer
  # held) or casts again; None = reuse unless gcp or FSDP
  c.model.ffn_keep_weights = config_dict.placeholder(bool)
  c.model.dtype = "bfloat16"  # compute dtype
  c.model.param_dtype = "float32"  # master weights
  c.model.attention = "auto"  # auto (cudnn on GPU, xla elsewhere) | xla | cudnn
  c.model.kernel_backend = "auto"  # MoC kernels: auto (pallas on GPU) | xla | pallas
  # generation's one-token steps: auto (pallas with the Pallas kernel backend, i.e. on GPU) |
  # xla | pallas (one kernel over the filled cache slots only) | fused (pallas, with RoPE and
  # the q, k, v split inside the kernel)
  c.model.decode_attention = "auto"
  # generation's GEMVs: auto (rowdot on GPU) | splitk | rowdot (weights stored output-major)
  c.model.decode_gemv = "auto"
  # MB of the output projection and the FFN's first weights that the fused decode attention's
  # launch reads into L2 on the SMs it leaves idle; 0 = off (16: measured faster for both)
  c.model.decode_attention_warm_mb = 16
  # decode kernels load one step ahead (attention K/V; q, k, v and output GEMVs on a resident
  # grid); measured faster for dense and MoC (ModelConfig.decode_prefetch)
  c.model.decode_prefetch = True
  c.model.remat = "none"  # none | ffn | full: rematerialisation policy
  c.model.pad_to = config_dict.placeholder(int)  # pad F inside the op (None: 128 on GPU)
  c.model.document_mask = True  # packed rows attend only within their own document

  c.train = ml_collections.ConfigDict()
  c.train.steps = 10_000
  c.train.batch_size = 512  # sequences per optimizer step (global)
  c.train.seq_len = 256
  c.train.grad_accum = 1  # micro-batches per step (batch_size must divide by it)
  c.train.lr = 2.5e-3  # peak learning rate
  c.train.warmup_frac = 0.1  # linear warmup over this fraction of steps, then cosine to 0
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.weight_decay = 0.0
  c.train.grad_clip = 0.0  # global-norm clipping; 0 disables
  c.train.log_every = 10
  c.train.peak_tflops = config_dict.placeholder(float)  # for MFU; None: known GPUs only
  # GPU: only deterministic XLA kernels (e.g. sorted scatter-add for the embedding gradient),
  # so two runs of one config give the same loss trace bit for bit; costs some speed.
  c.train.deterministic = False
  # XLA options for the train step (moc_jax/compile_options.py): auto (measured GPU defaults:
  # every GEMM on cuBLAS), none, or name=value,name=value.
  c.train.compiler_options = "auto"

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 500  # steps between validation runs (also at the end)
  c.eval.batches = 20  # validation batches per run (a fixed, deterministic set)
  c.eval.batch_size = config_dict.placeholder(int)  # None: train.batch_size // grad_accum

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1000  # steps between saves (also at the end and on SIGTERM)
  c.checkpoint.keep = 3  # newest checkpoints kept
  c.checkpoint.async_save = True

  # Device mesh (docs/multi_gpu.md): sizes of (data, fsdp, tensor); -1 takes the remaining
  # devices. Parameters/optimizer state split over fsdp, batch over data×fsdp, heads and the
  # FFN's F over tensor (MoC keeps the exact global top-K). FSDP by default: on 2×H200 it beat
  # data parallelism for every preset measured, with less memory per GPU.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  # Multi-host (moc_jax/distributed.py): auto = initialize when SLURM / Open MPI / a
  # coordinator address says there are several processes; yes / no force it.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = "auto"  # auto | yes | no
  c.distributed.coordinator_address = config_dict.placeholder(str)  # host:port of process 0
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)
  # "0,1,2,3": this process's GPUs; None: all of the node's under SLURM with one task per node,
  # else JAX's default (one GPU per process when SLURM/MPI give a local rank).
  c.distributed.local_device_ids = config_dict.placeholder(str)
  c.distributed.initialization_timeout = 300  # s to wait for all processes to join
  c.distributed.heartbeat_timeout = 100  # s without a heartbeat before a process is dead
  c.distributed.shutdown_timeout = 300  # s to wait for the others at exit

  c.data = data.default_config()
  return c
