from __future__ import annotations

import pytest
import torch
from transformers import SamConfig, SamImageProcessorPil, SamModel, SamProcessor

from sam_hf import count_parameters, freeze_modules, tiny_sam_config, tiny_sam_processor
from sam_hf.family.modeling import check_processor_matches_model, freeze_unused_decoder_outputs, init_sam_model


def test_tiny_config_agrees_with_itself_and_its_processor():
    config = tiny_sam_config()
    assert config.vision_config.output_channels == config.prompt_encoder_config.hidden_size
    assert config.prompt_encoder_config.hidden_size == config.mask_decoder_config.hidden_size
    assert config.vision_config.num_pos_feats * 2 == config.mask_decoder_config.hidden_size
    processor = tiny_sam_processor(config)
    check_processor_matches_model(processor, config)
    model = SamModel(config)
    out = model(pixel_values=torch.randn(1, 3, 256, 256), input_boxes=torch.tensor([[[0.0, 0.0, 50.0, 50.0]]]))
    assert out.pred_masks.shape[-2:] == (64, 64) == (processor.image_processor.mask_pad_size["height"],) * 2


def test_mismatched_processor_is_rejected():
    with pytest.raises(ValueError, match="256-px inputs and predicts 64-px masks, the processor makes 1024-px"):
        check_processor_matches_model(SamProcessor(image_processor=SamImageProcessorPil()), tiny_sam_config())
    inconsistent = SamImageProcessorPil(size={"longest_edge": 256}, pad_size={"height": 512, "width": 512})
    with pytest.raises(ValueError, match="must agree"):
        check_processor_matches_model(SamProcessor(image_processor=inconsistent), tiny_sam_config())


def test_fresh_tiny_encoder_sees_the_image():
    """SamVisionConfig's default init (std 1e-10) gives the same embedding for every image; ours must not."""
    torch.manual_seed(0)
    model = init_sam_model(tiny_sam_config(), seed=0)
    a, b = torch.randn(1, 3, 256, 256), torch.randn(1, 3, 256, 256)
    ea, eb = model.get_image_embeddings(a), model.get_image_embeddings(b)
    assert (ea - eb).abs().mean() > 0.1 * ea.abs().mean()
    default = SamModel(
        SamConfig(
            vision_config={**tiny_sam_config().vision_config.to_dict(), "initializer_range": 1e-10},
            prompt_encoder_config=tiny_sam_config().prompt_encoder_config.to_dict(),
            mask_decoder_config=tiny_sam_config().mask_decoder_config.to_dict(),
        )
    )
    da, db = default.get_image_embeddings(a), default.get_image_embeddings(b)
    assert (da - db).abs().max() < 1e-3 * max(da.abs().max(), 1e-6) + 1e-5
    std = model.shared_image_embedding.positional_embedding.std().item()
    assert 1.5 < std < 3.5


@pytest.mark.parametrize("train_iou_head", [True, False])
def test_freezing_counts(train_iou_head):
    """Default box training: the whole mask decoder but the three multimask hypernetwork MLPs trains, the IoU head
    included; `train_iou_head=False` (`--iou_loss_weight 0`) freezes the IoU head too."""
    model = SamModel(tiny_sam_config())
    total = count_parameters(model).total
    freeze_modules(model)
    freeze_unused_decoder_outputs(model, train_iou_head=train_iou_head)
    counts = count_parameters(model)
    decoder = model.mask_decoder
    frozen_in_decoder = sum(p.numel() for m in decoder.output_hypernetworks_mlps[1:] for p in m.parameters())
    if not train_iou_head:
        frozen_in_decoder += sum(p.numel() for p in decoder.iou_prediction_head.parameters())
    expected = sum(p.numel() for p in decoder.parameters()) - frozen_in_decoder
    assert counts.total == total and counts.trainable == expected
    assert all(p.requires_grad == train_iou_head for p in decoder.iou_prediction_head.parameters())
    assert all(p.requires_grad for p in decoder.output_hypernetworks_mlps[0].parameters())
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    assert not any(p.requires_grad for p in model.prompt_encoder.parameters())
