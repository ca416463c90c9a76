"""Readable messages for pydantic's validation errors of the config classes (``fastkd.config``).

One line per problem, naming the dotted key as the user writes it: an unknown key suggests the closest
valid one, a wrong type names the value and the expected type. Torch-free, and it knows no config class:
it walks the annotations from the root class. The feature pairs are a union tagged by ``loss`` (each
member's ``loss`` default is its tag); pydantic puts that tag into error locations after the pair's
index, and it is dropped here, so ``distill.pairs.0.mgd.ratio`` reads ``distill.pairs.0.ratio``.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

from pydantic import ValidationError


def suggest(word: Any, valid: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``valid``, or nothing."""
    close = difflib.get_close_matches(str(word), list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def format_validation_error(exc: ValidationError, root: Any, source: str = "") -> str:
    lines: Dict[str, str] = {}
    for err in exc.errors():
        loc = list(err["loc"])
        kind = err["type"]
        if kind in ("unexpected_keyword_argument", "extra_forbidden"):
            lines.update([_unknown_key(root, loc)])
            continue
        floc, ann = _field_loc(root, loc)
        key = _dotted(floc)
        losses = list(_tagged(ann))
        if kind == "union_tag_invalid" and losses and isinstance(err["input"], dict):
            key, value = _dotted(floc + ["loss"]), err["input"].get("loss")
            lines[key] = (f"{key}: got {value!r} ({type(value).__name__}), expected "
                          f"{' | '.join(repr(n) for n in losses)}{suggest(value, losses)}: the registered losses "
                          f"(a module listed in `imports` can register one of your own)")
        elif kind == "missing" or kind == "missing_keyword_argument":
            lines[key] = f"{key}: required key is missing ({_type_name(ann)})"
        elif kind == "value_error":
            msg = err["msg"].removeprefix("Value error, ")
            lines[key] = msg if not floc else f"{key}: {msg}"
        else:
            value = err.get("input")
            lines[key] = (f"{key}: got {value!r} ({type(value).__name__}), expected "
                          f"{_type_name(ann)}")
    where = f" in {source}" if source else ""
    return f"invalid configuration{where}:\n  " + "\n  ".join(lines.values())


def _unknown_key(root: Any, loc: Sequence) -> Tuple[str, str]:
    """(dotted key, message) for a key its section does not have: the closest valid key and all of them;
    in a pair, the keys of its loss, and which other losses have the key."""
    shown, parent = _untag(root, loc), _strip_optional(_annotation_at(root, loc[:-1]))
    valid = [f.name for f in dataclasses.fields(parent)] if dataclasses.is_dataclass(parent) else []
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
    hint = f"; did you mean {_dotted(shown[:-1] + close)!r}?" if close else ""
    here, elsewhere = "here", ""
    siblings = _tagged(_strip_optional(_annotation_at(root, loc[:-2])))
    if parent in siblings.values():
        here = f"for loss {parent.loss!r}"
        owners = [n for n, c in siblings.items() if loc[-1] in {f.name for f in dataclasses.fields(c)}]
        elsewhere = f"; {loc[-1]} is a key of loss {' | '.join(repr(n) for n in owners)}" if owners else ""
    key = _dotted(shown)
    return key, f"unknown key {key!r}{hint} (valid keys {here}: {', '.join(valid)}{elsewhere})"


def _tagged(ann: Any) -> Dict[str, type]:
    """{tag: member} of a union of dataclasses tagged by their ``loss`` default (the pairs); {} otherwise."""
    args = typing.get_args(ann) if typing.get_origin(ann) is Union else ()
    tags = {getattr(a, "loss", None): a for a in args if dataclasses.is_dataclass(a)}
    return tags if args and len(tags) == len(args) and all(isinstance(t, str) for t in tags) else {}


def _member_at(ann: Any, part: Any) -> Optional[type]:
    """The member of a tagged union that a location part (a tag) selects, else None."""
    return _tagged(_strip_optional(ann)).get(part) if isinstance(part, str) else None


def _annotation_at(cls: Any, loc: Sequence) -> Any:
    """The annotation at a pydantic error location, walking dataclasses, lists, dicts, optionals, tags."""
    ann: Any = cls
    for part in loc:
        ann = _strip_optional(ann)
        if _member_at(ann, part) is not None:
            ann = _member_at(ann, part)
        elif dataclasses.is_dataclass(ann) and isinstance(part, str):
            hints = typing.get_type_hints(ann)
            if part not in hints:
                return None
            ann = hints[part]
        elif typing.get_origin(ann) in (list, List, tuple) and isinstance(part, int):
            args = typing.get_args(ann)
            ann = args[min(part, len(args) - 1)] if args else Any
        elif typing.get_origin(ann) in (dict, Dict):
            ann = typing.get_args(ann)[1] if typing.get_args(ann) else Any
        else:
            return ann
    return ann


def _untag(root: Any, loc: Sequence) -> List:
    """The location as the user writes it: without the tags of the pairs."""
    out: List = []
    ann: Any = root
    for part in loc:
        member = _member_at(ann, part) if ann is not None else None
        if member is None:
            out.append(part)
        ann = member or (_annotation_at(ann, [part]) if ann is not None else None)
    return out


def _strip_optional(ann: Any) -> Any:
    if typing.get_origin(ann) is Union:
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _type_name(ann: Any) -> str:
    if ann is None:
        return "?"
    if _tagged(ann):
        return "a mapping (a feature pair)"
    origin = typing.get_origin(ann)
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(ann))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(ann))
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(ann)[0])}"
    if origin in (tuple, Tuple):
        return "[" + ", ".join(_type_name(a) for a in typing.get_args(ann)) + "]"
    if origin in (dict, Dict):
        return "mapping"
    if ann is type(None):
        return "null"
    if dataclasses.is_dataclass(ann):
        return f"a mapping ({ann.__name__} section)"
    return getattr(ann, "__name__", str(ann))


def _dotted(loc: Sequence) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _field_loc(root: Any, loc: Sequence) -> Tuple[List, Any]:
    """The location without pydantic's union-branch tags (e.g. 'float', "literal['auto']", a pair's loss),
    and the annotation there."""
    out: List = []
    ann: Any = root
    for part in loc:
        if ann is not None and _member_at(ann, part) is not None:
            ann = _member_at(ann, part)
            continue
        nxt = _annotation_at(ann, [part]) if ann is not None else None
        stripped = _strip_optional(ann) if ann is not None else None
        is_field = isinstance(part, int) or (dataclasses.is_dataclass(stripped) and nxt is not None) or \
            typing.get_origin(stripped) in (dict, Dict)
        if not is_field and out:
            break
        out.append(part)
        ann = nxt
    return out, ann
