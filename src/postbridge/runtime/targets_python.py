"""The ``python`` flow target: call ``function(delivery)`` from an importable module.

Settings: ``callable = "package.module:function"`` (after the colon a dotted attribute path, e.g.
``"app.hooks:Inbox.receive"``). The module is imported while the target is built, so a missing module or attribute
is a configuration error before the first message. The function gets the :class:`~postbridge.runtime.targets.Delivery`
and returns the ref (a string; ``None`` gives ``python <callable>``, anything else becomes its ``str``).
A :class:`~postbridge.runtime.targets.TargetError` it raises is passed on as it is (so it decides what is
retryable); any other exception is retryable and reported with its type and message.

Must not: catch what is not an ``Exception`` (KeyboardInterrupt, SystemExit pass), or run the function while
building.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from typing import Any

from postbridge.runtime.targets import Delivery, DeliveryResult, TargetError, TargetTable

KEYS = ("kind", "callable")
_REFERENCE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


class PythonTarget:
    """Calls one function per delivery."""

    kind = "python"

    def __init__(self, reference: str, function: Callable[[Delivery], object]) -> None:
        self.reference = reference
        self._function = function

    def __repr__(self) -> str:
        return f"PythonTarget({self.reference!r})"

    def deliver(self, delivery: Delivery) -> DeliveryResult:
        """Call the function; raises its TargetError, or a retryable TargetError for any other exception."""
        try:
            value = self._function(delivery)
        except TargetError:
            raise
        except Exception as exc:
            raise TargetError(
                f"{self.reference} failed on message {delivery.key}: {type(exc).__name__}: {exc}",
                retryable=True,
                hint="the message is handed to it again later; raise TargetError(..., retryable=False) from the "
                "function for a message it will never take",
            ) from exc
        ref = f"python {self.reference}" if value is None else value if isinstance(value, str) else str(value)
        return DeliveryResult(ref=ref)

    def close(self) -> None:
        """Nothing to release (the module stays imported)."""


def load(reference: str, reader: TargetTable) -> Callable[[Delivery], object]:
    """Import ``module:attribute.path``; raises ConfigurationError naming what is missing or what failed."""
    module_name, _, attributes = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        needed = (
            "" if missing == module_name or module_name.startswith(f"{missing}.") else f" (needed by {module_name})"
        )
        raise reader.error(
            f"callable {reference!r}: no module named {missing!r}{needed}",
            hint="install it, or put its folder on PYTHONPATH for the postbridge process",
        ) from None
    except Exception as exc:  # the module's own code failed while importing
        raise reader.error(
            f"callable {reference!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}",
            hint="fix the module (run 'python -c \"import " + module_name + "\"' to see the traceback)",
        ) from exc
    walked: list[str] = []
    for attribute in attributes.split("."):
        if not hasattr(target, attribute):
            owner = f"{module_name}:{'.'.join(walked)}" if walked else f"module {module_name}"
            raise reader.error(
                f"callable {reference!r}: {owner} has no attribute {attribute!r}",
                hint="check the name after the colon (module:function)",
            )
        target = getattr(target, attribute)
        walked.append(attribute)
    if not callable(target):
        raise reader.error(f"callable {reference!r} is a {type(target).__name__}, which cannot be called")
    function: Callable[[Delivery], object] = target
    return function


def build(table: Mapping[str, Any], *, source: str) -> PythonTarget:
    """The python target of ``table`` (its module imported); raises ConfigurationError (see ``build_target``)."""
    reader = TargetTable(table, source, KEYS)
    reference = reader.required_text("callable").strip()
    if not _REFERENCE.fullmatch(reference):
        raise reader.error(f"callable {reference!r} is not 'package.module:function'")
    return PythonTarget(reference, load(reference, reader))
