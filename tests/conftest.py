import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# One thread everywhere, subprocesses and the engine's own thread sizing included: bitwise comparisons between
# runs (exact resume) need the same float reduction order on both sides.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

# Tests use tiny models: one thread each avoids oversubscription (xdist runs two workers on two cores) and
# makes float reductions independent of the machine's core count.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    # Tests marked `cuda` run wherever torch sees a GPU and are reported as skipped, with the reason, elsewhere.
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skipif(True, reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(no_cuda)


# ---------------------------------------------------------------------------------------------------------------
# Tiny distillation runs: factories shared by the engine tests (test files cannot import this module under
# --import-mode=importlib, so each helper is a session fixture returning the function)
# ---------------------------------------------------------------------------------------------------------------
def _deep_merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _tiny_train_config(synth, teacher=None, **overrides) -> dict:
    """One-step DEIMv2-Atto config on synthetic data at 160 px, no augmentation, on the CPU; with ``teacher`` (a
    directory), distilled at F5 from it. ``overrides`` are deep-merged over the defaults.

    The CPU even where a GPU is present: these runs are compared bitwise (exact resume, rank equality), which holds
    on the CPU only; CUDA has no deterministic backward for grid_sample or memory-efficient attention. The GPU
    paths have their own tests (marked ``cuda``) and tools/gpu_check.py."""
    cfg = {
        "seed": 0, "log_interval": 1, "max_steps_per_epoch": 1, "device": "cpu",
        "model": {"student": "deimv2_atto"},
        "data": {"synth": str(synth), "img_size": 160, "batch_size": 2, "val_batch_size": 2, "num_workers": 0,
                 "policy_epochs": [5, 6, 7], "stop_epoch": 2, "mosaic": {"prob": 0.0}, "mixup": {"prob": 0.0}},
        "schedule": {"epochs": 1, "warmup_iter": 1, "flat_epoch": 1, "no_aug_epoch": 0},
        "ema": {"decay": 0.9, "warmups": 1},
    }  # fmt: skip
    if teacher is not None:
        cfg["distill"] = {"teachers": {"main": {"weights": str(teacher)}}, "injections": [{"tap": "F5", "weight": 5.0}]}
    return _deep_merge(cfg, overrides)


def _tiny_dinov3_teacher(path) -> str:
    """A random one-layer DINOv3 ViT saved with save_pretrained at ``path``; returns the path."""
    import transformers

    config = transformers.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64)  # fmt: skip
    transformers.DINOv3ViTModel(config).save_pretrained(path)
    return str(path)


def _write_yaml(path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _decoder_forward(model, inputs, targets, **flags):
    """One training forward of a detection transformer with the attributes ``flags`` set on each decoder layer and
    its cross-attention, where they have them; returns the outputs and how many times the layers'
    MultiheadAttention modules were called (0 when the split self-attention ran)."""
    layers = model.decoder.layers
    calls = []
    handles = [layer.self_attn.register_forward_hook(lambda *_: calls.append(1)) for layer in layers]
    for module in [m for layer in layers for m in (layer, layer.cross_attn)]:
        for name, value in flags.items():
            if hasattr(module, name):
                setattr(module, name, value)
    torch.manual_seed(1)  # the denoising queries draw from the global RNG
    try:
        return model(inputs, targets), len(calls)
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="session")
def decoder_forward():
    return _decoder_forward


@pytest.fixture(scope="session")
def tiny_train_config():
    return _tiny_train_config


@pytest.fixture(scope="session")
def tiny_dinov3_teacher():
    return _tiny_dinov3_teacher


@pytest.fixture(scope="session")
def write_yaml():
    return _write_yaml


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """``synth_dir(train=, val=, size=)``: a new directory of synthetic COCO data (seed 0); returns its path."""

    def make(train: int, val: int, size: int) -> str:
        from distill.data.synth import make_synth

        root = tmp_path_factory.mktemp("synth")
        make_synth(str(root), train=train, val=val, size=size, seed=0)
        return str(root)

    return make
