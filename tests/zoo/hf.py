"""HuggingFace transformers architectures at tiny sizes, built from their own classes with random
weights (no downloads).

Each ``Arch`` gives the model (eval mode, seeded), its keyword inputs, and what a reader of the
model's code counts: ``sites``, the attentions in graph order (encoder before decoder, self before
cross), and ``skipped``, those among them fxsparse must report skipped, with a pattern its reason
must contain. Two layers everywhere, so a site's count is layers x attentions per layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

L, H, D = 2, 4, 32        # layers, heads, hidden size (head dim 8)
VOCAB, N, B = 64, 12, 2   # vocabulary, tokens, batch


@dataclass
class Arch:
    name: str
    make: Callable[[str], torch.nn.Module]   # attn_implementation -> model
    inputs: Callable[[], dict]
    sites: int
    skipped: dict = field(default_factory=dict)   # site index -> a regex its reason matches
    attns: tuple = ("sdpa", "eager")          # the attention implementations it has
    modules: int = 0   # transform: attention modules, where fewer than sites (one layer shared by all); 0 = sites

    def build(self, attn: str) -> torch.nn.Module:
        torch.manual_seed(0)
        return self.make(attn).eval()

    def __repr__(self):
        return self.name


def _ids(length=N, pad=3):
    def make():
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1, VOCAB, (B, length), generator=g)
        mask = torch.ones(B, length, dtype=torch.long)
        mask[1, length - pad:] = 0   # the second sequence is padded: the model's own mask stays in force
        return dict(input_ids=ids, attention_mask=mask)
    return make


def _seq2seq(make_ids=_ids()):
    def make():
        d = make_ids()
        d["decoder_input_ids"] = torch.randint(1, VOCAB, (B, 8), generator=torch.Generator().manual_seed(2))
        return d
    return make


def _pixels(size=32):
    return lambda: dict(pixel_values=torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(1)))


def _tf(cls_name, cfg_name, **cfg):
    """A model class of transformers built from its config class with the given arguments."""
    def make(attn):
        import transformers
        config = getattr(transformers, cfg_name)(**cfg)
        config._attn_implementation = attn
        for sub in ("text_config", "vision_config", "encoder", "decoder"):
            if isinstance(getattr(config, sub, None), transformers.PretrainedConfig):
                getattr(config, sub)._attn_implementation = attn
        return getattr(transformers, cls_name)(config)
    return make


_BERTLIKE = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                 intermediate_size=2 * D, max_position_embeddings=64)
_DECODER = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                intermediate_size=2 * D, max_position_embeddings=64, use_cache=False)
_VISION = dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=2 * D,
               image_size=32, patch_size=8)

ARCHS = [
    Arch("bert", _tf("BertModel", "BertConfig", **_BERTLIKE), _ids(), 2),
    Arch("roberta", _tf("RobertaModel", "RobertaConfig", **_BERTLIKE, pad_token_id=0), _ids(), 2),
    Arch("distilbert", _tf("DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, dim=D, n_layers=L, n_heads=H,
                            hidden_dim=2 * D, max_position_embeddings=64), _ids(), 2),
    Arch("albert", _tf("AlbertModel", "AlbertConfig", **_BERTLIKE, embedding_size=16), _ids(), 2, modules=1),
    Arch("electra", _tf("ElectraModel", "ElectraConfig", **_BERTLIKE, embedding_size=16), _ids(), 2),
    Arch("modernbert", _tf("ModernBertModel", "ModernBertConfig", **_BERTLIKE, local_attention=8,
                           pad_token_id=0), _ids(), 2),
    Arch("gpt2", _tf("GPT2Model", "GPT2Config", vocab_size=VOCAB, n_embd=D, n_layer=L, n_head=H, n_positions=64, use_cache=False),
         _ids(), 2),
    Arch("gpt_neo", _tf("GPTNeoModel", "GPTNeoConfig", vocab_size=VOCAB, hidden_size=D, num_layers=L, num_heads=H,
                        attention_types=[[["global", "local"], 1]], window_size=4, max_position_embeddings=64, use_cache=False),
         _ids(), 2, attns=("eager",)),
    Arch("gptj", _tf("GPTJModel", "GPTJConfig", vocab_size=VOCAB, n_embd=D, n_layer=L, n_head=H, rotary_dim=4,
                     n_positions=64, use_cache=False), _ids(), 2),
    Arch("opt", _tf("OPTModel", "OPTConfig", vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L,
                    num_attention_heads=H, ffn_dim=2 * D, word_embed_proj_dim=D, max_position_embeddings=64, use_cache=False),
         _ids(), 2),
    Arch("llama", _tf("LlamaModel", "LlamaConfig", **_DECODER, num_key_value_heads=2), _ids(), 2),
    Arch("mistral", _tf("MistralModel", "MistralConfig", **_DECODER, num_key_value_heads=2, sliding_window=6),
         _ids(), 2),
    Arch("qwen2", _tf("Qwen2Model", "Qwen2Config", **_DECODER, num_key_value_heads=2), _ids(), 2),
    Arch("qwen3", _tf("Qwen3Model", "Qwen3Config", **_DECODER, num_key_value_heads=2, head_dim=8), _ids(), 2),
    Arch("gemma", _tf("GemmaModel", "GemmaConfig", **_DECODER, num_key_value_heads=1, head_dim=8), _ids(), 2),
    Arch("phi", _tf("PhiModel", "PhiConfig", **_DECODER), _ids(), 2),
    Arch("mixtral", _tf("MixtralModel", "MixtralConfig", **_DECODER, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2), _ids(), 2),
    Arch("gpt_neox", _tf("GPTNeoXModel", "GPTNeoXConfig", **_DECODER), _ids(), 2),
    Arch("t5", _tf("T5Model", "T5Config", vocab_size=VOCAB, d_model=D, d_kv=8, d_ff=2 * D, num_layers=L,
                   num_heads=H, decoder_start_token_id=0, use_cache=False), _seq2seq(), 6),
    Arch("bart", _tf("BartModel", "BartConfig", vocab_size=VOCAB, d_model=D, encoder_layers=L, decoder_layers=L,
                     encoder_attention_heads=H, decoder_attention_heads=H, encoder_ffn_dim=2 * D,
                     decoder_ffn_dim=2 * D, max_position_embeddings=64, use_cache=False), _seq2seq(), 6),
    Arch("whisper", _tf("WhisperModel", "WhisperConfig", vocab_size=VOCAB, num_mel_bins=8, d_model=D,
                        encoder_layers=L, decoder_layers=L, encoder_attention_heads=H, decoder_attention_heads=H,
                        encoder_ffn_dim=2 * D, decoder_ffn_dim=2 * D, max_source_positions=16,
                        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1, use_cache=False),
         lambda: dict(input_features=torch.randn(B, 8, 32, generator=torch.Generator().manual_seed(1)),
                      decoder_input_ids=torch.randint(1, VOCAB, (B, 8), generator=torch.Generator().manual_seed(2))),
         6),
    Arch("vit", _tf("ViTModel", "ViTConfig", **_VISION), _pixels(), 2),
    Arch("deit", _tf("DeiTModel", "DeiTConfig", **_VISION), _pixels(), 2),
    Arch("beit", _tf("BeitModel", "BeitConfig", **_VISION, vocab_size=VOCAB, use_relative_position_bias=True),
         _pixels(), 2),
    Arch("swin", _tf("SwinModel", "SwinConfig", image_size=32, patch_size=4, embed_dim=16, depths=[2, 1],
                     num_heads=[2, 4], window_size=4), _pixels(), 3),
    Arch("clip", _tf("CLIPModel", "CLIPConfig",
                     text_config=dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                                      intermediate_size=2 * D, max_position_embeddings=64),
                     vision_config=dict(_VISION), projection_dim=16),
         lambda: dict(**_ids()(), **_pixels()()), 4),
    Arch("wav2vec2", _tf("Wav2Vec2Model", "Wav2Vec2Config", hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                         intermediate_size=2 * D, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
                         num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2),
         lambda: dict(input_values=torch.randn(B, 400, generator=torch.Generator().manual_seed(1))), 2),
    # beyond the 27: the ones that were missed
    Arch("gemma2", _tf("Gemma2Model", "Gemma2Config", **_DECODER, num_key_value_heads=2, head_dim=8,
                       sliding_window=6, attn_logit_softcapping=50.0), _ids(), 2,
         skipped={0: "soft cap", 1: "soft cap"}, attns=("eager",)),
    Arch("deberta_v2", _tf("DebertaV2Model", "DebertaV2Config", **_BERTLIKE, relative_attention=True,
                           position_buckets=8, pos_att_type=["p2c", "c2p"]), _ids(), 2, attns=("eager",)),
    Arch("bloom", _tf("BloomModel", "BloomConfig", vocab_size=VOCAB, hidden_size=D, n_layer=L, n_head=H, use_cache=False), _ids(), 2,
         attns=("eager",)),
    Arch("falcon", _tf("FalconModel", "FalconConfig", vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L,
                       num_attention_heads=H, new_decoder_architecture=False, multi_query=True, use_cache=False), _ids(), 2),
    Arch("falcon_alibi", _tf("FalconModel", "FalconConfig", vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L,
                             num_attention_heads=H, alibi=True, new_decoder_architecture=False, multi_query=True, use_cache=False),
         _ids(), 2),
    Arch("siglip", _tf("SiglipModel", "SiglipConfig",
                       text_config=dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                                        intermediate_size=2 * D, max_position_embeddings=64),
                       vision_config=dict(_VISION)),
         lambda: dict(input_ids=_ids()()["input_ids"], **_pixels()()), 5),
]
