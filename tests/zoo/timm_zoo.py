"""timm transformer families at tiny sizes, built from their own model classes with random weights
(``pretrained=False``, no downloads).

Each ``Family`` gives timm's model name, the arguments that make it tiny, the image size, and
what a reader of its code counts: ``sites``, the attentions in graph order, and ``skipped``, the
ones fxsparse must report skipped, with a pattern their reason matches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Family:
    name: str
    model: str
    kwargs: dict
    img: int
    sites: int
    skipped: dict = field(default_factory=dict)   # site index -> a regex its reason matches
    slow: bool = False

    def build(self) -> torch.nn.Module:
        import timm

        torch.manual_seed(0)
        model = timm.create_model(self.model, pretrained=False, num_classes=10, **self.kwargs).eval()
        with torch.no_grad():  # zero-initialised residual norms (SwinV2) and heads (Hiera) would hide every attention
            for mod in model.modules():
                if isinstance(mod, torch.nn.LayerNorm) and mod.weight is not None and not mod.weight.any():
                    mod.weight.fill_(1.0)
                if isinstance(mod, torch.nn.Linear) and not mod.weight.any():
                    mod.weight.normal_(0.0, 0.02)
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.weight is not None and \
                        not mod.weight.any():  # EfficientViT's attention output projection
                    mod.weight.fill_(1.0)
        return model

    def inputs(self) -> tuple:
        return (torch.randn(1, 3, self.img, self.img, generator=torch.Generator().manual_seed(1)),)

    def __repr__(self):
        return self.name


def _all(n, word):
    return {i: word for i in range(n)}


FAMILIES = [
    Family("vit", "vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32, 2),
    Family("deit", "deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32, 2),
    Family("cait", "cait_xxs24_224", dict(img_size=32, patch_size=8, depth=2, depth_token_only=1), 32, 3,
           skipped={0: "talking heads", 1: "talking heads"}),
    Family("beit", "beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4), 32, 2),
    Family("eva", "eva02_tiny_patch14_224", dict(img_size=28, depth=2), 28, 2),
    Family("swin", "swin_tiny_patch4_window7_224", dict(img_size=56, depths=(2, 2), num_heads=(2, 4), embed_dim=32,
                                                         window_size=7), 56, 4),
    Family("swinv2", "swinv2_tiny_window8_256", dict(img_size=64, depths=(2, 2), num_heads=(2, 4), embed_dim=32,
                                                       window_size=8), 64, 4),
    Family("levit", "levit_128s", dict(img_size=64), 64, 11, slow=True),
    Family("efficientformer", "efficientformer_l1", dict(), 224, 1, slow=True),
    Family("efficientformerv2", "efficientformerv2_s0", dict(img_size=64), 64, 5,
           skipped={0: "talking heads", 1: "talking heads", 3: "talking heads", 4: "talking heads"}),
    Family("davit", "davit_tiny", dict(depths=(1, 1, 1, 1)), 64, 8),  # windows and channel attention alternate
    Family("mvitv2", "mvitv2_tiny", dict(img_size=64), 64, 10, slow=True),  # pooled; relative positions: cal_rel_pos_type
    Family("twins", "twins_svt_small", dict(img_size=64, depths=(1, 1, 1, 1)), 64, 4),
    Family("xcit", "xcit_nano_12_p16_224", dict(img_size=32, depth=2), 32, 4),  # 2 channel + 2 class attentions
    Family("pvt_v2", "pvt_v2_b0", dict(depths=(1, 1, 1, 1)), 64, 4),
        Family("convit", "convit_tiny", dict(img_size=32, patch_size=8, depth=2, local_up_to_layer=1), 32, 2,
           skipped={0: "mixed with other values|keeps as one call"}),  # GPSA: two softmaxes mixed by a gate
    Family("coat", "coat_lite_tiny", dict(img_size=64), 64, 0),  # factorized: softmax over k alone
    Family("tnt", "tnt_s_patch16_224", dict(img_size=32, depth=2), 32, 4),
    Family("volo", "volo_d1_224", dict(img_size=64), 64, 16, slow=True),
    Family("maxvit", "maxvit_tiny_tf_224", dict(img_size=64, depths=(1, 1, 1, 1)), 64, 8, slow=True),
    Family("fastvit", "fastvit_sa12", dict(layer_scale_init_value=1.0), 128, 2),
    Family("nextvit", "nextvit_small", dict(), 64, 4, slow=True),
    Family("tiny_vit", "tiny_vit_5m_224", dict(), 64, 10, slow=True),
    Family("gcvit", "gcvit_xxtiny", dict(img_size=64), 64, 12, slow=True),
    Family("pit", "pit_ti_224", dict(img_size=64), 64, 12),
    Family("visformer", "visformer_tiny", dict(img_size=64), 64, 8),
    Family("mobilevit", "mobilevit_xxs", dict(), 64, 9),
    Family("edgenext", "edgenext_xx_small", dict(ls_init_value=1.0), 64, 3),  # channel attention
    Family("vitamin", "vitamin_small_224", dict(img_size=64, depth=2), 64, 2),
    # beyond the families the reach issue first sampled
    Family("hiera", "hiera_tiny_224", dict(img_size=64, stages=(1, 1, 1, 1)), 64, 4),  # mask units, pooled queries
    Family("nest", "nest_tiny", dict(img_size=32, patch_size=4), 32, 12, slow=True),  # attention within nested blocks
    Family("samvit", "samvit_base_patch16", dict(img_size=64, depth=2, embed_dim=64, num_heads=2,
                                                 global_attn_indexes=(1,), window_size=2), 64, 2),  # rel pos bias
    Family("crossvit", "crossvit_tiny_240", dict(img_size=120, depth=((1, 1, 0),), embed_dim=(32, 64),
                                                 num_heads=(2, 2)), 120, 4),  # two towers, class-token cross attention
    # cascaded group attention, one attention per head, `v @ attn.transpose(-2, -1)`, inside a module timm keeps
    # whole (found when it runs)
    Family("efficientvit_msra", "efficientvit_m0", dict(img_size=64), 64, 24, slow=True),
    Family("caformer", "caformer_s18", dict(), 64, 12, slow=True),  # MetaFormer: attention token mixers in the last two stages
    Family("botnet", "botnet26t_256", dict(img_size=64), 64, 3, slow=True),  # bottleneck attention with relative positions
    Family("swinv2_cr", "swinv2_cr_tiny_224", dict(img_size=64, window_size=4, depths=(1, 1, 1, 1)), 64, 4),
    Family("coatnet", "coatnet_0_rw_224", dict(img_size=64), 64, 9, slow=True),
    Family("shvit", "shvit_s1", dict(), 64, 9, slow=True),  # single-head attention on a slice of the channels
    Family("iformer", "iformer_t", dict(), 64, 5, slow=True),  # SHMA: single-head modulation attention
    Family("lowformer", "lowformer_b0", dict(), 64, 7),  # convolutional attention at a lower resolution
    Family("hieradet_sam2", "hieradet_small", dict(), 64, 16, slow=True),  # SAM2's Hiera: windows, pooled queries
    Family("halonet", "halonet26t", dict(), 256, 3, slow=True),  # blocked local attention with halos (needs 256 px)
    Family("qwen3_vit", "qwen3_vit_88m", dict(depth=2), 32, 2),  # rotary position embedding
    # no softmax over q kᵀ: linear attention with a ReLU kernel (EfficientViT-MIT), SwiftFormer's additive attention
    Family("efficientvit_mit", "efficientvit_b0", dict(), 64, 0),
    Family("swiftformer", "swiftformer_xs", dict(), 64, 0),
]
