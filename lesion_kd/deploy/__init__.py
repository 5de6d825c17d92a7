"""Deployment of the student: export (ONNX, TorchScript) and batch segmentation of image folders.

Import the submodules directly. :mod:`lesion_kd.deploy.segment` (inference on any folder of images)
needs only numpy, Pillow, OpenCV, tqdm and onnxruntime for an ONNX model: neither PyTorch Lightning
nor the training code, and not even torch. :mod:`lesion_kd.deploy.export` needs torch.
"""
