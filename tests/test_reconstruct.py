"""Block-wise reconstruction of the quantized encoder (the CPU recipe's warm start) on real slices."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from qmedsam.export.int8 import real_slices
from qmedsam.model import quant
from qmedsam.model.calibrate import calibrate, model_inputs
from qmedsam.train.reconstruct import encoder_units, reconstruct_decoder, reconstruct_encoder


@pytest.fixture(scope="module")
def real_batches(train_tree_dir: Path):
    torch.manual_seed(0)
    return model_inputs(real_slices(train_tree_dir / "CT", limit=2, max_boxes=2))


@pytest.fixture(scope="module")
def calibrated_student(real_batches):
    """The per-channel w8a8 model calibrated on the real batches, built once; each test trains a copy."""
    spec = quant.QuantSpec.from_yaml(Path(__file__).parent.parent / "configs" / "quant" / "w8a8_per_channel.yaml")
    student = quant.load_litemedsam(spec)
    calibrate(student, real_batches)
    return student


def test_units_chained_are_the_encoder(pretrained_model, real_batches):
    units = encoder_units(pretrained_model.image_encoder)
    assert [name for name, _, _ in units][:3] == ["patch_embed", "layers.0.blocks.0", "layers.0.blocks.1"]
    assert len(units) == 17 and units[-1][0] == "neck"
    image = real_batches[0][0]
    with torch.no_grad():
        x = image
        for _, forward, _ in units:
            x = forward(x)
        assert torch.equal(x, pretrained_model.encode(image))


def test_reconstruction_moves_the_quantized_encoder_towards_float(pretrained_model, real_batches, calibrated_student):
    student = copy.deepcopy(calibrated_student)
    float_before = {k: v.clone() for k, v in pretrained_model.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.image_encoder.state_dict().items()}
    images = torch.cat([image for image, _ in real_batches])[:1]
    report = reconstruct_encoder(student, pretrained_model, images, steps=1, batch_size=1, lr=1e-4, scale_lr=1e-3)
    assert report.units == 17 and report.images == 1 and report.steps_per_unit == 1
    # The sequential re-fit alone (each unit trained on the quantized path's own inputs) roughly halves the
    # error on the reconstruction slices; a wide bound, since one step is noisy and CPUs round differently.
    assert 0 < report.relative_error_after < 0.9 * report.relative_error_before < 0.5
    changed = [k for k, v in student.image_encoder.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any(k.endswith("weight") for k in changed)
    assert any(".value" in k for k in changed)  # learned activation scales moved too
    assert all(torch.equal(v, float_before[k]) for k, v in pretrained_model.state_dict().items())
    assert not any(p.requires_grad for p in student.image_encoder.parameters())


def test_decoder_distillation_moves_the_quantized_decoder_towards_float(
    pretrained_model, real_batches, calibrated_student
):
    """End to end on cached embeddings: the quantized decoder (fed by the quantized encoder) is trained
    towards the float model's masks; only the decoder moves, the float model is untouched."""
    student = copy.deepcopy(calibrated_student)
    samples = [(image, boxes[i : i + 1]) for image, boxes in real_batches for i in range(len(boxes))]
    assert len(samples) == 4
    encoder_before = {k: v.clone() for k, v in student.image_encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in student.mask_decoder.state_dict().items()}
    float_before = {k: v.clone() for k, v in pretrained_model.state_dict().items()}
    report = reconstruct_decoder(
        student, pretrained_model, samples, steps=8, batch_size=3, lr=1e-4, scale_lr=1e-3, hold_out_every=4
    )
    assert (report.samples, report.held_out, report.steps) == (3, 1, 8)
    assert report.loss_after < report.loss_before  # what the steps minimise, on the samples they saw
    assert 0.5 < report.agreement_before <= 1 and 0.5 < report.agreement_after <= 1
    assert 0.5 < report.held_out_before <= 1 and 0.5 < report.held_out_after <= 1
    changed = [k for k, v in student.mask_decoder.state_dict().items() if not torch.equal(v, decoder_before[k])]
    assert any(k.endswith("weight") for k in changed)
    assert any(".value" in k for k in changed)
    assert all(torch.equal(v, encoder_before[k]) for k, v in student.image_encoder.state_dict().items())
    assert all(torch.equal(v, float_before[k]) for k, v in pretrained_model.state_dict().items())
    assert not any(p.requires_grad for p in student.parameters())
