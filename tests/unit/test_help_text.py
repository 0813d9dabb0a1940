"""Help text of every command line: each flag says what it does and shows its default, a flag is real or listed
as having no effect (never both), and every flag a help line points to exists."""

import argparse
import re
from pathlib import Path

import pytest

from mindspeed_mm_osp.inference.arguments import build_parser as inference_parser
from mindspeed_mm_osp.tools.plan import build_parser as planner_parser
from mindspeed_mm_osp.training.arguments import NO_OP_FLAGS, HelpFormatter
from mindspeed_mm_osp.training.arguments import build_parser as training_parser

PARSERS = {"pretrain.py": training_parser, "inference.py": inference_parser, "plan": planner_parser}
HIDDEN = {"--inject-nonfinite-grad"}  # fault injection for the reliability tests, not a user flag
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*[a-zA-Z0-9]")
PACKAGE = Path(__file__).resolve().parents[2] / "mindspeed_mm_osp"


def _flags(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def help_problems(parser, known):
    """Each rule broken by `parser`, one line per flag; `known`: every flag of every command line."""
    problems = []
    for action in _flags(parser):
        flag = action.option_strings[0]
        if action.help in (None, "", argparse.SUPPRESS):
            if flag not in HIDDEN:
                problems.append(f"{flag}: no help line")
            continue
        shown = parser._get_formatter()._get_help_string(action)
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in shown.lower():
            problems.append(f"{flag}: default {action.default!r} not shown")
        problems += [f"{flag}: help points to {name}, which no command line has"
                     for name in FLAG.findall(action.help) if name not in known]
    problems += [f"description points to {name}" for name in FLAG.findall(parser.description or "")
                 if name not in known]
    return problems


@pytest.fixture(scope="module")
def known():
    return {opt for build in PARSERS.values() for a in build()._actions for opt in a.option_strings}


@pytest.mark.parametrize("name", PARSERS)
def test_every_flag_has_help_a_shown_default_and_existing_pointers(name, known):
    parser = PARSERS[name]()
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    assert help_problems(parser, known) == []


def test_the_rules_catch_a_planted_flag_of_each_kind(known):
    parser = argparse.ArgumentParser(prog="planted")
    parser.add_argument("--silent", type=int, default=3)
    parser.add_argument("--quiet-default", type=int, default=3, help="what it does")
    parser.add_argument("--pointer", help="use --profile instead")
    assert help_problems(parser, known) == ["--silent: no help line", "--quiet-default: default 3 not shown",
                                            "--pointer: help points to --profile, which no command line has"]
    parser.formatter_class = HelpFormatter
    assert help_problems(parser, known)[1:] == ["--pointer: help points to --profile, which no command line has"]
    assert "what it does (default: 3)" in parser.format_help()


def test_each_flag_is_real_or_listed_as_no_effect_never_both():
    parser = training_parser()
    said = {a.option_strings[0] for a in _flags(parser) if (a.help or "").startswith("no effect")}
    assert said == set(NO_OP_FLAGS)
    sources = [p.read_text() for p in PACKAGE.rglob("*.py") if p.name not in ("arguments.py", "args.py")]
    for action in _flags(parser):
        if action.option_strings[0] in NO_OP_FLAGS:  # nothing reads what a no-op flag sets
            read = re.compile(rf"\bargs\.{action.dest}\b")
            assert not any(read.search(text) for text in sources), action.option_strings[0]


@pytest.mark.parametrize("flag", ["--lr-warmup-init", "--distributed-backend", "--use-dist-ckpt", "--mm-tool"])
def test_flags_once_listed_both_ways_are_now_one_or_the_other(flag):
    help_line = next(a.help for a in _flags(training_parser()) if flag in a.option_strings)
    assert (flag in NO_OP_FLAGS) == help_line.startswith("no effect") and "--profile" not in help_line


def test_planner_help_shows_its_own_flags_first():
    text = planner_parser().format_help()
    groups = re.findall(r"^(\S[^\n]*):\n", text, flags=re.MULTILINE)
    assert groups[1].startswith("planner") and text.index("--device-memory-gib") < text.index("--mm-data MM_DATA")
    assert len(text.split("\n\n")[0].splitlines()) == 1  # the usage line does not list the training flags
