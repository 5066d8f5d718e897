"""tools/compare_official.py's flags: what its workers need is checked before they start (a wrong
--official-root, a missing scikit-image, a zero count made each worker fail with a traceback after ~30 s)."""
import importlib.util
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))

import compare_official  # noqa: E402


@pytest.fixture
def official(tmp_path):
    """A stand-in for a checkout of wpy1999/SAT and a deps folder holding scikit-image (only their files)."""
    root, deps = tmp_path / "SAT", tmp_path / "deps"
    (root / "Model").mkdir(parents=True)
    (root / "evaluator.py").write_text("")
    (root / "Model" / "SAT.py").write_text("")
    (deps / "skimage").mkdir(parents=True)
    (deps / "skimage" / "__init__.py").write_text("")
    return root, deps


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare_official.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    return err.strip()


def test_good_flags_parse(official):
    root, deps = official
    args = compare_official.parse_args(["--official-root", str(root), "--official-deps", str(deps), "--rounds", "1"])
    assert (args.rounds, args.steps, args.batch_size) == (1, 2, 32)


def test_home_after_equals_is_the_home_folder(official, monkeypatch):
    """--official-root=~/SAT is read as the shell passes --official-root ~/SAT (as the other tools read it)."""
    root, deps = official
    monkeypatch.setenv("HOME", str(root.parent))
    args = compare_official.parse_args(["--official-root=~/SAT", "--official-deps=~/deps"])
    assert (args.official_root, args.official_deps) == (str(root), str(deps))


def test_a_wrong_official_root_is_one_line(official, tmp_path, capsys):
    _, deps = official
    assert error_of(["--official-root", str(tmp_path / "nope"), "--official-deps", str(deps)], capsys) == \
        f"error: --official-root {tmp_path / 'nope'}: not found (expected a checkout of wpy1999/SAT)"
    assert error_of(["--official-root", str(REPO_ROOT), "--official-deps", str(deps)], capsys) == \
        f"error: --official-root {REPO_ROOT}: has no Model/SAT.py (expected a checkout of wpy1999/SAT)"


def test_missing_scikit_image_is_one_line(official, tmp_path, capsys):
    root, _ = official
    assert error_of(["--official-root", str(root), "--official-deps", str(tmp_path / "nope")], capsys) == \
        f"error: --official-deps {tmp_path / 'nope'}: not a folder"
    if importlib.util.find_spec("skimage") is None:
        assert error_of(["--official-root", str(root), "--official-deps", str(tmp_path)], capsys).startswith(
            f"error: the official evaluator needs scikit-image, not found here nor in --official-deps {tmp_path}")


@pytest.mark.parametrize("flags, message", [
    (["--rounds", "0"], "error: --rounds: expected an integer >= 1, got '0'"),  # (a median of nothing)
    (["--steps", "0"], "error: --steps: expected an integer >= 1, got '0'"),
    (["--batch-size", "x"], "error: --batch-size: expected an integer >= 1, got 'x'"),
    (["--threads", "0"], "error: --threads: expected an integer >= 1, got '0'"),
    (["--arch", "deit_sat_nano_patch16_224"], "error: --arch: invalid choice: 'deit_sat_nano_patch16_224'"),
])
def test_bad_counts_and_archs_are_one_line(official, flags, message, capsys):
    root, deps = official
    assert error_of(["--official-root", str(root), "--official-deps", str(deps), *flags], capsys).startswith(message)


def test_help_describes_both_measurements(capsys):
    """--help gives the docstring's whole first paragraph (its first line alone stopped at 'side by side: the
    training')."""
    with pytest.raises(SystemExit):
        compare_official.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the training step (forward, SAT losses, backward, AdamW step) and evaluation end to end" in text
