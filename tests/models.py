"""Small random-weight models of the families fxsparse must handle, built from configs (no hub).

Each ``Case`` builds a fresh model in eval mode (seeded, so two builds are equal), its inputs,
how to hand it to ``fxsparse.transform``, the attention sites it holds (names in graph order and
lengths), and a sparse mask_fn that fits it. All run in well under a second on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from fxsparse import patterns


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], tuple]                  # positional args of model(...)
    sites: list[tuple[str, int, int]]            # (name, q_len, kv_len) in graph order
    sparse_fn: Callable                          # a mask_fn that makes every chosen site sparse
    sparse_status: list[str]                     # report status per site under sparse_fn
    use_example_inputs: bool = False             # transformers 5: no symbolic tracing
    concrete_args: dict | None = None
    transform_kwargs: dict = field(default_factory=dict)
    other_inputs: Callable[[], tuple] | None = None   # inputs of another size, if the model takes them
    attn_dropout: float = 0.0                    # attention dropout p (active in train mode)

    def __repr__(self):
        return self.name


def _seeded(fn):
    def build():
        torch.manual_seed(0)
        return fn().eval()
    return build


def _suffix(value, default, unit=""):
    return "" if value == default else f"_{value}{unit}"


def _images(size=32, batch=2):
    return lambda: (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)),)


# ---------------------------------------------------------------------------------------------
# timm


def deit(img=32):
    """Distilled DeiT: CLS + distillation token + (img/8)^2 patches (18 tokens at 32 px). Block 0
    uses F.scaled_dot_product_attention, block 1 the written-out softmax (fused_attn off)."""
    from timm.models.deit import VisionTransformerDistilled

    def make():
        m = VisionTransformerDistilled(img_size=img, patch_size=8, embed_dim=64, depth=2,
                                       num_heads=4, mlp_ratio=2.0, num_classes=10)
        m.blocks[1].attn.fused_attn = False
        return m
    n = 2 + (img // 8) ** 2
    return Case("timm_deit" + _suffix(img, 32, "px"), _seeded(make), _images(img),
                [(f"blocks.{i}.attn", n, n) for i in range(2)],
                patterns.only(patterns.local_2d(1), layers=[0]), ["rewritten", "dense"])


def eva():
    """EVA with 2-D rotary position embedding (rope applied to q and k inside the attention) and
    dynamic image size (pos-embed and rope follow the grid): 32 px = 17 tokens, 48 px = 37.
    With timm 1.0.31 it traces with plain torch.fx: no concrete_args needed."""
    from timm.models.eva import Eva

    def make():
        return Eva(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                   mlp_ratio=2.0, num_classes=10, use_rot_pos_emb=True, ref_feat_shape=4,
                   global_pool="token", dynamic_img_size=True)
    return Case("timm_eva", _seeded(make), _images(),
                [(f"blocks.{i}.attn", 17, 17) for i in range(2)],
                patterns.local_2d(1, prefix_tokens=1), ["rewritten", "rewritten"],
                other_inputs=_images(48))


def swin():
    """Swin: 16x16 patches, 4x4 windows (16 tokens a window) with relative position bias;
    stage 0 on the 16x16 grid, stage 1 on 8x8; block 1 of each stage is shifted (an additive
    -100 mask per window). Shifted block of stage 0 and block 0 of stage 1 use the written-out
    softmax, the others F.scaled_dot_product_attention."""
    from timm.models.swin_transformer import SwinTransformer

    def make():
        m = SwinTransformer(img_size=64, patch_size=4, embed_dim=32, depths=(2, 2),
                            num_heads=(2, 4), window_size=4, mlp_ratio=2.0, num_classes=10,
                            drop_path_rate=0.0)
        for (stage, block), fused in {(0, 0): True, (0, 1): False,
                                      (1, 0): False, (1, 1): True}.items():
            m.layers[stage].blocks[block].attn.fused_attn = fused
        return m
    names = [f"layers.{s}.blocks.{b}.attn" for s in range(2) for b in range(2)]
    return Case("timm_swin", _seeded(make), _images(64), [(n, 16, 16) for n in names],
                patterns.local_2d(1), ["rewritten"] * 4)


# ---------------------------------------------------------------------------------------------
# torchvision


def torchvision_vit(img=32):
    """torchvision's VisionTransformer (vit_b_16's class, small dims): nn.MultiheadAttention."""
    from torchvision.models import VisionTransformer

    def make():
        m = VisionTransformer(image_size=img, patch_size=8, num_layers=2, num_heads=4,
                              hidden_dim=64, mlp_dim=128, num_classes=10)
        torch.nn.init.normal_(m.heads.head.weight)   # torchvision zero-inits the head
        return m
    n = 1 + (img // 8) ** 2
    return Case("torchvision_vit" + _suffix(img, 32, "px"), _seeded(make), _images(img),
                [(f"encoder.layers.encoder_layer_{i}.self_attention", n, n) for i in range(2)],
                patterns.only(patterns.local_2d(1), names="*.encoder_layer_0.*"),
                ["rewritten", "dense"])


# ---------------------------------------------------------------------------------------------
# HuggingFace transformers (version 5: through example_inputs)


def hf_vit(img=32):
    from transformers import ViTConfig, ViTModel

    def make():
        cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, image_size=img, patch_size=8)
        return ViTModel(cfg, add_pooling_layer=False)
    n = 1 + (img // 8) ** 2
    return Case("hf_vit" + _suffix(img, 32, "px"), _seeded(make), _images(img),
                [(f"layers.{i}.attention", n, n) for i in range(2)],
                patterns.local_2d(1, prefix_tokens=1), ["rewritten", "rewritten"],
                use_example_inputs=True)


def _text_inputs(vocab, batch=2, length=12, pad=4):
    def make():
        ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(2))
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[1, length - pad:] = 0                  # the second sequence is padded
        return ids, mask
    return make


def bert(attn="sdpa", length=12):
    cfg_dropout = 0.1        # BertConfig's attention_probs_dropout_prob
    """BERT with a padding attention mask: the site's own additive mask must stay in force.
    ``attn="eager"``: transformers' written-out attention (softmax in float32) instead of SDPA."""
    from transformers import BertConfig, BertModel

    def make():
        cfg = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128,
                         max_position_embeddings=256, attn_implementation=attn)
        return BertModel(cfg)
    return Case("hf_bert" + _suffix(attn, "sdpa") + _suffix(length, 12), _seeded(make),
                _text_inputs(64, length=length, pad=length // 3),
                [(f"encoder.layer.{i}.attention.self", length, length) for i in range(2)],
                patterns.sliding_window(2), ["rewritten", "rewritten"],
                use_example_inputs=True, other_inputs=_text_inputs(64, length=20),
                attn_dropout=cfg_dropout)


def clip(attn="sdpa"):
    """CLIP: a vision tower (17 tokens) and a causal text tower with padding (12 tokens).
    ``attn="eager"``: transformers' written-out attention instead of SDPA."""
    from transformers import CLIPConfig, CLIPModel

    def make():
        cfg = CLIPConfig(
            text_config=dict(vocab_size=64, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=16, bos_token_id=1,
                             eos_token_id=2),
            vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, image_size=32, patch_size=8),
            projection_dim=16, attn_implementation=attn)
        return CLIPModel(cfg)

    def inputs():
        ids, mask = _text_inputs(64)()
        return ids, _images()()[0], mask

    def towers(site):      # vision: local windows; text: a causal sliding window
        if site.name.startswith("vision_model."):
            return patterns.local_2d_mask(site.q_len, site.kv_len, window=1, prefix_tokens=1)
        return patterns.sliding_window_mask(site.q_len, site.kv_len, window=3, causal=True)
    towers.__name__ = "clip_towers"
    text = [(f"text_model.encoder.layers.{i}.self_attn", 12, 12) for i in range(2)]
    vision = [(f"vision_model.encoder.layers.{i}.self_attn", 17, 17) for i in range(2)]
    return Case("hf_clip" + _suffix(attn, "sdpa"), _seeded(make), inputs,
                vision + text, towers, ["rewritten"] * 4, use_example_inputs=True)


CASES = [deit, eva, swin, torchvision_vit, hf_vit, bert, clip,
         lambda: bert("eager"), lambda: clip("eager")]

# Sequences longer than a few blocks, so that layouts hold full, partial and empty blocks.
LONG_CASES = [lambda: deit(img=128), lambda: torchvision_vit(img=128),
              lambda: hf_vit(img=128), lambda: bert(length=200)]
