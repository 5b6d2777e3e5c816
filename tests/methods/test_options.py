"""Typed method options (methods/options.py): one declaration per method gives the defaults,
the validation, the quantize flags and compare's METHOD:KEY=VALUE parsing."""

import pytest

from anybit.cli import _config_from_args, _method_flags, build_parser
from anybit.compare import Cell, check_cell
from anybit.config import QuantConfig
from anybit.errors import AnybitError
from anybit.methods import METHODS
from anybit.methods.options import Options


@pytest.mark.parametrize("name", sorted(METHODS))
def test_defaults_round_trip(name):
    cls = METHODS[name].options_cls
    assert issubclass(cls, Options)
    defaults = cls.parse({}, name)
    assert cls.parse(defaults.to_dict(), name) == defaults
    keys = [i.key for i in cls.describe()]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unknown_key_is_an_error(name):
    with pytest.raises(AnybitError, match=f"method {name} has no option 'no_such_knob'"):
        METHODS[name].options_cls.parse({"no_such_knob": 1}, name)


def test_coercion_and_checks():
    gptq = METHODS["gptq"].options_cls
    assert gptq.parse({"true_sequential": "false", "blocksize": "64", "damp_percent": "0.05"}, "gptq") == \
        gptq(true_sequential=False, blocksize=64, damp_percent=0.05)
    for raw, needle in [({"blocksize": 1.5}, "must be an integer"), ({"true_sequential": "maybe"}, "true or false"),
                        ({"order": "random"}, "must be one of none, act, gar"),
                        ({"damp_percent": 2}, "damp_percent (--damp-percent) must be between 0 and 1"),
                        ({"blocksize": True}, "must be an integer")]:
        with pytest.raises(AnybitError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            gptq.parse(raw, "gptq")
    # order=none is the natural order, not "unset": act_order does not override it
    assert gptq.parse({"order": "none", "act_order": True}, "gptq").order == "none"
    cfg = QuantConfig(method="gptq", options={"order": "none", "act_order": True})
    assert METHODS["gptq"].gptq_options(cfg)["order"] == "none"
    pot = METHODS["potptq"].options_cls.parse({"lambda": 0.5, "epochs": None}, "potptq")
    assert pot.lam == 0.5 and pot.epochs is None and pot.to_dict()["lambda"] == 0.5
    flex = METHODS["flexq"].options_cls
    with pytest.raises(AnybitError, match="regex"):
        flex.parse({"a8": "down_proj("}, "flexq")


def _cfg(argv):
    return _config_from_args(build_parser().parse_args(["quantize", "stories260k", *argv]))


def test_flags_and_option_give_the_same_config():
    assert _cfg(["--method", "gptq", "--damp-percent", "0.05", "--no-true-sequential"]).options == \
        _cfg(["--method", "gptq", "--option", "damp_percent=0.05", "--option", "true_sequential=false"]).options
    assert _cfg(["--method", "potptq", "--lambda", "0.2", "--epochs", "3"]).options == {"lambda": 0.2, "epochs": 3}
    # a flag of another method is refused before anything is loaded
    with pytest.raises(AnybitError, match="method gptq has no option 'epochs'"):
        _cfg(["--method", "gptq", "--epochs", "3"])


def test_every_declared_flag_is_a_quantize_flag():
    text = build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()
    flags = {i.flag for m in METHODS.values() for i in m.options_cls.describe() if i.flag}
    assert flags and all(f in text for f in flags)
    assert set(_method_flags().values()) == {i.key for m in METHODS.values() for i in m.options_cls.describe()
                                             if i.flag}
    for name in METHODS:  # the epilog lists every method's options
        assert f"  {name}: " in text


def test_compare_cells_are_validated_by_the_same_options():
    assert check_cell(Cell("gptq:order=gar:damp_percent=0.05", "W4A16G128")) is None
    assert "has no option 'epoch'" in check_cell(Cell("potptq:epoch=3", "W3A16G128"))
    assert "must be one of" in check_cell(Cell("gptq:order=sideways", "W4A16G128"))


def test_python_api_refuses_unknown_options():
    import anybit

    from conftest import tiny_model

    with pytest.raises(AnybitError, match="method rtn has no option 'clip'"):
        anybit.quantize(tiny_model("llama"), anybit.QuantConfig(method="rtn", options={"clip": True}), progress=False)
