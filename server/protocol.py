"""The request contract of the served ``mvgen`` models: ``engine.request.FIELDS`` on the wire.

The inputs are each request field's ``Wire`` forms, so the repository generator (``config.pbtxt``), the
``mvgen`` model's parsing (``request_arguments``), the client (``server.client``) and the README's table
(``markdown_table``) follow the one declaration. Triton fixes one data type per input name, so an image
comes either encoded (``first_frame``: BYTES) or as pixels (``first_frame_rgb``: UINT8) under two names;
give one of the two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine import request as contract
from engine.errors import RequestError


@dataclass(frozen=True)
class Field:
    name: str
    triton_type: str  # TYPE_* of config.pbtxt
    dims: tuple[int, ...]
    optional: bool
    doc: str
    required: str = ""  # the README's words: "yes", "no", "one of the two"

    @property
    def wire_type(self) -> str:
        """The KServe v2 datatype a client sends (``BYTES``, ``UINT8``, ...)."""
        return contract.wire_type(self.triton_type)


def inputs() -> tuple[Field, ...]:
    """The ``mvgen`` models' inputs: every request field's wire form(s), in the declaration's order."""
    out = []
    for field in contract.FIELDS:
        pair = len(field.wire) > 1
        required = ("one of the two" if pair else "yes") if field.required else "no"
        if field.default is contract.I2V_ONLY:
            required = "I2V models: one of the two"
        for wire in field.wire:
            out.append(Field(wire.name, wire.triton_type, wire.dims, optional=required != "yes",
                             doc=wire.doc or field.describe(), required=required))
    return tuple(out)


INPUTS: tuple[Field, ...] = inputs()
OUTPUTS: tuple[Field, ...] = (
    Field("video", "TYPE_UINT8", (-1, -1, -1, 3), False, "frames [F, H, W, 3] (final response)"),
    Field("progress", "TYPE_INT32", (2,), False, "(step, total); one response per step, streaming model only"),
)


def request_arguments(get: Callable[[str], np.ndarray | None]) -> dict:
    """Keyword arguments of ``engine.request.make_request`` from a request's tensors (unset fields left out).

    ``get(name)`` returns the named input as a numpy array, or None when the request lacks it. Raises
    ``RequestError`` naming the input for a missing one, a wrong element count, or an image given twice.
    """
    args = {}
    for field in contract.FIELDS:
        value = _READERS[field.kind](field, get)
        if value is None and field.required:
            raise RequestError(f"missing input {_spelled(field)}")
        if value is not None:
            args[field.name] = value
    return args


def _spelled(field) -> str:
    """``'first_frame' (BYTES [1]) or 'first_frame_rgb' (UINT8 [-1, -1, 3])``: how a field may be sent."""
    return " or ".join(f"'{w.name}' ({w.wire_type} {list(w.dims)})" for w in field.wire)


def _text(field, get) -> str | None:
    value = get(field.wire[0].name)
    if value is None:
        return None
    if value.size != 1:
        raise RequestError(f"input '{field.wire[0].name}' must hold one string, got {value.size}")
    item = value.reshape(-1)[0]
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"input '{field.wire[0].name}' is not valid UTF-8 text") from None
    return str(item)


def _scalar(field, get):
    value = get(field.wire[0].name)
    if value is None:
        return None
    if value.size != 1:
        raise RequestError(f"input '{field.wire[0].name}' must hold one value, got shape {list(value.shape)}")
    return value.reshape(-1)[0].item()


def _numbers(field, get) -> list | None:
    value = get(field.wire[0].name)
    return None if value is None else [item.item() for item in value.reshape(-1)]


def _size(field, get) -> tuple[int, int] | None:
    value = get(field.wire[0].name)
    if value is None:
        return None
    if value.size != 2:
        raise RequestError(f"input '{field.wire[0].name}' must hold (height, width), got shape {list(value.shape)}")
    return tuple(item.item() for item in value.reshape(-1))


def _image(field, get):
    """The encoded form (bytes; a list of them for ``images``) or the pixels (rows are images), never both."""
    (encoded_wire, pixels_wire) = field.wire
    encoded, pixels = get(encoded_wire.name), get(pixels_wire.name)
    if encoded is not None and pixels is not None:
        raise RequestError(f"give '{encoded_wire.name}' (encoded) or '{pixels_wire.name}' (pixels), not both")
    many = field.kind in ("images", "frames")
    if pixels is not None:
        return list(pixels) if many else pixels
    if encoded is None:
        return None
    items = [bytes(item) for item in encoded.reshape(-1)]
    if many:
        return items
    if len(items) != 1:
        raise RequestError(f"input '{encoded_wire.name}' must hold one encoded image, got {len(items)}")
    return items[0]


# how each kind of request field (engine.request.KINDS) is read from the request's tensors
_READERS = {"text": _text, "integer": _scalar, "number": _scalar, "numbers": _numbers, "size": _size,
            "image": _image, "images": _image, "frames": _image}


def markdown_table() -> str:
    """The contract as the Markdown table of ``README.md`` and ``server/README.md``."""
    lines = ["| name | in/out | datatype | shape | required | meaning |", "|---|---|---|---|---|---|"]
    for direction, fields in (("input", INPUTS), ("output", OUTPUTS)):
        for f in fields:
            shape = "[" + ", ".join("-1" if d < 0 else str(d) for d in f.dims) + "]"
            lines.append(f"| `{f.name}` | {direction} | {f.wire_type} | {shape} | {f.required} | {f.doc} |")
    return "\n".join(lines)
