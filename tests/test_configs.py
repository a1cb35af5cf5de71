"""Configs: typed `:arg` parsing, locked fields, variants."""

import subprocess
import sys

import pytest

from configs import common
from configs.yolov5 import get_config
from conftest import ROOT


def test_parse_arg_types_and_unknown_keys():
    a = common.parse_arg("variant=m,smoke,n=3", variant="s", smoke=False, n=1)
    assert (a.variant, a.smoke, a.n) == ("m", True, 3)
    with pytest.raises(ValueError, match="unknown config argument 'varaint'"):
        common.parse_arg("varaint=m", variant="s")
    with pytest.raises(ValueError, match="not a bool"):
        common.parse_arg("smoke=maybe", smoke=False)


def test_yolov5_config_defaults_and_variants():
    c = get_config()
    assert (c.model.variant, c.data.name, c.data.image_size) == ("n", "shapes", 128)
    assert c.hyp.momentum == 0.937 and c.hyp.anchor_t == 4.0 and c.nbs >= c.batch_size
    coco = get_config("variant=x,data=coco")
    assert (coco.model.variant, coco.data.image_size, coco.num_epochs) == ("x", 640, 300)
    smoke = get_config("smoke")
    assert smoke.total_steps > 0 and smoke.model.variant == "tiny"


def test_typo_in_a_config_field_is_an_error_on_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "launch.py", "--config=configs/yolov5.py:smoke",
                        f"--workdir={tmp_path}", "--config.batch_sise=4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "batch_sise" in r.stderr
    r = subprocess.run([sys.executable, "launch.py", "--config=configs/yolov5.py:varient=s",
                        f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "unknown config argument 'varient'" in r.stderr
