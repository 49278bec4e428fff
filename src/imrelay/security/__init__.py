"""Security: sensitive words, PII masking, audit trail, secrets, access control, rate limits."""

from __future__ import annotations

__all__: list[str] = []
