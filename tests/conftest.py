"""Shared fixtures: a small synthetic dataset saved in a temporary cache (generated once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory) -> Path:
    """A cache root holding dataset "synth": 24 images of 128x128 with rendered PNGs."""
    from refground.data.store import dataset_dir
    from refground.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("cache")
    write_synthetic(dataset_dir("synth", root), name="synth", num_images=24, seed=0, image_size=128, workers=1)
    return root


@pytest.fixture(scope="session")
def synth_ds(synth_cache):
    from refground.data.store import load_named

    return load_named("synth", synth_cache)
