"""Weights from outside are loaded without executing pickled code."""

from __future__ import annotations

import pytest
import torch

from lesion_kd.methods import SemiKDModule, load_student


class Payload:
    """Unpickling this would run code (writes a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_a_code_running_pickle_is_refused(tmp_path):
    m = SemiKDModule(network="unet", network_kwargs={"channels": [4, 8, 16, 32, 64]})
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams), "x": Payload(str(marker))}, path)
    with pytest.raises(ValueError, match=r"evil\.ckpt: refused"):
        load_student(str(path))
    assert not marker.exists()


def test_plain_checkpoint_loads(tmp_path):
    m = SemiKDModule(network="unet", network_kwargs={"channels": [4, 8, 16, 32, 64]})
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, path)
    assert type(load_student(str(path))).__name__ == "UNet"
