"""`@cached`: get_or_compute for an async function, its key built from its arguments by a template.

    @cached(lambda: runtime, "profile", key="user:{user_id}", ttl=60, stale_ttl=300)
    async def load_profile(user_id: str) -> dict: ...

`using` is a Runtime, a CacheService, a Dispatcher, or a callable with no arguments returning one (looked up
at each call: decorators run at import time, before a runtime exists). The options are get_or_compute's,
checked once here. The README ("Cache-aside") documents them.
"""

from __future__ import annotations

import functools
import inspect
import string
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ondemand.errors import InvalidInput
from ondemand.store.aside import AsideOptions
from ondemand.store.dispatcher import Dispatcher
from ondemand.store.values import check_id

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def dispatcher_of(using: Any) -> Dispatcher:
    """The dispatcher behind a Runtime, a CacheService, a Dispatcher, or a callable returning one of them."""
    found = using
    if callable(found) and not isinstance(found, Dispatcher) and not hasattr(found, "dispatcher"):
        found = found()
    found = getattr(found, "dispatcher", found)
    if not isinstance(found, Dispatcher):
        raise InvalidInput("cached: `using` must give a Runtime, CacheService or Dispatcher, "
                           f"got {type(found).__name__}")
    return found


def key_template(fn: Callable[..., Any], template: str | None) -> Callable[[inspect.BoundArguments], str]:
    """How a call's arguments make its id; an error now (at decoration) for a field naming no parameter."""
    signature = inspect.signature(fn)
    if template is None:  # the function's name and every argument, in order
        prefix = f"{fn.__module__}.{fn.__qualname__}"
        return lambda bound: ":".join([prefix, *(str(value) for value in bound.arguments.values())])
    fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    for field in fields:
        name = field.split(".", 1)[0].split("[", 1)[0]
        if not name or name not in signature.parameters:
            raise InvalidInput(f"cached key {template!r} names {name or 'a positional field'!r}, which is not a "
                               f"parameter of {fn.__qualname__}{signature}")
    return lambda bound: template.format(**bound.arguments)


def cached(using: Any, namespace: str, *, key: str | None = None, **options: Any) -> Callable[[F], F]:
    """Decorate an async function so that its result is cached by get_or_compute under `key` (a str.format
    template of its parameters; default: its qualified name and every argument)."""
    checked = AsideOptions.checked(**options)

    def decorate(fn: F) -> F:
        if not inspect.iscoroutinefunction(fn):
            raise InvalidInput(f"cached decorates async functions; {fn.__qualname__} is not one")
        signature = inspect.signature(fn)
        make_key = key_template(fn, key)

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            item_id = make_key(bound)
            check_id(item_id)
            return await dispatcher_of(using).get_or_compute(namespace, item_id, lambda: fn(*args, **kwargs),
                                                             options=checked)

        wrapper.cache_key = lambda *args, **kwargs: _key(signature, make_key, args, kwargs)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def _key(signature: inspect.Signature, make_key: Callable[[inspect.BoundArguments], str], args: tuple[Any, ...],
         kwargs: dict[str, Any]) -> str:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return make_key(bound)
