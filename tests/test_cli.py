"""cli.py, the option parser of every script: typed values, bools, choices, help texts read from the
dataclass's comments, and one-line errors that say what to do."""
from dataclasses import dataclass
from typing import Literal

import pytest

from cli import UserError, option_pairs, parse_options, parse_value
from conftest import assert_one_line_error, run


@dataclass
class Options:
    name: str = "gpt"            # which model
    steps: int = 20              # timed steps
    # numbers
    lr: float = 1e-3             # learning rate, continued
                                 # on the next line
    flag: bool = False
    compile: Literal["auto", True, False] = "auto"  # auto: on CUDA only
    dtype: Literal["auto", "float32"] = "auto"


@dataclass
class Other:
    n_layer: int = 4             # blocks
    steps: int = 1               # shadowed by Options.steps


def test_values_are_typed_from_the_fields():
    [opts] = parse_options(["--name=mod", "--steps=5e3", "--lr=2e-4", "--flag=True", "--dtype=float32"], Options())
    assert opts == Options(name="mod", steps=5000, lr=2e-4, flag=True, dtype="float32")
    assert Options() == Options()  # the defaults passed in are copied, not changed
    [opts] = parse_options([], Options())
    assert opts == Options()


@pytest.mark.parametrize("text,value", [("True", True), ("true", True), ("1", True),
                                        ("False", False), ("0", False)])
def test_bools_take_true_false_1_0(text, value):
    assert parse_value("flag", text, bool) is value


def test_compile_is_a_strict_tristate():
    assert [parse_value("compile", t, Options.__annotations__["compile"]) for t in ("auto", "True", "0")] == \
        ["auto", True, False]
    for text in ("yes", "Auto", ""):
        with pytest.raises(UserError, match=f"--compile={text}: choose one of auto, True, False"):
            parse_value("compile", text, Options.__annotations__["compile"])


def test_bad_values_say_the_expected_type():
    for argv, message in ((["--steps=many"], "--steps=many: expected int, a whole number such as 20 or 5e9"),
                          (["--steps=2.5"], "--steps=2.5: expected int"),
                          (["--lr=fast"], "--lr=fast: expected float, a number such as 0.1"),
                          (["--flag=yes"], "--flag=yes: expected bool, True or False (or 1 or 0)"),
                          (["--dtype=int8"], "--dtype=int8: choose one of auto, float32")):
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_options(argv, Options())


def test_unknown_and_malformed_options_list_what_works():
    with pytest.raises(UserError, match="unknown option --colour=red; the options are --name, --steps, --lr, "
                                        "--flag, --compile, --dtype, --n_layer, --steps$"):
        parse_options(["--colour=red"], Options(), Other())
    for arg in ("steps=3", "--steps", "-s=3", "--=3"):
        with pytest.raises(UserError, match="options are written --key=value"):
            option_pairs([arg])


def test_several_configs_and_the_rest():
    opts, other = parse_options(["--steps=3", "--n_layer=2"], Options(), Other())
    assert (opts.steps, other.n_layer, other.steps) == (3, 2, 1)  # a key goes to the first config that has it
    opts, rest = parse_options(["--steps=3", "--is_moe=True"], Options(), rest=True)
    assert opts.steps == 3 and rest == ["--is_moe=True"]


def test_help_shows_defaults_and_the_fields_comments(capsys):
    with pytest.raises(SystemExit) as e:
        parse_options(["--help"], Options(), Other(), doc="Usage text.", titles=("main", "more"))
    assert e.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "Usage text." and "main:" in lines and "more:" in lines
    assert "--name=gpt" in out and "which model" in out
    assert "  # numbers" in lines  # a comment on its own line heads the fields below it
    assert any(ln.startswith("  --lr=0.001") and ln.endswith("learning rate, continued on the next line")
               for ln in lines)
    assert any("--compile=auto" in ln and "one of auto, True, False; auto: on CUDA only" in ln for ln in lines)
    assert any(ln.strip() == "--flag=False" for ln in lines)  # no comment, no help text


@pytest.mark.parametrize("script,args,comment", [("sample.py", [], "the prompt, or FILE:path"),
                                                 ("bench.py", [], "timed steps"),
                                                 ("bench_originals.py", [], "timed steps of each, alternating"),
                                                 ("visualize.py", [], "output file; default out_dir/visualize.html"),
                                                 ("prepare_data.py", ["c4"], "tokenizing processes; 0: all cores")])
def test_every_script_uses_it(script, args, comment):
    r = run(script, "--help")
    assert r.returncode == 0 and r.stdout.count("\n  --") >= 5 and comment in r.stdout
    assert_one_line_error(run(script, *args, "--colour=red"), script,
                          "--colour=red is neither a bench.py option" if script == "bench.py" else
                          "unknown option --colour=red; the options are --")
