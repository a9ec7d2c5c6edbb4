"""One config value against its schema field: its type (with the readings YAML and --set need), its
numeric bounds, and the closest valid name when it is misspelt."""

from __future__ import annotations

import difflib
import math
import typing
from typing import Any, Literal


YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def suggest(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in inner) + (" or null" if len(inner) < len(typing.get_args(tp)) else "")
    if origin is list:
        item = type_name(typing.get_args(tp)[0])
        return "a list of " + (item.split(" ", 1)[1] + "s" if item.startswith(("a ", "an ")) else item)
    if origin is dict:
        return "a mapping of strings"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}[tp]


def check_type(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, normalised value). Ints are accepted where floats are expected, never bools for numbers."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None:
            return type(None) in typing.get_args(tp), None
        checked = [check_type(value, a) for a in typing.get_args(tp) if a is not type(None)]
        return next(((True, v) for ok, v in checked if ok), (False, value))
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads `mixed_precision: no` as false
            value = next((w for w in YAML_BOOL_WORDS[value] if w in typing.get_args(tp)), value)
        return value in typing.get_args(tp), value
    if origin is list:
        if isinstance(value, (str, int, float)):  # one item is a one-item list: `--set lora.layers=3`
            value = [value]
        if not isinstance(value, list):
            return False, value
        item = typing.get_args(tp)[0]
        checked = [check_type(v, item) for v in value]
        return all(ok for ok, _ in checked), [v for _, v in checked]
    if origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        return ok, value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string; users mean the number
            try:
                number = float(value)
            except ValueError:
                return False, value
            return math.isfinite(number), number
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, tp), value


def check_bounds(key: str, value: Any, meta: typing.Mapping) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    for name, test, word in (("ge", lambda b: value >= b, ">="), ("gt", lambda b: value > b, ">"),
                             ("le", lambda b: value <= b, "<="), ("lt", lambda b: value < b, "<")):
        bound = meta.get(name)
        if bound is not None and not test(bound):
            return f"{key}: {value!r} is out of range; it must be {word} {bound}"
    return None


def is_str_type(tp: Any) -> bool:
    """A string field: `--set` keeps the text as typed (`model.revision=1234` stays '1234')."""
    if typing.get_origin(tp) is typing.Union:
        return all(is_str_type(a) for a in typing.get_args(tp) if a is not type(None))
    return tp is str


# What users of TRL, transformers' TrainingArguments and peft call our settings, and how the values differ
# where they do (a value copied across would be refused, or worse, taken).
OTHER_NAMES = {
    "lr": ("train.learning_rate", ""), "per_device_train_batch_size": ("train.micro_batch_size", ""),
    "per_device_eval_batch_size": ("train.eval_batch_size", ""), "num_train_epochs": ("train.num_epochs", ""),
    "epochs": ("train.num_epochs", ""), "rank": ("lora.r", ""), "lora_r": ("lora.r", ""), "lora_rank": ("lora.r", ""),
    "lora_alpha": ("lora.alpha", ""), "lora_dropout": ("lora.dropout", ""), "cpo_alpha": ("simpo.sft_weight", ""),
    "model_name_or_path": ("model.name_or_path", ""), "model_name": ("model.name_or_path", ""),
    "model": ("model.name_or_path", ""), "dataset": ("data.source", ""), "dataset_name": ("data.source", ""),
    "gamma": ("simpo.gamma_beta_ratio", " (the target margin divided by simpo.beta)"),
    "simpo_gamma": ("simpo.gamma_beta_ratio", " (the target margin divided by simpo.beta)"),
    "bf16": ("train.mixed_precision", " (auto, no, bf16 or fp16)"),
    "fp16": ("train.mixed_precision", " (auto, no, bf16 or fp16)"),
    "optim": ("train.optimizer", " (auto, adamw or paged_adamw_8bit)"),
    "lr_scheduler_type": ("train.lr_scheduler", " (cosine, linear or constant)"),
    "load_in_4bit": ("model.quantize", " (true or false)"),
}


def setting_named(fields: dict, key: str) -> tuple[str, str] | None:
    """(the dotted setting a bare key names, how its values differ or ''): a key of exactly one section
    of `fields` (the schema), or another tool's name for it."""
    owners = [section for section, names in fields.items() if key in names]
    if len(owners) == 1:
        return f"{owners[0]}.{key}", ""
    return OTHER_NAMES.get(key)


def suggest_key(fields: dict, section: str, key: str) -> str:
    """The hint after "unknown key 'section.key'": its right section, our name for it, or the closest key."""
    elsewhere = [s for s, names in fields.items() if key in names]
    if elsewhere:
        return f"; it belongs to section '{elsewhere[0]}' ('{elsewhere[0]}.{key}')"
    if key in OTHER_NAMES:
        name, values = OTHER_NAMES[key]
        return f"; simpo-lite calls it '{name}'{values}"
    hint = suggest(key, fields[section])
    if hint:
        return hint.replace("'", f"'{section}.", 1)
    return f"; valid keys: {', '.join(fields[section])}"
