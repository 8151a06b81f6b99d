"""The main job on the embedded default (interim, until a pretrained default model is embedded):
the per-layer empirical NTK of a small GPT-2 with LoRA adapters, computed by `linft.empirical_ntk`
and checked against float64 `torch.func` Jacobians; then its spectrum and per-layer traces."""
from __future__ import annotations

import time

import torch

from .engine import empirical_ntk
from .outputs import label_word_logits


def _model(seed: int):
    import peft
    import transformers as tf

    cfg = tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=64, vocab_size=256, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(seed)
    base = tf.GPT2LMHeadModel(cfg).double().eval()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                           init_lora_weights=False)
    return peft.get_peft_model(base, lora).double().eval()


def _reference(model, batch, output, names):
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, b):
            return output(self.model, b)

    wrapped = Wrapped()
    params = dict(model.named_parameters())
    ps = {f"model.{n}": params[n].detach() for n in names}
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        jac = torch.func.jacrev(lambda p: torch.func.functional_call(wrapped, p, (one,))[0])(ps)
        rows.append(torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in ps], dim=1))
    return torch.cat(rows)


def run(samples: int = 16, seed: int = 0) -> int:
    import warnings
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    model = _model(seed)
    g = torch.Generator().manual_seed(seed)
    T = 16
    ids = torch.randint(1, 256, (samples, T), generator=g)
    lengths = torch.randint(4, T + 1, (samples,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    batch = {"input_ids": torch.where(mask.bool(), ids, 0), "attention_mask": mask}
    output = label_word_logits([17, 42])

    t0 = time.perf_counter()
    ntk = empirical_ntk(model, batch, output=output, per_layer=True)
    t_linft = time.perf_counter() - t0
    t0 = time.perf_counter()
    J = _reference(model, batch, output, list(ntk.meta["params"]))
    K_ref = J @ J.T
    t_ref = time.perf_counter() - t0
    rel = ((ntk.matrix - K_ref).norm() / K_ref.norm()).item()

    print(f"linft demo: LoRA NTK of a 4-layer GPT-2 (random weights), {ntk.meta['n_params']} trainable "
          f"parameters in {len(ntk.blocks)} blocks, N={samples}, C={ntk.n_outputs}")
    for layer, k in sorted(ntk.by_layer().items(), key=lambda kv: str(kv[0])):
        print(f"  layer {layer!s:<5} trace {k.trace().item():12.4f}")
    ev = torch.linalg.eigvalsh(ntk.matrix)
    print(f"  total trace {ntk.matrix.trace().item():.4f}  lambda_max {ev[-1].item():.4f}  "
          f"lambda_min {ev[0].item():.3e}  kappa {(ev[-1] / ev[0]).item():.3e}")
    print(f"  linft.empirical_ntk: {t_linft * 1e3:.0f} ms   torch.func jacrev + J J^T: {t_ref * 1e3:.0f} ms")
    print(f"  relative error against torch.func: {rel:.2e}")
    ok = rel < 1e-10
    print("  OK" if ok else "  MISMATCH")
    return 0 if ok else 1
