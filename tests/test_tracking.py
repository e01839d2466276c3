"""--report_to, metrics.jsonl, VisualDL records, wandb checks."""
import json
import os

import pytest
from PIL import Image

import train_pcm_lora_sd3_adv as trainer
from tracking import Trackers, resolve_trackers
from validation import image_grid


@pytest.mark.parametrize("value,expected", [
    ("wandb", ["wandb"]), ("visualdl", ["visualdl"]), ("tensorboard", ["visualdl"]),
    ("all", ["visualdl", "wandb"]), ("none", []), ("wandb,tensorboard", ["visualdl", "wandb"]),
])
def test_report_to_mapping(value, expected):
    assert resolve_trackers(value) == expected


def test_unknown_tracker_is_an_error():
    with pytest.raises(ValueError, match="--report_to"):
        resolve_trackers("comet_ml")


def test_metrics_jsonl_and_visualdl_records(tmp_path):
    trackers = Trackers("tensorboard", str(tmp_path), "project", {"lr": 1e-4})
    trackers.log({"d_loss": 2.5, "lr": 1e-4}, step=1)
    trackers.log({"loss_cm": 0.1, "g_loss": 0.2, "lr": 1e-4}, step=2)
    trackers.log_images("validation", [Image.new("RGB", (8, 8), "red")], ["0: a red dog"], step=2)
    trackers.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "d_loss": 2.5, "lr": 1e-4}, {"step": 2, "loss_cm": 0.1, "g_loss": 0.2, "lr": 1e-4}]
    records = os.listdir(tmp_path / "visualdl")
    assert records and all(os.path.getsize(tmp_path / "visualdl" / r) > 0 for r in records)


def test_image_grid_layout():
    red, blue = Image.new("RGB", (4, 3), "red"), Image.new("RGB", (4, 3), "blue")
    grid = image_grid([[red, blue], [blue, red]])
    assert grid.size == (8, 6)
    assert grid.getpixel((0, 0)) == (255, 0, 0) and grid.getpixel((4, 0)) == (0, 0, 255)
    assert grid.getpixel((0, 3)) == (0, 0, 255)


def _main_error(argv, capsys):
    code = trainer.main(argv)
    return code, capsys.readouterr().err.strip()


def test_wandb_without_credentials_fails_before_loading(tiny_sd3, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    code, err = _main_error(["--pretrained_teacher_model", tiny_sd3, "--data_path", str(tmp_path), "--report_to", "wandb"], capsys)
    assert code == 2 and "--report_to wandb" in err and "WANDB_MODE=offline" in err


def test_hub_token_with_wandb_is_refused(tiny_sd3, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, err = _main_error(["--pretrained_teacher_model", tiny_sd3, "--data_path", str(tmp_path),
                             "--report_to", "wandb", "--hub_token", "secret-value"], capsys)
    assert code == 2 and "--hub_token" in err and "secret-value" not in err


def test_recordable_args_redact_secret_flags_and_environment_values():
    from tracking import REDACTED, recordable_args

    args = trainer.parse_args(["--pretrained_teacher_model", "m", "--data_path", "d", "--hub_token", "hf_flagsecret1",
                               "--tracker_project_name", "run-of-envsecret42", "--validation_prompt", "x envsecret42"])
    recorded = recordable_args(args, environ={"HF_TOKEN": "envsecret42", "WANDB_API_KEY": "wandbkey99",
                                              "SHORT_TOKEN": "1", "HOME": "/root"})
    assert recorded["hub_token"] == REDACTED and recorded["hub_model_id"] is None
    assert recorded["tracker_project_name"] == f"run-of-{REDACTED}" and recorded["validation_prompt"] == [f"x {REDACTED}"]
    assert recorded["lora_rank"] == args.lora_rank and recorded["pretrained_teacher_model"] == "m"
    assert "hf_flagsecret1" not in json.dumps(recorded) and "envsecret42" not in json.dumps(recorded)
