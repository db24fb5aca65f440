"""Loading DDPO's policy (diffusion/pipeline.py): local folders, the built-in name, and one-line
errors for what is not a text-to-image pipeline."""

import json

import pytest
from diffusers import DDIMScheduler, PNDMScheduler

from rlhf_cli.builtin import image_pipeline
from rlhf_cli.builtin.image_pipeline import assemble, build_components
from rlhf_cli.diffusion.pipeline import load_pipeline
from rlhf_cli.errors import UserError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An untrained built-in pipeline saved with a PNDM scheduler (Stable Diffusion 1.x's default)."""
    components = build_components(seed=0)
    components["scheduler"] = PNDMScheduler.from_config(components["scheduler"].config)
    path = tmp_path_factory.mktemp("pipeline")
    assemble(components).save_pretrained(path)
    return path


def test_a_local_folder_loads_with_a_ddim_scheduler_from_its_own_schedule(folder):
    pipe = load_pipeline(str(folder))
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.steps_offset == 1
    assert pipe.unet.config.in_channels == 4 and pipe.safety_checker is None


def test_a_folder_without_model_index_is_not_a_pipeline(folder, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="is not a diffusers pipeline: it has no model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(UserError, match="is a file"):
        load_pipeline(str(tmp_path / "config.json"))


def test_a_pipeline_missing_a_part_names_it(folder, tmp_path):
    index = json.loads((folder / "model_index.json").read_text())
    index["vae"] = [None, None]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"model.model_name_or_path: the pipeline .* has no vae"):
        load_pipeline(str(tmp_path))


def test_builtin_names(monkeypatch):
    built = []
    monkeypatch.setattr(image_pipeline, "build_tiny_pipeline",
                        lambda seed: built.append(seed) or assemble(build_components(seed)))
    assert isinstance(load_pipeline("builtin:tiny-sd?seed=2").scheduler, DDIMScheduler)
    load_pipeline("builtin:tiny-sd")
    assert built == [2, 0]
    with pytest.raises(UserError, match="unknown built-in pipeline 'builtin:tiny-gpt2'"):
        load_pipeline("builtin:tiny-gpt2")
