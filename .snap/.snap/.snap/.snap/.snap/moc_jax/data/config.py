"""`config.data` defaults and validation, so a typo fails at start-up, not mid-run."""

from __future__ import annotations

import ml_collections

from moc_jax.data.errors import DataError

SOURCES = ("embedded", "text", "tfds")
PACKINGS = ("concat", "first_fit", "pad")
STREAMING = ("auto", "on", "off")


def default_config() -> ml_collections.ConfigDict:
  """Returns the `config.data` section with its defaults."""
  c = ml_collections.ConfigDict()
  # Where documents come from: 'embedded' (this Python's standard library .py files, no
  # download), 'text' (local .txt / .jsonl / .json.gz files) or 'tfds' (a prepared TFDS
  # dataset: ArrayRecord, or TFRecord streamed with tf.data).
  c.source = "embedded"
  # source=text: glob of training files; several globs may be joined with commas.
  c.path = ""
  # source=text: optional glob(s) of validation files. '' = carve the validation split out of
  # `path` by a deterministic hash of each document's name.
  c.val_path = ""
  # source=text: 'auto' streams files line by line (shuffled by file, interleaved, no global
  # document shuffle) when they total more than 1 GiB on disk, else reads them into memory;
  # 'on' / 'off' force either.
  c.text_streaming = "auto"
  # Fraction of documents (embedded: files; text: files or jsonl lines) hashed into the
  # validation split when there is no separate validation data.
  c.val_fraction = 0.02
  # 'bytes' (256 bytes + BOS/EOS/PAD = 259 ids), or a path to a SentencePiece `.model` file
  # or a Hugging Face `tokenizer.json` file.
  c.tokenizer = "bytes"
  # How documents become fixed-length rows: 'concat' (concatenate then split; documents keep
  # their own segment ids and positions), 'first_fit' (pack whole documents, long ones cut
  # into seq_len pieces, into bins without splitting) or 'pad' (one document per row,
  # truncated to seq_len and padded; the paper's protocol).
  c.packing = "concat"
  # first_fit: number of rows packed at once; more bins = less padding.
  c.packing_bins = 64
  # Rows are shuffled in windows of this many rows after packing, so that one long document
  # does not fill a whole batch. 0 disables.
  c.shuffle_window = 1024
  # Worker processes for tokenizing and packing (grain mp_prefetch). 0 = in this process.
  # A run must be resumed with the same value (the order of rows depends on it).
  c.num_workers = 0
  # Batches each worker keeps ready.
  c.prefetch = 4
  # Seed of the document shuffle (reshuffled each epoch) and the row shuffle.
  c.shuffle_seed = 0
  # source=tfds: dataset name (e.g. 'c4/en' or 'c4/en:3.1.0'), data_dir ('' = TFDS default)
  # and the split names for training and validation.
  c.tfds_name = ""
  c.tfds_data_dir = ""
  c.tfds_train_split = "train"
  c.tfds_val_split = "validation"
  # source=tfds: 'auto' reads ArrayRecord builds with tfds.data_source (random access, no
  # TensorFlow) and streams other builds (TFRecord) with tf.data when TensorFlow is installed;
  # 'on' always streams with tf.data (needs TensorFlow); 'off' never does.
  c.tfds_streaming = "auto"
  # The field holding the document text in jsonl / json.gz records and TFDS examples.
  c.text_field = "text"
  return c


def check_config(data_config: ml_collections.ConfigDict) -> None:
  """Raises DataError naming the first key whose value is unusable."""
  c = data_config
  if c.source not in SOURCES:
    raise DataError(f"config.data.source={c.source!r} is unknown; valid: {', '.join(SOURCES)}")
  if c.packing not in PACKINGS:
    raise DataError(f"config.data.packing={c.packing!r} is unknown; valid: {', '.join(PACKINGS)}")
  for key in ("text_streaming", "tfds_streaming"):
    if c[key] not in STREAMING:
      raise DataError(f"config.data.{key}={c[key]!r} is unknown; valid: {', '.join(STREAMING)}")
  if not 0.0 <= float(c.val_fraction) < 1.0:
    raise DataError(f"config.data.val_fraction={c.val_fraction} must be in [0, 1)")
  if int(c.num_workers) < 0:
    raise DataError(f"config.data.num_workers={c.num_workers} must be >= 0")
  if int(c.packing_bins) < 1:
    raise DataError(f"config.data.packing_bins={c.packing_bins} must be >= 1")
  if int(c.shuffle_window) < 0:
    raise DataError(f"config.data.shuffle_window={c.shuffle_window} must be >= 0")
  if not 0 <= int(c.shuffle_seed) < 2**32:
    raise DataError(f"config.data.shuffle_seed={c.shuffle_seed} must be in [0, 2**32)")
  if c.source == "text" and not str(c.path).strip():
    raise DataError(
      "config.data.source='text' needs config.data.path (a glob of .txt/.jsonl/.json.gz files)"
    )
  if c.source == "tfds" and not str(c.tfds_name).strip():
    raise DataError("config.data.source='tfds' needs config.data.tfds_name (e.g. 'c4/en')")
