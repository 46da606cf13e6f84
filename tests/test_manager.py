"""Plugin discovery and hook dispatch: allow-list, errors, aggregation rules, order, tracing."""

from __future__ import annotations

import pytest

import hf_tokplug
from hf_tokplug import Plugin, PluginConfig, PluginError, hookimpl, manager
from hf_tokplug.lifecycle import Run as RunContext


class OrderConfig(PluginConfig):
    tag: str = "x"


class OrderPlugin(Plugin):
    config_class = OrderConfig

    @hookimpl
    def tokplug_prepare_dataset(self, ctx, dataset, split):
        return dataset + [self.config.tag]

    @hookimpl
    def tokplug_evaluate(self, ctx):
        return {"tag": self.config.tag}

    @hookimpl
    def tokplug_callbacks(self, ctx):
        return [self.config.tag]

    @hookimpl
    def tokplug_load_model(self, ctx):
        return f"model-from-{self.config.tag}"


class FirstPlugin(Plugin):
    @hookimpl(tryfirst=True)
    def tokplug_prepare_dataset(self, ctx, dataset):  # a subset of the spec's arguments is allowed
        return dataset + ["first"]


@pytest.fixture
def registered():
    with manager.registered("order_a", OrderPlugin), manager.registered("order_b", OrderPlugin), \
            manager.registered("first", FirstPlugin):
        yield


def test_rules_and_recipe_order(registered):
    ctx = RunContext.create({"order_a": {"tag": "a"}, "order_b": {"tag": "b"}})
    assert ctx.prepare_dataset([], "train") == ["a", "b"]  # chain, recipe order
    assert ctx.call("tokplug_evaluate") == {"order_a/tag": "a", "order_b/tag": "b"}  # merge, namespaced
    assert ctx.call("tokplug_callbacks") == ["a", "b"]  # extend
    assert ctx.call("tokplug_load_model") == "model-from-a"  # first result
    ctx = RunContext.create({"order_b": {"tag": "b"}, "order_a": {"tag": "a"}})
    assert ctx.prepare_dataset([], "train") == ["b", "a"]


def test_tryfirst_overrides_recipe_order(registered):
    ctx = RunContext.create({"order_a": {"tag": "a"}, "first": None})
    assert ctx.prepare_dataset([], "train") == ["first", "a"]


def test_plugins_not_in_recipe_do_nothing(registered):
    ctx = RunContext.create({})
    assert ctx.prepare_dataset(["d"], "train") == ["d"]
    assert ctx.call("tokplug_load_model") is None


def test_unknown_plugin_names_installed_ones(registered):
    with pytest.raises(PluginError, match="unknown plugin 'nope'.*order_a"):
        RunContext.create({"nope": {}}, where="r.yaml")


def test_plugin_config_error_names_key(registered):
    with pytest.raises(PluginError) as err:
        RunContext.create({"order_a": {"tga": "a"}}, where="r.yaml")
    assert "r.yaml: plugins.order_a" in str(err.value) and "tga" in str(err.value) and "tag" in str(err.value)


def test_options_for_plugin_without_config(registered):
    with pytest.raises(PluginError, match="takes no options"):
        RunContext.create({"first": {"x": 1}})


def test_import_error_is_reported_when_used():
    info = manager.PluginInfo("broken", "pkg.mod:Cls", "pkg", "1.0", None, ImportError("No module named 'pkg'"))
    manager._RUNTIME["broken"] = info
    try:
        with pytest.raises(PluginError, match="failed to import: ImportError: No module named 'pkg'"):
            RunContext.create({"broken": {}})
    finally:
        manager.unregister_plugin("broken")


def test_misspelled_hook_fails_check_pending():
    class Typo(Plugin):
        @hookimpl
        def tokplug_prepare_modle(self, ctx, model):
            return model

    with manager.registered("typo", Typo):
        with pytest.raises(PluginError, match="does not exist"):
            RunContext.create({"typo": None})


def test_chain_hook_cannot_be_wrapper():
    class Wrapper(Plugin):
        @hookimpl(wrapper=True)
        def tokplug_prepare_model(self, ctx, model):
            return (yield)

    with manager.registered("wrapper", Wrapper):
        with pytest.raises(PluginError, match="cannot be a wrapper"):
            RunContext.create({"wrapper": None})


def test_allow_list_filters_entry_points(monkeypatch):
    monkeypatch.setenv(manager.LOAD_ENV, "")
    assert "zloss" not in manager.installed_plugins()
    monkeypatch.setenv(manager.LOAD_ENV, "zloss")
    assert "zloss" in manager.installed_plugins()
    monkeypatch.setenv(manager.LOAD_ENV, "")
    with pytest.raises(PluginError, match="HF_TOKPLUG_LOAD_PLUGINS"):
        RunContext.create({"zloss": {}})


def test_trace_prints_every_hook_call(registered, monkeypatch, capsys):
    monkeypatch.setenv(manager.TRACE_ENV, "1")
    ctx = RunContext.create({"order_a": {"tag": "a"}})
    ctx.prepare_dataset([], "train")
    ctx.call("tokplug_validate")
    err = capsys.readouterr().err
    assert "[tokplug] tokplug_prepare_dataset (chain) -> order_a" in err
    assert "[tokplug] tokplug_validate (broadcast) -> -" in err


def test_register_conflicts_are_errors():
    class Dup(Plugin):
        @staticmethod
        @hookimpl
        def tokplug_register_token_inits(register):
            register("mean", lambda request: None)

    with manager.registered("dup", Dup):
        # the second registration is a broken plugin: skipped with a warning, and only runs enabling it fail
        with pytest.warns(UserWarning, match="token-init strategy 'mean' is registered twice"):
            regs = manager.registries()
        assert regs.token_inits["mean"] is not None  # the host's own strategy is kept
        with pytest.raises(PluginError, match="registered twice"):
            manager.instantiate("dup", {})


def test_public_api_exports():
    for name in hf_tokplug.__all__:
        assert getattr(hf_tokplug, name) is not None



class Broken(Plugin):
    @hookimpl
    def tokplug_evaluate(self, ctx):
        raise ZeroDivisionError("boom")

    @hookimpl
    def tokplug_validate(self, ctx):
        raise PluginError("a deliberate, clear error", where="plugins.broken")


def test_an_unexpected_exception_names_the_plugin_and_the_hook():
    with manager.registered("broken", Broken):
        ctx = RunContext.create({"broken": None})
        with pytest.raises(PluginError, match="plugin 'broken' failed in tokplug_evaluate: ZeroDivisionError: boom") as err:
            ctx.call("tokplug_evaluate")
        assert isinstance(err.value.__cause__, ZeroDivisionError)
        with pytest.raises(PluginError, match="^plugins.broken: a deliberate, clear error"):  # passed unchanged
            ctx.call("tokplug_validate")
