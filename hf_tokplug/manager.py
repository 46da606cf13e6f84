"""Plugin discovery (entry points), per-run plugin managers and hook dispatch by aggregation rule.

- Installed plugins are the ``hf_tokplug`` entry points (built-in ones included) plus classes registered at
  run time with :func:`register_plugin`. ``HF_TOKPLUG_LOAD_PLUGINS=a,b`` restricts entry points to those names
  (empty: none), except the host's own entry point ``hf_tokplug`` (its built-in tasks), which always loads.
- A *run* registers only the plugins its recipe enables, in recipe order, so an installed plugin that is not named
  never changes anything. Setup hooks (``tokplug_register_*``) are collected from every installed plugin class.
- ``HF_TOKPLUG_TRACE=1`` prints every hook call with the plugins it reached and its duration.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from typing import Any, Callable, Iterator

import pluggy
from pydantic import BaseModel, ValidationError

from . import hookspecs
from .errors import PluginError, TokPlugError
from .hookspecs import HOOK_RULES, PROJECT

ENTRY_POINT_GROUP = "hf_tokplug"
HOST_ENTRY_POINT = "hf_tokplug"  # the built-in tasks and token-init strategies (hf_tokplug.runners:BuiltinTasks)
LOAD_ENV = "HF_TOKPLUG_LOAD_PLUGINS"
TRACE_ENV = "HF_TOKPLUG_TRACE"


@dataclass
class PluginInfo:
    """One installed plugin: where it comes from, and its class or the error raised while importing it."""

    name: str
    source: str
    dist: str | None
    version: str | None
    cls: type | None
    error: BaseException | None = None

    def require(self) -> type:
        if self.cls is None:
            raise PluginError(
                f"plugin {self.name!r} ({self.source}) failed to import: {type(self.error).__name__}: {self.error}",
                fix=f"fix the import error, or reinstall the package that provides it ({self.dist or 'unknown'})",
            )
        return self.cls


_RUNTIME: dict[str, PluginInfo] = {}


def register_plugin(name: str, cls: type, version: str | None = None) -> None:
    """Make a plugin class available under ``name`` without an entry point (notebooks, tests)."""
    _RUNTIME[name] = PluginInfo(name, f"{cls.__module__}.{cls.__qualname__}", None, version, cls)
    _reset_caches()


def unregister_plugin(name: str) -> None:
    _RUNTIME.pop(name, None)
    _reset_caches()


@contextmanager
def registered(name: str, cls: type) -> Iterator[None]:
    """``with registered("name", MyPlugin): ...`` makes a plugin available for the block only."""
    register_plugin(name, cls)
    try:
        yield
    finally:
        unregister_plugin(name)


def _reset_caches() -> None:
    _setup_manager.cache_clear()
    registries.cache_clear()


@cache
def _entry_point_plugins(allow: str | None) -> dict[str, PluginInfo]:
    allowed = None if allow is None else {n.strip() for n in allow.split(",") if n.strip()}
    found: dict[str, PluginInfo] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed and ep.name != HOST_ENTRY_POINT:
            continue
        dist = ep.dist.name if ep.dist is not None else None
        version = ep.dist.version if ep.dist is not None else None
        if ep.name in found and found[ep.name].dist != dist:
            first = found[ep.name]
            error = PluginError(f"plugin name {ep.name!r} is registered by two packages: {first.dist} ({first.source}) "
                                f"and {dist} ({ep.value})", fix="uninstall one of the two packages")
            _skip(ep.name, ep.value, dist, error)
            found[ep.name] = PluginInfo(ep.name, f"{first.source} | {ep.value}", f"{first.dist}, {dist}", None, None,
                                        error)
            continue
        try:
            cls, error = ep.load(), None
        except (Exception, SystemExit) as exc:  # skipped here; fails only the runs that enable it
            cls, error = None, exc
            _skip(ep.name, ep.value, dist, exc)
        found[ep.name] = PluginInfo(ep.name, ep.value, dist, version, cls, error)
    return found


def _skip(name: str, value: str, dist: str | None, error: BaseException) -> None:
    import warnings

    warnings.warn(f"hf_tokplug: skipping plugin entry point {name!r} = {value!r} (package {dist or 'unknown'}): "
                  f"{type(error).__name__}: {error}; runs that enable it fail, others are not affected",
                  stacklevel=3)


def _disable(info: PluginInfo, error: BaseException) -> None:
    """A plugin that imported but cannot be set up (invalid hooks, a setup hook that raises) is skipped too."""
    _skip(info.name, info.source, info.dist, error)
    info.cls, info.error = None, error


def installed_plugins() -> dict[str, PluginInfo]:
    """All plugins that can be enabled: entry points (allow-listed) plus runtime registrations."""
    plugins = dict(_entry_point_plugins(os.environ.get(LOAD_ENV)))
    plugins.update(_RUNTIME)
    return plugins


def plugin_info(name: str, where: str | None = None) -> PluginInfo:
    plugins = installed_plugins()
    if name not in plugins:
        known = ", ".join(sorted(plugins)) or "none"
        hint = f" ({LOAD_ENV} is set and does not list it)" if os.environ.get(LOAD_ENV) is not None else ""
        raise PluginError(
            f"unknown plugin {name!r}{hint}; installed plugins: {known}",
            where=where,
            fix="check the spelling, or install the package that provides the plugin (`tokplug plugins` lists them)",
        )
    return plugins[name]


def validate_config(name: str, cls: type, raw: Any, where: str | None = None) -> BaseModel | None:
    """Validate a plugin's recipe block with the plugin's own config class."""
    config_class = getattr(cls, "config_class", None)
    raw = {} if raw is None else raw
    if isinstance(raw, BaseModel):
        raw = raw.model_dump()
    if config_class is None:
        if raw:
            raise PluginError(
                f"plugin {name!r} takes no options, got {sorted(raw)}", where=where, fix="remove the options"
            )
        return None
    if not isinstance(raw, dict):
        raise PluginError(
            f"the options of plugin {name!r} must be a mapping, got {type(raw).__name__}",
            where=where,
            fix="write the options as `key: value` pairs, or `{}` for the defaults",
        )
    try:
        return config_class.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(block)'}: {err['msg']}" for err in exc.errors()
        )
        fields = ", ".join(config_class.model_fields)
        raise PluginError(
            f"invalid options for plugin {name!r}: {problems}",
            where=where,
            fix=f"valid options are: {fields} (see `tokplug plugins` and the plugin's docs)",
        ) from None


def instantiate(name: str, raw_config: Any, where: str | None = None) -> Any:
    info = plugin_info(name, where)
    cls = info.require()
    config = validate_config(name, cls, raw_config, where)
    try:
        return cls(name=name, config=config)
    except TypeError as exc:
        raise PluginError(
            f"plugin {name!r}: could not construct {info.source}: {exc}",
            fix="a plugin class must accept `name` and `config` keyword arguments (derive from hf_tokplug.Plugin)",
        ) from None


def plugin_version(name: str) -> str | None:
    info = installed_plugins().get(name)
    return info.version if info else None


# --------------------------------------------------------------------------------------------------------------
# managers
# --------------------------------------------------------------------------------------------------------------


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _check(pm: pluggy.PluginManager) -> None:
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"plugin {exc.plugin!r} implements a hook that does not exist: {exc}",
            fix="check the method name against docs/hooks.md (every hook starts with `tokplug_`)",
        ) from None
    for name, (_, rule, _) in HOOK_RULES.items():
        if rule not in ("chain", "merge", "product"):
            continue
        for impl in getattr(pm.hook, name).get_hookimpls():
            if impl.hookwrapper or impl.wrapper:
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: {name} is a {rule} hook and cannot be a wrapper",
                    fix="drop `wrapper=True`/`hookwrapper=True`; order with tryfirst/trylast instead",
                )


def build_run_manager(plugins: list[Any]) -> pluggy.PluginManager:
    """A manager with the given plugin instances, called in list order (pluggy calls the last registered first)."""
    pm = _new_manager()
    for plugin in reversed(plugins):
        try:
            pm.register(plugin, name=plugin.name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {plugin.name!r} is invalid: {exc}") from None
    _check(pm)
    return pm


@cache
def _setup_manager() -> pluggy.PluginManager:
    """Every installed plugin class, for the setup hooks; called host first, then the others by name (pluggy calls
    the last registered first)."""
    pm = _new_manager()
    plugins = installed_plugins()
    if HOST_ENTRY_POINT not in plugins or plugins[HOST_ENTRY_POINT].cls is None:
        info = plugins.get(HOST_ENTRY_POINT)
        raise PluginError(
            "the host's built-in tasks (entry point 'hf_tokplug' in group 'hf_tokplug') are not installed"
            + (f": {type(info.error).__name__}: {info.error}" if info is not None and info.error else ""),
            fix="reinstall hf_tokplug (pip install -e . in a checkout)",
        )
    order = [n for n in sorted(plugins) if n != HOST_ENTRY_POINT]
    for name in [*reversed(order), HOST_ENTRY_POINT]:
        if plugins[name].cls is None:
            continue
        try:
            pm.register(plugins[name].cls, name=name)
            _check(pm)
        except (PluginError, pluggy.PluginValidationError, ValueError) as exc:
            if name == HOST_ENTRY_POINT:
                raise
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)
            _disable(plugins[name], exc)
    return pm


@dataclass
class Registries:
    runners: dict[str, type]
    token_inits: dict[str, Callable[..., Any]]
    commands: dict[str, tuple[str, Callable, Callable, str]]


def _collector(kind: str, target: dict, owner_of: Callable[[], str]) -> Callable[..., None]:
    def register(name: str, value: Any, *rest: Any) -> None:
        if name in target:
            raise PluginError(f"{kind} {name!r} is registered twice (second time by {owner_of()!r})")
        target[name] = (value, *rest, owner_of()) if rest else value

    return register


@cache
def registries() -> Registries:
    """Runners, token-init strategies and CLI commands registered by the host and every installed plugin."""
    pm = _setup_manager()
    regs = Registries({}, {}, {})
    for hook_name, target, kind in (
        ("tokplug_register_runners", regs.runners, "task"),
        ("tokplug_register_token_inits", regs.token_inits, "token-init strategy"),
        ("tokplug_register_commands", regs.commands, "command"),
    ):
        for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
            try:
                impl.function(_collector(kind, target, lambda impl=impl: impl.plugin_name))
            except Exception as exc:
                info = installed_plugins().get(impl.plugin_name)
                if impl.plugin_name == HOST_ENTRY_POINT or info is None:
                    raise
                _disable(info, PluginError(f"plugin {impl.plugin_name!r} failed in {hook_name}: "
                                           f"{type(exc).__name__}: {exc}"))
    return regs


# --------------------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------------------


class HookCaller:
    """Calls hooks by name with the aggregation rule the spec declares (see :mod:`hf_tokplug.hookspecs`)."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.trace = os.environ.get(TRACE_ENV, "") not in ("", "0")

    def implementers(self, name: str) -> list[str]:
        """Plugin names implementing ``name``, in call order."""
        return [impl.plugin_name for impl in reversed(getattr(self.pm.hook, name).get_hookimpls())]

    @staticmethod
    def _call(name: str, impl: Any, kwargs: dict[str, Any]) -> Any:
        """One implementation; an unexpected exception becomes a PluginError naming the plugin and the hook (errors
        a plugin raises on purpose, TokPlugError and its subclasses, pass unchanged)."""
        try:
            return impl.function(*[kwargs[arg] for arg in impl.argnames])
        except TokPlugError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name!r} failed in {name}: {type(exc).__name__}: {exc}",
                fix="this is a bug in the plugin (or its input): run with --debug for the traceback, or disable the "
                    "plugin",
            ) from exc

    def __call__(self, name: str, **kwargs: Any) -> Any:
        _, rule, chained = HOOK_RULES[name]
        hook = getattr(self.pm.hook, name)
        impls = list(reversed(hook.get_hookimpls()))  # call order
        start = time.perf_counter() if self.trace else 0.0
        if rule == "chain":
            result = kwargs[chained]
            for impl in impls:
                kwargs[chained] = result
                value = self._call(name, impl, kwargs)
                if value is not None:
                    result = value
        elif rule == "merge":
            result = {}
            for impl in impls:
                value = self._call(name, impl, kwargs)
                for key, item in (value or {}).items():
                    result[f"{impl.plugin_name}/{key}"] = item
        elif rule == "product":
            result = None
            for impl in impls:
                value = self._call(name, impl, kwargs)
                if value is not None:
                    result = value if result is None else result * value
        elif any(impl.hookwrapper or impl.wrapper for impl in impls):  # pluggy runs wrappers around the others
            result = hook(**kwargs)
            if rule == "extend":
                result = [item for items in result for item in (items or [])]
        elif rule == "extend":
            result = [item for impl in impls for item in (self._call(name, impl, kwargs) or [])]
        elif rule == "first":
            result = None
            for impl in impls:
                result = self._call(name, impl, kwargs)
                if result is not None:
                    break
        else:  # broadcast
            result = None
            for impl in impls:
                self._call(name, impl, kwargs)
        if self.trace:
            reached = ", ".join(self.implementers(name)) or "-"
            ms = (time.perf_counter() - start) * 1e3
            print(f"[tokplug] {name} ({rule}) -> {reached} [{ms:.2f} ms]", file=sys.stderr)
        return result

    def has(self, name: str) -> bool:
        return bool(getattr(self.pm.hook, name).get_hookimpls())
