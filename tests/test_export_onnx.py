"""tools/export_onnx.py: the exported file gives the official model's logits and maps under onnxruntime."""
import json
import os
import stat

import pytest
import torch

from Model import build_model_from_checkpoint, model_spec
from tools.export_onnx import TESTED_TORCH, main
from utils.checkpoint import save_checkpoint
from utils.errors import run_cli

from conftest import OFFICIAL_ARCH, OFFICIAL_CKPT, OFFICIAL_MODEL_KWARGS

pytest.importorskip("onnxscript", reason="the ONNX exporter needs onnx + onnxscript (requirements-dev.txt)")
ort = pytest.importorskip("onnxruntime", reason="checking the export needs onnxruntime (requirements-dev.txt)")


def test_export_of_official_weights_gives_official_outputs(tmp_path, capsys, official_outputs):
    # the official weights, saved as this project's checkpoint (which records embed_dim=48 for rebuilding)
    model, _ = build_model_from_checkpoint(OFFICIAL_CKPT, arch=OFFICIAL_ARCH, **OFFICIAL_MODEL_KWARGS)
    checkpoint = tmp_path / "best.pth"
    save_checkpoint(dict(model_spec(model, OFFICIAL_ARCH, **OFFICIAL_MODEL_KWARGS), model=model.state_dict()),
                    checkpoint)
    output = tmp_path / "onnx" / "sat.onnx"
    main(["--checkpoint", str(checkpoint), "--output", str(output)])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["inputs"] == {"images": ["batch", 3, 224, 224]}
    assert record["outputs"] == {"logits": ["batch", 10], "maps": ["batch", 14, 14]}
    assert max(record["onnxruntime_max_abs_diff"].values()) < 1e-5  # the tool's own check
    assert [p.name for p in output.parent.iterdir()] == ["sat.onnx"]  # one file, no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(output.stat().st_mode) == 0o666 & ~umask  # as any file written with open()
    assert record["opset"] >= 18

    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits", "maps"]
    images = official_outputs["input"]
    logits, maps = session.run(None, {"images": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), official_outputs["logits_test"], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(maps), official_outputs["maps_test"], atol=1e-5, rtol=0)
    _, maps = session.run(None, {"images": images[1:].numpy()})  # another batch size
    torch.testing.assert_close(torch.from_numpy(maps), official_outputs["maps_test"][1:], atol=1e-5, rtol=0)


def test_bad_output_and_values_are_one_line(tmp_path, capsys):
    ONNX = tmp_path / "earlier.onnx"
    ONNX.write_bytes(b"an earlier export")  # replaced only with --overwrite (test below)
    for flags, message in ((["--output", str(tmp_path)], f"--output {tmp_path}: a folder; expected the path of the "
                                                         ".onnx file to write"),
                           (["--output", "x.onnx", "--atol", "-1"], "--atol: expected a number >= 0, got '-1'"),
                           (["--output", str(OFFICIAL_CKPT)], f"--output {OFFICIAL_CKPT}: an existing file that "
                                                              "is not an .onnx file (never replaced); choose another "
                                                              "path"),
                           (["--output", str(ONNX)], f"--output {ONNX}: holds an earlier export: --overwrite to "
                                                     "replace it, or choose another path")):
        with pytest.raises(SystemExit):
            run_cli(main, ["--checkpoint", str(OFFICIAL_CKPT), *flags])
        assert capsys.readouterr().err == f"error: {message}\n"


def test_an_opset_the_exporter_cannot_write_is_one_line(tmp_path, capsys, caplog):
    """--opset 14: the exporter writes 18 (after onnxscript's failed conversion, whose traceback it logged):
    refused in one line, no traceback, nothing written."""
    from test_evaluation import save_nano_checkpoint
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "x.onnx"), "--opset", "14"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert not [record for record in caplog.records if record.name.startswith("onnxscript")]  # its traceback
    assert err.endswith(f"error: {tmp_path / 'x.onnx'}: the exporter wrote opset 18, not the --opset 14 asked "
                        "for; not written\n") and not (tmp_path / "x.onnx").exists()


@pytest.mark.usefixtures("sigterm_not_handled_fails")
@pytest.mark.parametrize("stop, status", [("SIGTERM", 143), ("Ctrl-C", 130)])
def test_a_stopped_export_leaves_nothing_and_says_so(tmp_path, monkeypatch, caplog, stop, status):
    """SIGTERM or Ctrl-C while the temporary file is written: no temporary file left (SIGTERM left an empty one),
    one line (Ctrl-C gave a traceback), the status of a stopped process. (The export is a stand-in that writes
    part of a file: the real one takes seconds.)"""
    import signal
    import tools.export_onnx as export
    from test_evaluation import save_nano_checkpoint
    checkpoint, output = save_nano_checkpoint(tmp_path / "nano.pth"), tmp_path / "onnx" / "x.onnx"

    def stopped(model, path, opset_version=None):
        with open(path, "wb") as file:
            file.write(b"half")
        if stop == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_onnx", stopped)
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(checkpoint), "--output", str(output)])
    assert exit_info.value.code == status and list(output.parent.iterdir()) == []
    assert f"stopped: {output} not written; {'stopped by SIGTERM' if stop == 'SIGTERM' else 'interrupted'}" \
        in caplog.text


def test_nan_outputs_fail_the_check_and_write_nothing(tmp_path, monkeypatch, capsys):
    """|ONNX - PyTorch| is NaN where the model outputs NaN (weights that overflow): NaN > --atol is False, so the
    export was written and its JSON line held "logits": NaN (refused by strict JSON parsers)."""
    import tools.export_onnx as export
    from test_evaluation import save_nano_checkpoint
    checkpoint, output = save_nano_checkpoint(tmp_path / "nano.pth"), tmp_path / "x.onnx"

    def stand_in(model, path, opset_version=None):  # (the real export takes seconds)
        with open(path, "wb") as file:
            file.write(b"onnx")

    monkeypatch.setattr(export, "export_onnx", stand_in)
    monkeypatch.setattr(export, "written_opset", lambda path: 18)
    monkeypatch.setattr(export, "onnxruntime_max_abs_diff", lambda model, path: {"logits": float("nan"),
                                                                                 "maps": 1e-7})
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--checkpoint", str(checkpoint), "--output", str(output)])
    assert exit_info.value.code != 0 and capsys.readouterr().err == (
        f"error: {output}: the model outputs NaN/Inf logits on the check batch (a checkpoint whose weights "
        "overflow?); not written\n")
    assert sorted(tmp_path.iterdir()) == [checkpoint]


def test_a_full_disk_or_a_folder_that_cannot_be_made_is_one_line(tmp_path, monkeypatch, capsys):
    """A full disk while the file is written, an --output under a file: one line naming the file (tracebacks
    ending in OSError), the earlier .onnx left as it was."""
    import errno
    import tools.export_onnx as export
    from test_evaluation import save_nano_checkpoint
    checkpoint, output = save_nano_checkpoint(tmp_path / "nano.pth"), tmp_path / "x.onnx"
    output.write_bytes(b"an earlier export")

    def full(model, path, opset_version=None):
        with open(path, "wb") as file:
            file.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "export_onnx", full)
    with pytest.raises(SystemExit):
        run_cli(main, ["--checkpoint", str(checkpoint), "--output", str(output), "--overwrite"])
    assert capsys.readouterr().err == f"error: could not write {output}: no space left on the device\n"
    assert output.read_bytes() == b"an earlier export" and sorted(tmp_path.iterdir()) == [checkpoint, output]
    with pytest.raises(SystemExit):
        run_cli(main, ["--checkpoint", str(checkpoint), "--output", str(checkpoint / "x.onnx")])
    assert capsys.readouterr().err == f"error: --output {checkpoint / 'x.onnx'}: a parent of it is a file, not a " \
        "folder\n"


def test_a_failing_exporter_is_one_line_naming_the_torch_version(tmp_path, capsys, monkeypatch):
    """The exporter's own failure (as torch 2.9's on official files) is one line with torch's version and the
    oldest torch tested, not the exporter's page of traceback; nothing is written."""
    def failing_export(*args, **kwargs):
        raise RuntimeError("Failed to export the model with torch.export.\n- Modify the model code ...")

    from test_evaluation import save_nano_checkpoint
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")
    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "x.onnx")])
    assert exit_info.value.code == 2 and sorted(tmp_path.iterdir()) == [checkpoint]
    assert capsys.readouterr().err == (f"error: torch.onnx.export failed with torch {torch.__version__} (RuntimeError: "
                                       "Failed to export the model with torch.export.); the export is tested with "
                                       f"torch >= {TESTED_TORCH}\n")


def test_the_exporter_s_own_full_disk_names_the_output_not_the_torch_version(tmp_path, monkeypatch):
    """torch.onnx.export on a full disk raises OSError: it was taken for the exporter's failure ("torch.onnx.export
    failed with torch 2.x (OSError: [Errno 28] ...); the export is tested with torch >= ..."), naming no file."""
    import errno
    import tools.export_onnx as export
    from test_evaluation import nano_model

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", full)
    with pytest.raises(OSError) as info:  # main's writing_outputs: "could not write <output>: no space left ..."
        export.export_onnx(nano_model(3, 64), tmp_path / "x.onnx")
    assert info.value.errno == errno.ENOSPC
