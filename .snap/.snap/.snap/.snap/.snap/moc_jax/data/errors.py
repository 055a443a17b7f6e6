"""The one error type the data pipeline raises for bad user input."""


class DataError(ValueError):
  """A data source, split, tokenizer or config value is unusable; the message names it."""
