"""Compression policies, one file each, chosen by a method string such as 'interval:32'.

To add a policy: write a `Policy` subclass in its own file and add it to `REGISTRY`.
"""

from __future__ import annotations

import inspect

from dyncomp.errors import UserError
from dyncomp.policies.base import DecodeState, Policy
from dyncomp.policies.classifier import ClassifierPolicy
from dyncomp.policies.interval import IntervalPolicy
from dyncomp.policies.newline import NewlinePolicy
from dyncomp.policies.none import NonePolicy
from dyncomp.policies.oracle import OraclePolicy

REGISTRY: dict[str, type[Policy]] = {
    "none": NonePolicy,
    "newline": NewlinePolicy,
    "interval": IntervalPolicy,
    "oracle": OraclePolicy,
    "classifier": ClassifierPolicy,
}

# Policies whose constructor takes the part after the colon.
_TAKES_ARGUMENT = {"newline", "interval", "classifier"}


def make_policy(method: str, min_step_tokens: int = 8, **context) -> Policy:
    """Build the policy a method string names, e.g. 'none', 'newline', 'interval:32'.

    `context` carries what some policies need (a trained classifier for 'classifier:τ').
    """
    name, _, argument = method.strip().partition(":")
    if name not in REGISTRY:
        raise UserError(f"unknown method '{method}'; known methods: {', '.join(sorted(REGISTRY))} (e.g. interval:32)")
    cls = REGISTRY[name]
    # Context goes only to the policies that take it, so one call site can build any method.
    accepted = inspect.signature(cls.__init__).parameters
    context = {key: value for key, value in context.items() if key in accepted}
    if name not in _TAKES_ARGUMENT:
        if argument:
            raise UserError(f"method '{name}' takes no argument, got '{method}'")
        return cls(min_step_tokens=min_step_tokens, **context)
    return cls(argument or None, min_step_tokens=min_step_tokens, **context)


def check_method(method: str) -> None:
    """Raise `UserError` for a method string that names no policy or has an invalid argument.

    Policies that need context (a trained classifier) are checked for their name and argument
    only, so a typo is caught before any model is loaded.
    """
    name, _, argument = method.strip().partition(":")
    if name not in REGISTRY:
        raise UserError(f"unknown method '{method}'; known methods: {', '.join(sorted(REGISTRY))} (e.g. interval:32)")
    if name == "classifier":
        if argument:
            from dyncomp.policies.classifier import parse_tau

            parse_tau(argument)
        return
    make_policy(method)


def parse_methods(text: str) -> list[str]:
    """Split a comma-separated --methods value, rejecting empty entries and duplicates."""
    methods = [m.strip() for m in text.split(",")]
    if any(not m for m in methods):
        raise UserError(f"--methods '{text}' has an empty entry; separate method names with single commas")
    if len(set(methods)) != len(methods):
        raise UserError(f"--methods '{text}' names a method twice")
    return methods


__all__ = ["DecodeState", "Policy", "REGISTRY", "check_method", "make_policy", "parse_methods"]
