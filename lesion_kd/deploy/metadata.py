"""What an exported student carries about itself (no heavy imports: read by the torch-free segment path).

ONNX files hold it in ``metadata_props`` (string key/value pairs); TorchScript files in an extra file
``lesion_kd.json`` inside the archive (``torch.jit.load(..., _extra_files={"lesion_kd.json": ""})``).
"""

from __future__ import annotations

# The contract of every exported student, also written into each file.
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
INPUT_NORMALISATION = "rgb float [0,1]"
INPUT_DESCRIPTION = (
    "image: float32 (batch, 3, height, width), RGB scaled to [0, 1], no mean/std normalisation; "
    "images are squashed (not letterboxed) to image_size x image_size"
)
OUTPUT_DESCRIPTION = "logits: float32 (batch, num_classes, height, width); softmax over dim 1; class 0 is background"
TORCHSCRIPT_METADATA_FILE = "lesion_kd.json"

# Keys, all values strings (ONNX metadata_props are strings).
KEYS = (
    "lesion_kd_version",
    "network",
    "num_classes",
    "in_channels",
    "image_size",
    "dynamic_size",
    "size_multiple",
    "max_size",  # dynamic-size exports only: the largest side they are correct for
    "input_normalisation",
    "input",
    "output",
    "source_checkpoint",
    "verified_max_abs_diff",
    "verified_tolerance",
    "exported_at",
)
