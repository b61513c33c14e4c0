"""`qmedsam bench`: a small real run of both subcommands (timings are not asserted, only what they report)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qmedsam.cli import main


def test_bench_cases_runs_every_engine_on_every_model(demo_dir: Path, fp32_model_dir: Path, tmp_path: Path):
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(demo_dir / "cases" / "2D_CT_TotalSeg_0001.npz", cases)
    second = tmp_path / "fp32-copy"
    shutil.copytree(fp32_model_dir, second)
    out = tmp_path / "cases.json"
    argv = ["bench", "cases", "-i", str(cases), "--gt", str(demo_dir / "gts"), "-m", str(fp32_model_dir)]
    argv += ["-m", str(second), "--engines", "openvino:f32", "torch", "--threads", "2", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert [row["config"] for row in rows] == ["openvino:f32@fp32", "torch", "openvino:f32@fp32-copy"]
    for row in rows:
        assert row["seconds"]["2D_CT_TotalSeg_0001.npz"] > 0
        assert row["mean_dsc"] > 0.85  # the fp32 model on this real CT slice: 0.895
    assert rows[0]["mean_dsc"] == rows[2]["mean_dsc"]  # the same IR twice gives the same masks


def test_bench_components_reports_each_model_and_precision(fp32_model_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "components.json"
    argv = ["bench", "components", "-m", str(fp32_model_dir), "--precision", "f32", "bf16", "--repeats", "2"]
    assert main([*argv, "--threads", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [row["config"] for row in rows] == ["openvino:f32@fp32", "openvino:bf16@fp32"]
    keys = ("encoder_ms", "decoder_1_ms", "decoder_16_ms", "decoder_1_box_5_clicks_ms")  # the fp32 IR takes clicks
    assert all(row[key] > 0 for row in rows for key in keys)
    assert "ratio enc/dec16 vs first" in capsys.readouterr().out


def test_bench_process_times_whole_predictors_cold_and_warm(demo_dir: Path, cpp_binary: Path, tmp_path: Path, capsys):
    out = tmp_path / "process.json"
    case = demo_dir / "cases" / "2D_CT_TotalSeg_0001.npz"
    argv = ["bench", "process", "-i", str(case), "-m", "int8", "--cpp", str(cpp_binary), "--repeats", "1"]
    assert main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [row["label"] for row in rows] == ["python-int8", "cpp-int8"] and report["reference"] == "python-int8"
    assert all(row["cold_s"] > 0 and row["warm_s"] > 0 for row in rows) and rows[0]["warm_ratio"] == 1.0
    assert set(report["machine"]["flags"]) >= {"avx512_vnni", "amx_int8", "avx512_bf16"}
    assert "cold ratio" in capsys.readouterr().out


def test_bench_components_defaults_to_the_shipped_int8_model_like_predict(tmp_path: Path):
    out = tmp_path / "components.json"
    assert main(["bench", "components", "--precision", "f32", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(row["config"], row["ir_precision"]) for row in rows] == [("openvino:f32@int8", "int8")]
