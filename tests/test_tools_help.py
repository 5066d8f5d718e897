"""The tools' --help as a user reads it: every flag says what it does, and the description shows an example."""
import argparse
import importlib

import pytest

TOOLS = ("benchmark", "check_dataset", "compare", "compare_official", "export_onnx", "figure1", "gpu_table",
         "make_baseline_maps", "make_benchmark_data", "make_demo_data", "make_figures", "predict")


def help_of(tool, monkeypatch, capsys):
    """(the parser, the text) of ``python tools/<tool>.py --help``, run in this process."""
    parsers = []
    print_help = argparse.ArgumentParser.print_help

    def record(parser, file=None):
        parsers.append(parser)
        print_help(parser, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", record)
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"tools.{tool}").main(["--help"])
    assert exit_info.value.code == 0 and len(parsers) == 1
    return parsers[0], capsys.readouterr().out


@pytest.mark.parametrize("tool", TOOLS)
def test_every_flag_of_a_tool_says_what_it_does(tool, monkeypatch, capsys):
    parser, _ = help_of(tool, monkeypatch, capsys)
    bare = [action.option_strings[0] if action.option_strings else action.dest for action in parser._actions
            if not action.help and not isinstance(action, argparse._SubParsersAction)]
    assert not bare, f"tools/{tool}.py: no help for {bare}"


@pytest.mark.parametrize("tool", TOOLS)
def test_a_tools_description_shows_an_example_command(tool, monkeypatch, capsys):
    _, text = help_of(tool, monkeypatch, capsys)
    assert f"tools/{tool}.py " in text.split("options:")[0], text


def test_make_figures_says_its_default_output_is_the_readmes_figures(monkeypatch, capsys):
    _, text = help_of("make_figures", monkeypatch, capsys)
    assert "default: the README's own figures" in " ".join(text.split())
