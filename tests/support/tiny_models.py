"""A tiny MONAI bundle and a tiny nnU-Net v2 result folder, trained in seconds on the phantom.

Both learn the chest phantom's lungs (label 1) and bone (label 2), which differ from their
surroundings by intensity, so a few hundred thousand voxel updates of a two-level U-Net
suffice and their output can be checked against the phantom's truth.  Used by the tests and
``benchmarks/models.py``; needs ``monai`` and ``nnunetv2`` (the ``models`` extra).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicom_node.demo import Phantom

if TYPE_CHECKING:  # torch loads only where a network is trained (dicom_node imports no torch)
    import torch

LABELS = {"background": 0, "lung": 1, "bone": 2}
#: Intensity window of the bundle's ScaleIntensityRanged.
WINDOW = (-1000.0, 1000.0)
#: ... mapped to this range: wide, so the few training steps need no large weights.
SCALED = (-10.0, 10.0)


def phantom_labels(phantom: Phantom) -> np.ndarray:
    """Label map of the phantom: 1 lungs, 2 bone, 0 the rest."""
    labels = np.zeros(phantom.hu.shape, dtype=np.int64)
    labels[phantom.masks["lungs"]] = LABELS["lung"]
    labels[phantom.masks["bone"]] = LABELS["bone"]
    return labels


def _train(
    build: Callable[[], torch.nn.Module], image: np.ndarray, labels: np.ndarray, *, steps: int, seed: int = 0,
    sample: tuple[int, int, int] = (8, 32, 32),
) -> torch.nn.Module:
    """Cross-entropy with Adam on class-balanced voxel samples; deterministic for a seed.

    The network is built (``build``) after seeding, so its initial weights do not depend on
    what the process drew from torch's generator before (other tests, in any order).

    The tiny networks see one voxel at a time (1x1x1 kernels at full resolution), so each
    step trains on ``sample`` voxels drawn evenly from every intensity class (air, fat, soft
    tissue, lung, bone) and laid out as a small volume: seconds, not minutes, on a busy CPU.
    """
    import torch

    torch.manual_seed(seed)
    network = build()
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels.ravel() == k) for k in np.unique(labels)]
    # Background holds air, fat and soft tissue: sample it by intensity band too.
    flat = image.ravel()
    bg = groups[0]
    order = np.argsort(flat[bg])
    groups = [*np.array_split(bg[order], 3), *groups[1:]]
    n = int(np.prod(sample))
    optimiser = torch.optim.Adam(network.parameters(), lr=3e-2)
    network.train()
    for _ in range(steps):
        idx = np.concatenate([rng.choice(g, n // len(groups) + 1) for g in groups])[:n]
        rng.shuffle(idx)
        x = torch.as_tensor(flat[idx].reshape(sample), dtype=torch.float32)[None, None]
        y = torch.as_tensor(labels.ravel()[idx].reshape(sample))[None]
        logits = network(x)
        if isinstance(logits, list | tuple):
            logits = logits[0]
        loss = torch.nn.functional.cross_entropy(logits, y)
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    network.eval()
    return network


# -- MONAI bundle ----------------------------------------------------------------------------


def bundle_configs(pixdim: tuple[float, float, float] = (4.0, 4.0, 5.0)) -> tuple[dict[str, Any], dict[str, Any]]:
    """``metadata.json`` and ``inference.json`` of the tiny bundle, in the Model Zoo's style."""
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "trained for seconds on the dicom-node chest phantom"},
        "monai_version": "1.6.1",
        "name": "Phantom lungs and bone",
        "task": "Segmentation of lungs and bone on a synthetic CT",
        "description": "A two-level UNet, a test fixture, not a clinical model.",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": [32, 32, 32], "dtype": "float32", "value_range": [-1024, 3071],
                                 "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                                 "spatial_shape": [32, 32, 32], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": {"0": "background", "1": "lung", "2": "bone"}}},
        },
    }
    inference = {
        "imports": ["$import torch", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                        "channels": [8, 16], "strides": [1], "kernel_size": 1,
                        "up_kernel_size": 1, "num_res_units": 0, "norm": None},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": list(pixdim), "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": WINDOW[0], "a_max": WINDOW[1],
             "b_min": SCALED[0], "b_max": SCALED[1], "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in []]", "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 2,
                    "overlap": 0.25, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg"},
        ]},
    }
    return metadata, inference


def bundle_network() -> torch.nn.Module:
    from monai.networks.nets import UNet  # type: ignore[attr-defined]

    net: torch.nn.Module = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16), strides=(1,),
                                kernel_size=1, up_kernel_size=1, num_res_units=0,
                                norm=None)  # type: ignore[arg-type]  # MONAI accepts None: no norm layer
    return net


def make_bundle(root: Path, phantom: Phantom, *, steps: int = 200, torchscript: bool = True) -> Path:
    """Write a trained tiny bundle into ``root``: configs/, models/model.pt (and model.ts)."""
    import torch

    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    metadata, inference = bundle_configs()
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    (root / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    # Intensity is all the task needs (the network sees one voxel at a time), so it is trained
    # on the phantom's own voxels with the bundle's intensity scaling; the bundle resamples to
    # 4 x 4 x 5 mm at inference.
    image = np.clip((phantom.hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0.0, 1.0) * (SCALED[1] - SCALED[0]) + SCALED[0]
    net = _train(bundle_network, image, phantom_labels(phantom), steps=steps)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    if torchscript:
        torch.jit.save(torch.jit.script(net), str(root / "models" / "model.ts"))
    return root


# -- nnU-Net v2 result folder ----------------------------------------------------------------


def nnunet_plans(spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> dict[str, Any]:
    """``plans.json`` of a two-stage PlainConvUNet (4 and 8 features) in nnU-Net v2's layout."""
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[1, 1, 1], [1, 1, 1]], "strides": [[1, 1, 1], [2, 2, 2]],
            "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
            "norm_op": None, "norm_op_kwargs": None,
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [32, 64, 64], "median_image_size_in_voxels": list(shape), "spacing": list(spacing),
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": arch, "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset999_Phantom", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing), "original_median_shape_after_transp": list(shape),
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": config}, "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 1000.0, "mean": -300.0, "median": -300.0, "min": -1000.0,
            "percentile_00_5": -1000.0, "percentile_99_5": 800.0, "std": 50.0}},
    }


def make_nnunet(root: Path, phantom: Phantom, *, steps: int = 200, folds: tuple[int, ...] = (0,)) -> Path:
    """Write a trained tiny nnU-Net v2 result folder (``plans.json``, ``dataset.json``,
    ``fold_N/checkpoint_final.pth``) into ``root``; each fold trained with its own seed."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from inference.nnunet import canonical_axes

    perm, flips = canonical_axes(phantom.affine)
    image = np.flip(phantom.hu, flips).transpose(perm) if flips else phantom.hu.transpose(perm)
    labels = phantom_labels(phantom)
    labels = np.flip(labels, flips).transpose(perm) if flips else labels.transpose(perm)
    spacing = phantom.spacing
    spacing = (spacing[perm[0]], spacing[perm[1]], spacing[perm[2]])
    plans = nnunet_plans(spacing, (int(image.shape[0]), int(image.shape[1]), int(image.shape[2])))
    dataset = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 1, "file_ending": ".nii.gz"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "plans.json").write_text(json.dumps(plans, indent=2))
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    # nnU-Net's CTNormalization: clip to the 0.5/99.5 percentiles, then z-score.
    normalised = (np.clip(image, props["percentile_00_5"], props["percentile_99_5"]) - props["mean"]) / props["std"]
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    for fold in folds:
        net = _train(lambda: nnUNetTrainer.build_network_architecture(manager, configuration, 1, len(LABELS),
                                                                      enable_deep_supervision=False),
                     np.ascontiguousarray(normalised), np.ascontiguousarray(labels), steps=steps, seed=fold)
        (root / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(
            {"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
             "init_args": {"configuration": "3d_fullres", "fold": fold}, "inference_allowed_mirroring_axes": (0, 1, 2)},
            root / f"fold_{fold}" / "checkpoint_final.pth",
        )
    return root


# -- tiny models for the warm-model cache ----------------------------------------------------


class TinyThreshold:
    """A :class:`~inference.model.Model` with real weights on its device and nothing to train:
    a 1x1x1 convolution whose weight is the threshold, marking voxels above ``level``.

    Small enough that a test can create, evict and re-create many on CPU or GPU; each instance
    counts how often it predicted, so a test sees which instance (warm or new) ran a job.
    """

    version = "1.0.0"
    modalities: frozenset[str] = frozenset()

    def __init__(self, name: str, device: torch.device, level: float = 0.0) -> None:
        import torch

        from inference.prediction import Code, Label

        self.name = name
        self.device = device
        self.level = level
        self.network = torch.nn.Conv3d(1, 1, 1, bias=False).to(device)
        self.level = level
        with torch.no_grad():
            self.network.weight.fill_(1.0)
        self.labels = (Label(name, Code("85756007", "SCT", "Tissue"), Code("85756007", "SCT", "Tissue")),)
        self.predictions = 0

    def predict(self, volume: Any) -> Any:
        import torch

        from inference.prediction import Prediction, Segment

        self.predictions += 1
        with torch.no_grad():
            image = torch.as_tensor(np.asarray(volume.array, dtype=np.float32), device=self.device)
            mask = (self.network(image[None, None])[0, 0] > self.level).cpu().numpy()
        return Prediction(self.name, self.version, [Segment(label=self.labels[0], mask=mask)])


def tiny_factories(*names: str, created: list[str] | None = None) -> dict[str, Any]:
    """Registry factories of :class:`TinyThreshold` models named ``names``; each creation is
    appended to ``created`` (so a test sees cold starts)."""

    def factory_for(name: str) -> Any:
        def factory(device: torch.device) -> TinyThreshold:
            if created is not None:
                created.append(name)
            return TinyThreshold(name, device)

        return factory

    return {name: factory_for(name) for name in names}
