"""Start-up of a service process: a bad setting ends it with one clear line per problem, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)
# The exit status of a process that refused its configuration (EX_CONFIG in sysexits.h).
EXIT_CONFIG = 78


class ConfigurationError(ValueError):
    """Settings the service cannot run with; the message names the setting and why."""


def configuration_problems(error: ValidationError, env_prefix: str) -> list[str]:
    """Return one line per problem: the environment variable (and the place inside its value) and the reason.

    The offending values are left out: they may be secrets.

    >>> from pydantic import BaseModel
    >>> class Example(BaseModel):
    ...     endpoints: dict[str, bool]
    >>> try:
    ...     Example(endpoints={"marketing": "whsec_oops"})
    ... except ValidationError as exc:
    ...     configuration_problems(exc, "TOUCHSTREAM_TRIGGERS_")
    ['TOUCHSTREAM_TRIGGERS_ENDPOINTS (marketing): Input should be a valid boolean, unable to interpret input']
    """
    lines = []
    for problem in error.errors(include_input=False, include_url=False):
        reason = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:
            lines.append(reason)
            continue
        variable = f"{env_prefix}{problem['loc'][0]}".upper()
        inside = ".".join(str(part) for part in problem["loc"][1:])
        lines.append(f"{variable} ({inside}): {reason}" if inside else f"{variable}: {reason}")
    return lines


def _refuse_to_start(service: str, problems: list[str]) -> NoReturn:
    print(f"{service}: refusing to start, bad configuration:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG)


def settings_or_exit(service: str, settings_class: type[S]) -> S:
    """Read `settings_class` from the environment; exit with EXIT_CONFIG and the reasons if it is invalid."""
    try:
        return settings_class()
    except ValidationError as exc:
        _refuse_to_start(service, configuration_problems(exc, settings_class.model_config.get("env_prefix", "")))


@contextmanager
def exit_on_configuration_error(service: str) -> Iterator[None]:
    """Turn a ConfigurationError raised inside the block into a clear exit with EXIT_CONFIG."""
    try:
        yield
    except ConfigurationError as exc:
        _refuse_to_start(service, str(exc).splitlines())

