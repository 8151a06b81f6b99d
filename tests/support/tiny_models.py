"""Tiny random transformers built from configs (no downloads), batches with padding, and the float64
torch.func Jacobian reference that every NTK test compares against."""
from __future__ import annotations

import torch

VOCAB = 50


# arch -> (config class, LM class, sequence-classification class, extra config): Qwen2 (biased q/k/v),
# Mistral, Gemma (RMSNorm scaled by 1 + weight, scaled tied embeddings), Phi-3 (fused qkv and gate_up),
# GPT-NeoX.
MORE_DECODERS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification", {"num_key_value_heads": 1}),
    "mistral": ("MistralConfig", "MistralForCausalLM", "MistralForSequenceClassification",
                {"num_key_value_heads": 1}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "GemmaForSequenceClassification",
              {"num_key_value_heads": 1, "head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "Phi3ForSequenceClassification", {"num_key_value_heads": 1}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification", {}),
}


def build(arch: str, head: str = "lm", attn: str = "eager") -> torch.nn.Module:
    """A tiny float64 model in eval mode. arch: gpt2 | llama | bert | roberta | opt, or one of
    MORE_DECODERS. attn: transformers' attn_implementation ("sdpa" is what pretrained models load with
    by default)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, attn_implementation=attn)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                            eos_token_id=0, pad_token_id=0, **common)
        cls = tf.GPT2LMHeadModel if head == "lm" else tf.GPT2ForSequenceClassification
    elif arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                             pad_token_id=0, **common)
        cls = tf.LlamaForCausalLM if head == "lm" else tf.LlamaForSequenceClassification
    elif arch in ("bert", "roberta"):
        kw = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                  max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.1, **common)
        if arch == "bert":
            cfg, cls = tf.BertConfig(pad_token_id=0, **kw), (tf.BertForMaskedLM if head == "lm"
                                                          else tf.BertForSequenceClassification)
        else:
            cfg, cls = tf.RobertaConfig(pad_token_id=1, bos_token_id=0, eos_token_id=2, **kw), (
                tf.RobertaForMaskedLM if head == "lm" else tf.RobertaForSequenceClassification)
    elif arch in MORE_DECODERS:  # the decoder families researchers fine-tune most, in their default form
        cfg_cls, cls_lm, cls_seq, extra = MORE_DECODERS[arch]
        cfg_cls, cls = getattr(tf, cfg_cls), getattr(tf, cls_lm if head == "lm" else cls_seq)
        cfg = cfg_cls(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra,
                      **common)
    elif arch == "opt":
        cfg = tf.OPTConfig(hidden_size=16, ffn_dim=24, num_hidden_layers=2, num_attention_heads=2,
                           max_position_embeddings=32, word_embed_proj_dim=16, bos_token_id=0, eos_token_id=0,
                           pad_token_id=1, **common)
        cls = tf.OPTForCausalLM if head == "lm" else tf.OPTForSequenceClassification
    else:
        raise ValueError(arch)
    if head != "lm":
        cfg.num_labels = 3
    torch.manual_seed(0)
    model = cls(cfg).double().eval()
    return model


LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


def with_lora(model, arch: str, r: int = 2, at_init: bool = False):
    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.1, target_modules=LORA_TARGETS.get(arch, "all-linear"),
                          init_lora_weights=True if at_init else False)
    return peft.get_peft_model(model, cfg).double().eval()


def batch(n: int, t: int, seed: int = 0, pad_id: int = 0, padded: bool = True) -> dict:
    """Right-padded token batch: sample 1 shorter, last sample of length 2 (when n > 2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    if padded and n > 1:
        mask[1, t - 2:] = 0
        if n > 2:
            mask[-1, 2:] = 0
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    return {"input_ids": ids, "attention_mask": mask}


class _Wrapped(torch.nn.Module):
    def __init__(self, model, output):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, b):
        f = self.output(self.model, b)
        return f.unsqueeze(1) if f.dim() == 1 else f


def reference_jacobian(model, batch_: dict, output, names: list[str]) -> torch.Tensor:
    """J (N*C, P) in float64 by torch.func.jacrev, one sample at a time, parameters in `names` order;
    row i*C + a. Returns also the per-parameter column slices."""
    wrapped = _Wrapped(model, output)
    params = dict(model.named_parameters())
    ps = {f"model.{n}": params[n].detach() for n in names}
    n_samples = batch_["input_ids"].shape[0]
    rows = []
    for i in range(n_samples):
        one = {k: v[i:i + 1] for k, v in batch_.items()}
        jac = torch.func.jacrev(lambda p: torch.func.functional_call(wrapped, p, (one,))[0])(ps)
        rows.append(torch.cat([jac[f"model.{n}"].reshape(jac[f"model.{n}"].shape[0], -1) for n in names], 1))
    return torch.cat(rows, 0)


def column_slices(model, names):
    params = dict(model.named_parameters())
    out, start = {}, 0
    for n in names:
        out[n] = slice(start, start + params[n].numel())
        start += params[n].numel()
    return out


def kernel_from_jacobian(J1, J2, kernel):
    if kernel == "sgd":
        return J1 @ J2.T
    if kernel == "signgd":
        return J1.sign() @ J2.sign().T
    return J1 @ J2.sign().T
