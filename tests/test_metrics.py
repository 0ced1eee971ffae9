"""SSCD copy similarity and CLIP score: models the tests build and save, loaded through the same code paths as the
published files, each measure against a hand-written reference, and one-line errors for unusable files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.errors import InputError
from diffmem.measures.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SSCD_COPY_THRESHOLD,
    clip_score,
    load_clip,
    load_sscd,
    sscd_descriptors,
    sscd_preprocess,
    sscd_similarity,
)
from diffmem.testbed.tiny import TinyDescriptor, save_tiny_clip, save_tiny_sscd

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),  # the authors' format
]


@pytest.fixture(scope="module")
def sscd_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny descriptor saved as the SSCD authors ship theirs, and the module itself (for the reference)."""
    path = tmp_path_factory.mktemp("sscd") / "tiny.torchscript.pt"
    return path, save_tiny_sscd(path)


def random_images(n: int, size: tuple[int, int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(n)]


def test_sscd_similarity_is_the_cosine_of_normalised_descriptors(sscd_file: tuple[Path, torch.nn.Module]) -> None:
    path, descriptor = sscd_file
    model = load_sscd(path, device="cpu")
    gen, ref = random_images(3, (288, 288), 0), random_images(2, (288, 288), 1)  # 288x288: the resize is a no-op
    gen[2] = ref[1].copy()  # an exact copy of a reference
    sims = sscd_similarity(model, gen, ref, batch_size=2)

    def by_hand(img: np.ndarray) -> torch.Tensor:
        x = (torch.from_numpy(img).double().permute(2, 0, 1) / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) \
            / torch.tensor(IMAGENET_STD)[:, None, None]
        with torch.no_grad():
            d = descriptor(x.float()[None])[0].double()
        return d / d.norm()

    expected = torch.stack([by_hand(g) for g in gen]) @ torch.stack([by_hand(r) for r in ref]).T
    assert sims.shape == (3, 2)
    assert sims.double().numpy() == pytest.approx(expected.numpy(), abs=1e-5)
    assert float(sims[2, 1]) == pytest.approx(1.0, abs=1e-5) and float(sims[2, 1]) > SSCD_COPY_THRESHOLD
    desc = sscd_descriptors(model, gen)
    assert desc.norm(dim=1).numpy() == pytest.approx(np.ones(3), abs=1e-6)
    floats = [g.astype(np.float32) / 255 for g in gen]  # a pipeline's output_type="np" images read the same
    assert torch.allclose(sscd_descriptors(model, floats), desc, atol=1e-6)
    assert SSCD_COPY_THRESHOLD == 0.5


def test_sscd_preprocessing_resizes_and_normalises(tmp_path: Path) -> None:
    flat = Image.new("RGB", (300, 200), (200, 100, 50))  # any resize of a flat image is that flat image
    x = sscd_preprocess(flat)
    assert x.shape == (3, 288, 288)
    expected = [(c / 255 - m) / s for c, m, s in zip((200, 100, 50), IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert x.flatten(1).mean(dim=1).tolist() == pytest.approx(expected, abs=1e-6)
    assert float(x.flatten(1).std(dim=1).max()) < 1e-6
    # Wen et al.'s variant: shorter side 256 (here already), centre crop 224 at (208, 16), mean = std = 0.5
    xs, ys = np.meshgrid(np.arange(640), np.arange(256))
    ramp = np.stack([xs % 256, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    w = sscd_preprocess(tmp_path / "ramp.png", "wen")
    assert w.shape == (3, 224, 224)
    assert float(w[0, 0, 0]) == pytest.approx((208 / 255 - 0.5) / 0.5, abs=1e-6)
    assert float(w[1, 0, 0]) == pytest.approx((16 / 255 - 0.5) / 0.5, abs=1e-6)
    with pytest.raises(InputError, match="preprocessing"):
        sscd_preprocess(flat, "imagenet")


def test_sscd_file_errors(tmp_path: Path) -> None:
    not_script = tmp_path / "weights.pt"
    torch.save(TinyDescriptor().state_dict(), not_script)  # a weight file, e.g. the authors' *.torchvision.pt
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    for path, fragment in ((tmp_path / "missing.pt", "not found"), (not_script, "not a TorchScript model"),
                           (text, "not a TorchScript model")):
        with pytest.raises(InputError, match=fragment) as info:
            load_sscd(path, device="cpu")
        assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIPModel and its processor (the CLIP BPE tokenizer) saved as a transformers folder."""
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    save_tiny_clip(folder)
    return folder


def test_clip_score_is_the_cosine_of_image_and_caption_embeddings(clip_dir: Path) -> None:
    clip = load_clip(clip_dir, device="cpu")
    images = random_images(3, (40, 48), 2)
    captions = ["a red cube", "a photo of a smiling old man with a hat", "a red cube"]
    scores = clip_score(clip, images, captions, batch_size=2)
    model, proc = clip.model, clip.processor
    with torch.no_grad():
        pixels = proc.image_processor([Image.fromarray(im) for im in images], return_tensors="pt").pixel_values
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        expected = []
        for i, caption in enumerate(captions):
            ids = proc.tokenizer([caption], return_tensors="pt").input_ids
            txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0]
            expected.append(float(img[i] @ txt / (img[i].norm() * txt.norm())))
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert clip_score(clip, images, captions, batch_size=1).tolist() == pytest.approx(scores.tolist(), abs=1e-6)
    with pytest.raises(InputError, match="3 images but 2 captions"):
        clip_score(clip, images, captions[:2])


def test_clip_folder_errors(tmp_path: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    text_only = tmp_path / "text-encoder"
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
                  ).save_pretrained(text_only)
    (tmp_path / "empty").mkdir()
    cases = {tmp_path / "nowhere": "not found", tmp_path / "empty": "no config.json",
             text_only: "holds a clip_text_model model, not a CLIPModel"}
    for path, fragment in cases.items():
        with pytest.raises(InputError, match=fragment) as info:
            load_clip(path, device="cpu")
        assert "\n" not in str(info.value)
