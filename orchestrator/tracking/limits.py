"""What an MLflow store accepts (its length limits) and how our values are shaped to fit them."""

from __future__ import annotations

from typing import Any

MAX_TAG_VAL_LENGTH = 8000  # MLflow's limits (mlflow/utils/validation.py); MLflow splits batches itself
MAX_KEY_LENGTH = 250
METRICS_PER_REQUEST = 1000
# Older servers (MLflow < 2) still limit param values to 500 chars: stay below that so every server accepts them.
PARAM_VALUE_LIMIT = 500
TRUNCATION_MARK = "...[truncated]"


def stringify(v: Any) -> str:
    if v is None:
        return "None"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(stringify(x) for x in v) + "]"
    return str(v)


def truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK
