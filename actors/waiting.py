"""Waiting on Ray calls to several actors at once, so that a stuck or dead one is named.

Every call site keeps its refs as a mapping from ObjectRef to a label (an engine index, a
placement spec): ``unfinished`` says which labels did not finish in time, ``outcomes``
gives each finished call's value or the Ray error that took its place, and
``gather_first_failure`` raises the first failure among collective peers at once."""

from __future__ import annotations

from typing import Any, Mapping, Sequence, TypeVar

import ray

Label = TypeVar("Label")

# An actor's death, or an exception raised inside its task: the two a caller tells apart.
CALL_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.RayTaskError)


def unfinished(refs: Mapping[Any, Label], timeout_s: float | None) -> dict[Any, Label]:
    """Wait up to ``timeout_s`` (None: for ever; 0: not at all) for every ref; the ones still
    running, with their labels, in ``refs``' order. A failed call counts as finished."""
    if not refs:
        return {}
    _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    still = set(pending)
    return {ref: label for ref, label in refs.items() if ref in still}


def outcomes(refs: Mapping[Any, Label]) -> list[tuple[Label, Any, BaseException | None]]:
    """(label, value, None) or (label, None, error) for each finished ref, in ``refs``' order;
    the error is the actor's death (``RayActorError``) or its task's exception
    (``RayTaskError``). Any other error is raised."""
    found: list[tuple[Label, Any, BaseException | None]] = []
    for ref, label in refs.items():
        try:
            found.append((label, ray.get(ref), None))
        except CALL_ERRORS as error:
            found.append((label, None, error))
    return found


def gather_first_failure(refs: Sequence[Any]) -> list[Any]:
    """Every call's result, in order, raising the FIRST failure as soon as it happens: peers
    of a collective are then stuck until their timeout, and waiting for them would hide the
    cause."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done[0])
    return ray.get(list(refs))
