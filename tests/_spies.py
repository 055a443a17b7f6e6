"""Which kernel a call routes to: wrap functions so each call is recorded, then run as usual."""

from __future__ import annotations


def record_calls(monkeypatch, *targets: tuple[object, str]) -> list[str]:
  """Each (module, name) wrapped for the test: a call appends `name` to the returned list and
  runs the original."""
  calls: list[str] = []
  for module, name in targets:
    original = getattr(module, name)
    spy = lambda *a, original=original, name=name, **k: calls.append(name) or original(*a, **k)
    monkeypatch.setattr(module, name, spy)
  return calls
