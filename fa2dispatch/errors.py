"""Exceptions of fa2dispatch."""

from __future__ import annotations


class NoBackendError(NotImplementedError):
    """No registered backend can compute this call. ``reasons`` maps backend name -> reasons."""

    def __init__(self, problem_text: str, reasons: dict[str, list[str]]):
        self.reasons = reasons
        lines = [f"no fa2dispatch backend can run this call: {problem_text}"]
        for name, why in reasons.items():
            lines.append(f"  {name}:")
            lines.extend(f"    - {r}" for r in why)
        super().__init__("\n".join(lines))
